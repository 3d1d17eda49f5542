"""Chaos: a staged rollout to real agents plus a simulated fleet while the Celery worker, Celery
beat, mqtt_ingest, Redis and Mosquitto (persisting as `make run` configures it) are each killed
with SIGKILL and started again, in turn. The rollout completes; no device was signed two
directives for one wave; no device's event went missing; every real box runs the release's
exact bytes. The same storm, longer and on a bigger fleet: `make bench-chaos`."""

from __future__ import annotations

import sys

import pytest

from ota.models import Device, Rollout, RolloutDevice
from registry.models import Artifact
from tests.support.chaos import KILL_ORDER, Storm, directives_per_wave, event_gaps, events_missing
from tests.support.fleet_agents import Agents, wait_until
from tests.support.platform import Platform
from tests.support.redis_server import RedisServer
from tests.support.rollout_data import act, create_rollout, health_for, release

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

API = "/api/v1"
REAL_AGENTS = 3
SIMULATED = 30


@pytest.fixture
def secure_broker(tmp_path, settings):
    from tests.support.broker_auth import start_secure_broker

    broker = start_secure_broker(tmp_path / "secure-broker", persistent=True)
    broker.apply(settings)
    yield broker
    broker.stop()


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def test_it_completes_a_rollout_while_every_server_process_is_killed_in_turn(
    client, admin_token, ci_token, live_server, secure_broker, redis_server, tmp_path
):
    release(client, admin_token, "detector", "1.0", scale=2.0, bias=1.0, health=health_for(2.0, 1.0))
    sha = Artifact.objects.get(version__version="1.0").sha256
    with Platform(tmp_path, broker=secure_broker, live_server_url=live_server.url, redis_url=redis_server.url) as platform:
        storm = Storm(platform=platform, broker=secure_broker, redis=redis_server)
        storm.start_server()
        agents = Agents(tmp_path / "agents", platform.env)
        try:
            token = client.post(f"{API}/enrollment-tokens/", {"max_uses": REAL_AGENTS, "name": "chaos"},
                                content_type="application/json", **admin_token.headers).json()["token"]
            real = agents.enroll(live_server.url, token, REAL_AGENTS)
            for device_id in real:
                agents.start(device_id)
            platform._spawn("simulator", [
                sys.executable, "manage.py", "simulate_fleet", "--devices", str(SIMULATED), "--hardware", "rpi4",
                "--label", "site=berlin", "--step-seconds", "0.3"])
            wait_until(lambda: Device.objects.filter(online=True).count() == REAL_AGENTS + SIMULATED, 120,
                       "every device online", platform, agents)

            created = create_rollout(
                client, ci_token, model="detector", version="1.0", target={"labels": {"site": "berlin"}},
                waves=[{"percent": 10}, {"percent": 50}, {"percent": 100}],
                gates={"success": {"min_healthy_percent": 100}, "soak_seconds": 8,
                       "failure": {"min_reports": 2, "max_failed_percent": 50},
                       "timeouts": {"download_seconds": 300, "activate_seconds": 300, "trial_seconds": 300}})
            assert created.status_code == 201, created.content
            rid = created.json()["id"]
            assert act(client, ci_token, rid, "start").status_code == 200

            kills = storm.run(while_=lambda: Rollout.objects.get(pk=rid).state == "running")
            print(f"storm: {kills}")
            assert [k["what"] for k in kills if k["mid_rollout"]] == list(KILL_ORDER), "the storm must hit the rollout"

            wait_until(lambda: Rollout.objects.get(pk=rid).state != "running", 300, "the rollout to finish",
                       platform, agents)
            rollout = Rollout.objects.get(pk=rid)
            assert rollout.state == "completed", rollout.state_reason
            assert set(RolloutDevice.objects.filter(rollout_id=rid).values_list("state", flat=True)) == {"committed"}
            twice = {k: v for k, v in directives_per_wave(rid).items() if len(v) != 1}
            assert twice == {}, "a device was signed two directives for one wave"
            assert len(directives_per_wave(rid)) == REAL_AGENTS + SIMULATED
            assert event_gaps(Device.objects.values_list("id", flat=True)) == {}
            assert events_missing(rid) == {}
            assert {d: agents.model_sha(d, "detector") for d in real} == {d: sha for d in real}
        finally:
            agents.stop_all()

