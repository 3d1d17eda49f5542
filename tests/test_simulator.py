"""The fleet simulator: real per-device MQTT connections enrolled through ota.fleet.enrollment, verifying
signed directives and answering with the agent's event sequence, stored by real ingest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from unittest import mock

import pytest
from django.conf import settings as django_settings

from agent.protocol import Topics
from agent.signing import generate_private_key_pem, load_private_key_pem
from ota.models import Device, DeviceEvent, DeviceModelState
from ota.sim.enroll import enroll_simulated_devices
from ota.sim.fleet import FleetSimulator
from ota.transport import hooks
from ota.transport.mqtt import Publisher
from ota.transport.subscriber import IngestRunner
from tests.support.fleet import hardware, release_rows, signed_directive, signed_release
from tests.support.waiting import wait_for

pytestmark = pytest.mark.django_db(transaction=True)
T = Topics("fleet")
ROOT = Path(__file__).resolve().parents[1]
HEALTHY = ["received", "downloading", "verifying", "prechecking", "activating", "trial", "committed"]


@pytest.fixture
def ingest(secure_broker):
    """Ingest in a thread; the rollout engine's hook is not this file's subject (and must not
    queue Celery tasks on a shared Redis)."""
    patcher = mock.patch.object(hooks, "on_device_events", autospec=True)
    patcher.start()
    stop = threading.Event()
    runner = IngestRunner()
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()
    assert runner.subscribed.wait(10)
    yield runner
    stop.set()
    thread.join(10)
    patcher.stop()


def states(device_id: str) -> list[str]:
    return list(DeviceEvent.objects.filter(device_id=device_id).order_by("event_no").values_list("state", flat=True))


def test_it_runs_healthy_and_failing_devices_through_signed_directives(secure_broker, ingest):
    v1, a1 = release_rows(version="1.0", counter=1)
    v2, a2 = release_rows(version="2.0", counter=2)
    release_v2 = signed_release(v2, [a2])
    creds = enroll_simulated_devices(count=4, hardware="rpi4-arm64", labels={"sim": "yes"})
    healthy, failing, forged_target, slow = (c.device_id for c in creds)
    sim = FleetSimulator.from_settings(
        creds, behaviour={failing: "fail-precheck", slow: "slow"}, step_seconds=0.01, slow_step_seconds=0.3
    ).start()
    try:
        sim.wait_connected(timeout=20)
        wait_for(lambda: Device.objects.filter(online=True).count() == 4, timeout=30, what="presence from all four")
        assert Device.objects.get(pk=healthy).agent_version == "sim-1"
        with Publisher() as publisher:
            publisher.publish_many(
                [(T.directive(d, "detector"), signed_directive(device_id=d, seq=1, release=release_v2, artifact=a2))
                 for d in (healthy, failing, slow)]
                + [(T.directive(forged_target, "detector"), signed_directive(
                    device_id=forged_target, seq=1, release=release_v2, artifact=a2,
                    key=load_private_key_pem(generate_private_key_pem())))]
            )
        wait_for(lambda: DeviceModelState.objects.filter(last_state__in=["committed", "failed"]).count() == 3,
                 timeout=30, what="three terminal states")
        wait_for(lambda: DeviceEvent.objects.filter(device_id=forged_target).exists(), timeout=30, what="the rejection")
    finally:
        stats = sim.stop()

    assert states(healthy) == HEALTHY and states(slow) == HEALTHY
    assert states(failing) == ["received", "downloading", "verifying", "prechecking", "failed"]
    assert DeviceEvent.objects.get(device_id=failing, state="failed").error_code == "PRECHECK_FAILED"
    rejected = DeviceEvent.objects.get(device_id=forged_target)
    assert (rejected.state, rejected.error_code) == ("rejected", "UNKNOWN_KEY")
    healthy_state = DeviceModelState.objects.get(device_id=healthy)
    assert (healthy_state.active_version_id, healthy_state.last_seq) == (v2.pk, 1)
    assert not DeviceModelState.objects.filter(device_id=failing, active_version=v2).exists()
    assert stats.committed == 2 and stats.failed == 1 and stats.rejected == 1
    wait_for(lambda: not Device.objects.filter(online=True).exists(), timeout=30,
             what="a clean stop to say offline")


def test_it_converges_a_flapping_device_from_the_retained_directive(secure_broker, ingest):
    _v1, _a1 = release_rows(version="1.0", counter=1)
    v2, a2 = release_rows(version="2.0", counter=2)
    creds = enroll_simulated_devices(count=2, hardware="rpi4-arm64")
    sim = FleetSimulator.from_settings(creds, behaviour="flapping", step_seconds=0.2, flap_period=0.6,
                                       flap_down=0.8).start()
    try:
        sim.wait_connected(timeout=20)
        with Publisher() as publisher:
            publisher.publish_many([(T.directive(c.device_id, "detector"), signed_directive(
                device_id=c.device_id, seq=1, release=signed_release(v2, [a2]), artifact=a2)) for c in creds])
        wait_for(lambda: DeviceModelState.objects.filter(last_state="committed").count() == 2, timeout=60,
                 what="both flapping devices committed")
    finally:
        stats = sim.stop()
    assert stats.disconnects >= 2, stats
    for c in creds:
        assert states(c.device_id) == HEALTHY, "each step reported exactly once despite the drops"


def test_it_refuses_a_revoked_simulated_device(secure_broker):
    from ota.fleet.revocation import device_revoke

    hardware("rpi4-arm64")
    creds = enroll_simulated_devices(count=2, hardware="rpi4-arm64")
    device_revoke(device_id=creds[0].device_id, actor="test")
    sim = FleetSimulator.from_settings(creds).start()
    try:
        sim.wait_connected(count=1, timeout=20)
        wait_for(lambda: sim.stats.refused == 1, timeout=30, what="the refusal")
    finally:
        sim.stop()


def test_it_runs_as_a_management_command_and_reuses_saved_credentials(secure_broker, tmp_path):
    hardware("rpi4-arm64")
    db = django_settings.DATABASES["default"]
    env = {**os.environ, **secure_broker.env, "SECRET_KEY": "test-only",
           "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
           "RELEASE_KEY_PATH": str(django_settings.RELEASE_KEY_PATH),
           "ROLLOUT_KEY_PATH": str(django_settings.ROLLOUT_KEY_PATH)}
    creds_file = tmp_path / "sim.json"
    cmd = [sys.executable, str(ROOT / "manage.py"), "simulate_fleet", "--devices", "3", "--credentials-file",
           str(creds_file), "--duration", "2", "--label", "ring=sim"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout.strip().splitlines()[-1])
    assert out["simulator_stats"]["connects"] == 3 and out["simulator_stats"]["refused"] == 0
    assert sorted(out["devices"]) == sorted(Device.objects.filter(labels__ring="sim").values_list("id", flat=True))
    assert oct(creds_file.stat().st_mode & 0o777) == "0o600"

    proc = subprocess.Popen(cmd[:-4] + ["--duration", "0"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    # SIGTERM once it runs (its handler is installed): earlier, on a busy machine, is a kill.
    for line in proc.stderr:
        if "simulate_fleet: running" in line:
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr
    assert sorted(json.loads(stdout.strip().splitlines()[-1])["devices"]) == sorted(out["devices"])
    assert Device.objects.count() == 3, "saved credentials are reused, not re-enrolled"

    bad = subprocess.run(cmd[:4] + ["0"], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode != 0 and "--devices must be at least 1" in bad.stderr
    bad = subprocess.run(cmd[:4] + ["1", "--model-behaviour", "abc:slower=2"], env=env, capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert bad.returncode != 0 and "--model-behaviour: 'abc:slower=2' must start with a release's" in bad.stderr


def test_it_reports_model_behaviours_through_the_agents_aggregation(secure_broker, ingest):
    """Simulated apps: a release 40 % slower on 10 boxes against 20 on another release, through
    MQTT and ingest into the hourly rows the control-group gates read, and judged by them."""
    from ota.models import ModelMetricsHour
    from ota.rollouts.comparison import compare_groups, settings_with_defaults, window_of

    hardware("rpi4-arm64")
    creds = enroll_simulated_devices(count=30, hardware="rpi4-arm64", labels={"sim": "yes"})
    new_sha, old_sha = "a" * 64, "b" * 64
    resume = {c.device_id: {"active": {"detector": new_sha if i < 10 else old_sha}} for i, c in enumerate(creds)}
    sim = FleetSimulator.from_settings(creds, resume=resume, telemetry_seconds=0.3, metrics_requests=60, seed=3,
                                       model_behaviours={new_sha: {"slower": 1.4}}).start()
    try:
        wait_for(lambda: ModelMetricsHour.objects.filter(requests__gte=120).count() == 30, timeout=60,
                 what="two windows from each of the 30 boxes")
    finally:
        sim.stop()

    def group(sha):
        rows = ModelMetricsHour.objects.filter(release_sha256=sha)
        return [window_of(r.device_id, [r.as_window()]) for r in rows]

    verdict = compare_groups(group(new_sha), group(old_sha), settings_with_defaults({"min_requests": 100}))
    assert verdict.state == "fail" and "latency" in verdict.summary, verdict.figures
    assert 1.25 < verdict.figures["latency"]["p50"]["ratio"] < 1.6
    assert verdict.figures["new_devices"] == 10 and verdict.figures["control_devices"] == 20
