"""The crown test: 20 real `fleet-agent` processes, each enrolled through the API with its own
state directory and broker credentials, updated by the real server processes (Celery worker +
beat, mqtt_ingest, live web server) over a secured Mosquitto, with real ONNX releases.

1. canary(2) → 25 % → 100 % of 1.0 ends with every device committed on 1.0's sha, in the API.
2. A release whose outputs break its signed health contract fails the canary's precheck; the
   rollout aborts by itself (policy revert); no device outside the canary ever got a directive
   (a service-account subscriber watched); the canary is still on 1.0's sha.
3. An agent that is offline during its wave converges after it comes back.
"""

from __future__ import annotations

import time

import pytest

from ota.models import DeviceModelState, Directive, Rollout, RolloutDevice
from registry.models import Artifact, AuditEntry
from tests.support.fleet_agents import Agents, wait_until
from tests.support.platform import DirectiveRecorder
from tests.support.rollout_data import act, create_rollout, health_for, release

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

API = "/api/v1"
FLEET_SIZE = 20
GATES = {
    "success": {"min_healthy_percent": 100},
    "failure": {"min_reports": 2, "max_failed_percent": 50},
    "timeouts": {"download_seconds": 120, "activate_seconds": 120, "trial_seconds": 60},
}


@pytest.fixture
def platform(server_platform):
    return server_platform


@pytest.fixture
def agents(platform, tmp_path):
    fleet = Agents(tmp_path / "agents", platform.env)
    yield fleet
    fleet.stop_all()


def rollout_state(rid):
    return Rollout.objects.get(pk=rid).state


def test_it_updates_real_agents_in_waves_stops_a_bad_release_at_the_canary_and_converges_offline_agents(
    client, admin_token, ci_token, operator_token, platform, agents, live_server, secure_broker
):
    release(client, admin_token, "detector", "1.0", scale=2.0, bias=1.0, health=health_for(2.0, 1.0))
    # 2.0-bad computes y = 3x + 1 but its signed contract promises 2x + 1: every precheck fails.
    release(client, admin_token, "detector", "2.0-bad", scale=3.0, bias=1.0, health=health_for(2.0, 1.0))
    release(client, admin_token, "detector", "3.0", scale=0.5, bias=0.0, health=health_for(0.5, 0.0))
    sha = {v: Artifact.objects.get(version__version=v).sha256 for v in ("1.0", "2.0-bad", "3.0")}

    token = client.post(f"{API}/enrollment-tokens/", {"max_uses": FLEET_SIZE, "name": "e2e"},
                        content_type="application/json", **admin_token.headers).json()["token"]
    started = time.monotonic()
    devices = agents.enroll(live_server.url, token, FLEET_SIZE)
    print(f"{time.strftime('%H:%M:%S')} enrolled {FLEET_SIZE} agents: {time.monotonic() - started:.1f}s")
    assert len(devices) == FLEET_SIZE
    for device_id in devices:
        agents.start(device_id)

    # --- 1. canary(2) → 25 % → 100 % --------------------------------------------------------
    canary = devices[:2]
    created = create_rollout(client, ci_token, model="detector", version="1.0", target={"labels": {"site": "berlin"}},
                             waves=[{"devices": canary}, {"percent": 25}, {"percent": 100}], gates=GATES,
                             abort_policy="revert")
    assert created.status_code == 201, created.content
    rid = created.json()["id"]
    assert [w["size"] for w in created.json()["waves"]] == [2, 3, 15]
    assert act(client, ci_token, rid, "start").status_code == 200
    wait_until(lambda: rollout_state(rid) == "completed", 240, "rollout 1 to complete", platform, agents)
    detail = client.get(f"{API}/rollouts/{rid}/", **ci_token.headers).json()
    assert [(w["state"], w["counts"]) for w in detail["waves"]] == [
        ("passed", {"committed": 2}), ("passed", {"committed": 3}), ("passed", {"committed": 15})]
    wait_until(lambda: DeviceModelState.objects.filter(active_sha256=sha["1.0"]).count() == FLEET_SIZE, 30,
               "every device to report 1.0 active", platform, agents)
    for device_id in devices:
        states = client.get(f"{API}/devices/{device_id}/", **ci_token.headers).json()["models"]
        assert [(s["model"], s["active_version"], s["active_sha256"], s["last_state"]) for s in states] == [
            ("detector", "1.0", sha["1.0"], "committed")]
    gate_log = AuditEntry.objects.filter(object_type="rollout", object_id=str(rid), action="wave.gate_met")
    assert [e.detail["committed"] for e in gate_log.order_by("id")] == [2, 3, 15]

    # --- 2. a release that fails its precheck stops at the canary --------------------------
    with DirectiveRecorder(secure_broker) as recorder:
        bad_canary = devices[2:4]
        bad = create_rollout(client, ci_token, model="detector", version="2.0-bad",
                             target={"labels": {"site": "berlin"}},
                             waves=[{"devices": bad_canary}, {"percent": 50}, {"percent": 100}], gates=GATES,
                             abort_policy="revert").json()
        act(client, ci_token, bad["id"], "start")
        wait_until(lambda: rollout_state(bad["id"]) == "aborted", 120, "the bad rollout to abort", platform, agents)
        time.sleep(3)  # three more ticks: nothing else may go out
        assert recorder.devices() == set(bad_canary)
    assert set(Directive.objects.filter(rollout_id=bad["id"]).values_list("device_id", flat=True)) == set(bad_canary)
    outcome = dict(RolloutDevice.objects.filter(rollout_id=bad["id"], wave__index=0).values_list("device_id", "error_code"))
    assert outcome == {d: "PRECHECK_FAILED" for d in bad_canary}
    assert set(RolloutDevice.objects.filter(rollout_id=bad["id"], wave__index__gt=0).values_list("state", flat=True)) == {"skipped"}
    verdict = AuditEntry.objects.get(object_type="rollout", object_id=str(bad["id"]), action="rollout.auto_revert")
    assert verdict.actor == "system" and verdict.detail["failed"] == 2 and "2 of 2 reporting devices failed" in verdict.reason
    assert Rollout.objects.get(pk=bad["id"]).reverted_at is not None
    for device_id in bad_canary:
        state = DeviceModelState.objects.get(device_id=device_id)
        assert state.active_sha256 == sha["1.0"], "a failed precheck must leave the old model active"

    # --- 3. an agent offline during its wave converges when it comes back -------------------
    offline = devices[-1]
    agents.stop(offline)
    good = create_rollout(client, ci_token, model="detector", version="3.0", target={"labels": {"site": "berlin"}},
                          waves=[{"devices": devices[:2]}, {"percent": 100}], gates=GATES).json()
    act(client, ci_token, good["id"], "start")
    wait_until(lambda: RolloutDevice.objects.filter(rollout_id=good["id"], state="committed").count() == FLEET_SIZE - 1,
               180, "every online device to commit 3.0", platform, agents)
    assert RolloutDevice.objects.get(rollout_id=good["id"], device_id=offline).state == "directed"
    assert rollout_state(good["id"]) == "running"  # the success gate wants 100 %
    agents.start(offline)
    wait_until(lambda: rollout_state(good["id"]) == "completed", 120, "the offline agent to converge", platform, agents)
    assert DeviceModelState.objects.get(device_id=offline).active_sha256 == sha["3.0"]
