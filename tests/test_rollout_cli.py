"""`fleetctl rollout` as a real subprocess against a live server: create/start/pause/abort,
status --watch following a rollout to its end, and the exit codes CI scripts branch on."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.utils import timezone

from ota.models import DeviceEvent, Directive, Rollout
from ota.rollouts.engine import rollout_evaluate
from ota.rollouts.events import rollout_apply_events
from tests.support.platform import point_celery_at
from tests.support.rollout_data import make_devices, release

FLEETCTL = Path(sys.executable).with_name("fleetctl")
pytestmark = pytest.mark.django_db(transaction=True)


def fleetctl(*args: str, token, url: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_URL=url, FLEET_TOKEN=token.secret)
    return subprocess.run([str(FLEETCTL), "rollout", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture
def fleet(client, admin_token, mosquitto, settings):
    point_celery_at()  # start's wake-up goes to this suite's Redis db (no worker: the test drives the engine)
    settings.MQTT_PORT = mosquitto.port
    settings.MQTT_USERNAME = ""
    release(client, admin_token, "detector", "2.0")
    return make_devices(8, labels={"site": "berlin"})


def test_it_creates_starts_pauses_and_aborts_with_fitting_exit_codes(live_server, fleet, ci_token, operator_token):
    url = live_server.url
    done = fleetctl("create", "--model", "detector", "--version", "2.0", "--label", "site=berlin",
                    "--wave", "canary: dev-0000, dev-0001", "--wave", "50%", "--wave", "100%",
                    "--min-healthy", "90", "--max-failed-percent", "20", "--abort-policy", "revert", "--start",
                    token=ci_token, url=url)
    assert done.returncode == 0, done.stderr
    rid = Rollout.objects.get().pk
    assert f"rollout {rid}  detector@2.0  RUNNING" in done.stdout
    assert "canary" in done.stdout and "2 named" in done.stdout and "50%" in done.stdout
    rollout = Rollout.objects.get()
    assert rollout.gates["success"]["min_healthy_percent"] == 90 and rollout.abort_policy == "revert"

    # A pipeline may pause (and abort) the rollout it started; resuming is an operator's call.
    paused = fleetctl("pause", str(rid), "--reason", "checking graphs", token=ci_token, url=url)
    assert paused.returncode == 0, paused.stderr
    assert "now paused" in paused.stderr
    again = fleetctl("pause", str(rid), token=operator_token, url=url)
    assert again.returncode == 3 and "it is paused" in again.stderr
    refused = fleetctl("resume", str(rid), token=ci_token, url=url)
    assert refused.returncode == 3
    assert "needs the 'operator' scope" in refused.stderr
    resumed = fleetctl("resume", str(rid), "--reason", "graphs fine", token=operator_token, url=url)
    assert resumed.returncode == 0, resumed.stderr
    assert "now running" in resumed.stderr
    assert Rollout.objects.get().state == "running"

    assert fleetctl("abort", str(rid), token=operator_token, url=url).returncode == 0
    watch = fleetctl("status", str(rid), "--watch", token=operator_token, url=url)
    assert watch.returncode == 1  # ended, but not completed
    assert "ABORTED" in watch.stdout


def test_it_refuses_bad_definitions_locally_or_with_the_servers_message(live_server, fleet, ci_token):
    bad_wave = fleetctl("create", "--model", "detector", "--version", "2.0", "--label", "site=berlin",
                        "--wave", "canry 2", "--wave", "25", token=ci_token, url=live_server.url)
    assert bad_wave.returncode == 3
    assert "wave 1: 'canry 2' is not understood. Did you mean 'canary 2'?" in bad_wave.stderr
    assert "wave 2: '25' is ambiguous: write 25% for a share of the target or +25 for 25 more devices" in bad_wave.stderr
    assert not Rollout.objects.exists()
    not_increasing = fleetctl("create", "--model", "detector", "--version", "2.0", "--label", "site=berlin",
                              "--wave", "50%", "--wave", "25%", token=ci_token, url=live_server.url)
    assert not_increasing.returncode == 3
    assert "waves[1].percent: percentages are cumulative and must increase: 25 follows 50" in not_increasing.stderr
    unknown = fleetctl("create", "--model", "detector", "--version", "9", "--label", "site=berlin",
                       "--wave", "100%", token=ci_token, url=live_server.url)
    assert unknown.returncode == 3 and "has no version '9'" in unknown.stderr


def test_it_watches_a_rollout_live_until_it_completes(live_server, fleet, ci_token, django_capture_on_commit_callbacks):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_URL=live_server.url, FLEET_TOKEN=ci_token.secret)
    # create --start --watch: one command a CI job can wait on.
    watcher = subprocess.Popen([str(FLEETCTL), "rollout", "create", "--model", "detector", "--version", "2.0",
                                "--label", "site=berlin", "--wave", "canary: dev-0000", "--wave", "100%",
                                "--start", "--watch", "--interval", "0.2"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from tests.support.waiting import wait_for

    rid = wait_for(lambda: Rollout.objects.filter(state="running").values_list("pk", flat=True).first(),
                   timeout=30, what="the rollout to start")
    event_no = 0
    for _ in range(3):  # canary wave, then the rest: commit whatever was directed
        rollout_evaluate(rollout_id=rid)
        event_no += 1
        ids = [DeviceEvent.objects.create(device_id=d.device_id, seq=d.seq, event_no=event_no, model="detector",
                                          state="committed", received_at=timezone.now()).pk
               for d in Directive.objects.filter(rollout_id=rid)
               if not DeviceEvent.objects.filter(device_id=d.device_id, seq=d.seq).exists()]
        rollout_apply_events(event_ids=ids)
    rollout_evaluate(rollout_id=rid)
    out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0, err
    assert "COMPLETED" in out
    assert "7/7 ok" in out and "1/1 ok" in out
    assert "RUNNING" in out  # it showed the rollout in progress before the end


def test_it_waits_out_a_server_restart_then_stops_with_the_reason_when_paused(live_server, fleet, ci_token):
    from ota.rollouts.actions import rollout_pause
    from tests.support.net import TcpProxy

    assert fleetctl("create", "--model", "detector", "--version", "2.0", "--label", "site=berlin",
                    "--wave", "100%", "--start", token=ci_token, url=live_server.url).returncode == 0
    rid = Rollout.objects.get().pk
    proxy = TcpProxy(int(live_server.url.rsplit(":", 1)[1])).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_URL=proxy.url, FLEET_TOKEN=ci_token.secret)
    watcher = subprocess.Popen([str(FLEETCTL), "rollout", "status", str(rid), "--watch", "--interval", "0.2"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        proxy.stop()  # the server "restarts": connections are refused for a few seconds
        time.sleep(3.0)
        rollout_pause(rollout_id=rid, actor="user:x", reason="latency regression on the canary")
        proxy.start()
        out, err = watcher.communicate(timeout=60)
    finally:
        watcher.kill()
        proxy.stop()
    assert watcher.returncode == 1, err
    assert "retrying in" in err
    assert f"rollout {rid} is paused: latency regression on the canary" in err
