"""Every device converges under field conditions, with real `fleet-agent` processes and the real
server processes (Celery worker and beat, mqtt_ingest, live web server) over a secured Mosquitto
that persists as `make run` configures it:

1. two concurrent rollouts of different models to the same agents, one agent offline until both
   are done (listed unreachable), a device enrolled while they run (it joins): both complete,
   and the offline agent converges to both models when it comes back;
2. ingest killed with SIGKILL during the busiest wave, then Mosquitto killed -9 (its retained
   directives and queued events since the last autosave gone) while one agent is offline: every
   device ends on the release's exact bytes, every outcome is recorded, none timed out;
3. a kill -9 storm on the agents during a rollout (a power cut as far as they can tell), with
   the default agent configuration: the rollout completes, every box runs the new bytes; then
   the next release is aborted and reverted mid-install under the same storm: every box ends
   on the release it ran before.
"""

from __future__ import annotations

import random
import time

import pytest

from ota.models import Rollout, RolloutDevice
from registry.models import Artifact
from tests.support.fleet_agents import Agents, wait_until
from tests.support.rollout_data import act, create_rollout, health_for, release

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

API = "/api/v1"


def gates(delivery_seconds: int) -> dict:
    # The phase timeouts outlast the kill -9 storm (90 s): a box whose power is cut every few
    # seconds starts its trial again and again, and on a loaded machine (three test workers on two
    # cores) one box can spend a minute there. These tests are about convergence; a timeout that
    # fired inside the storm would leave the wave one success short of its 100 % gate for good.
    return {
        "success": {"min_healthy_percent": 100},
        "failure": {"min_reports": 2, "max_failed_percent": 50},
        "timeouts": {"delivery_seconds": delivery_seconds, "download_seconds": 180, "activate_seconds": 180,
                     "trial_seconds": 180},
    }


@pytest.fixture
def secure_broker(tmp_path, settings):
    """This module's broker persists sessions and retained messages, as `make run`'s does."""
    from tests.support.broker_auth import start_secure_broker

    broker = start_secure_broker(tmp_path / "secure-broker", persistent=True)
    broker.apply(settings)
    yield broker
    broker.stop()


@pytest.fixture
def platform(server_platform):
    return server_platform


@pytest.fixture
def agents(platform, tmp_path):
    fleet = Agents(tmp_path / "agents", platform.env)
    yield fleet
    fleet.stop_all()


def enrollment_token(client, admin_token, uses: int) -> str:
    response = client.post(f"{API}/enrollment-tokens/", {"max_uses": uses, "name": "convergence"},
                           content_type="application/json", **admin_token.headers)
    assert response.status_code == 201, response.content
    return response.json()["token"]


def started(client, ci_token, **body) -> int:
    response = create_rollout(client, ci_token, target={"labels": {"site": "berlin"}}, **body)
    assert response.status_code == 201, response.content
    rid = response.json()["id"]
    assert act(client, ci_token, rid, "start").status_code == 200
    return rid


def states(rid: int) -> dict[str, str]:
    return dict(RolloutDevice.objects.filter(rollout_id=rid).values_list("device_id", "state"))


def rollout_state(rid: int) -> str:
    return Rollout.objects.get(pk=rid).state


def test_it_converges_two_models_on_one_fleet_with_a_box_offline_and_one_enrolled_midway(
    client, admin_token, ci_token, platform, agents, live_server
):
    release(client, admin_token, "detector", "1.0", scale=2.0, bias=1.0, health=health_for(2.0, 1.0))
    release(client, admin_token, "classifier", "1.0", scale=0.5, bias=0.0, health=health_for(0.5, 0.0))
    sha = {m: Artifact.objects.get(version__model__name=m).sha256 for m in ("detector", "classifier")}
    token = enrollment_token(client, admin_token, 9)
    devices = agents.enroll(live_server.url, token, 8)
    offline = devices[-1]
    for device_id in devices[:-1]:
        agents.start(device_id)

    rids = {model: started(client, ci_token, model=model, version="1.0", waves=[{"percent": 50}, {"percent": 100}],
                           gates=gates(delivery_seconds=20))
            for model in ("detector", "classifier")}
    late = agents.enroll(live_server.url, token, 1, prefix="late")
    joiner = (set(late) - set(devices)).pop()
    assert {rollout_state(rid) for rid in rids.values()} == {"running"}, "the joiner must arrive mid-rollout"
    agents.start(joiner)

    wait_until(lambda: {rollout_state(rid) for rid in rids.values()} == {"completed"}, 300,
               "both rollouts to complete", platform, agents)
    for model, rid in rids.items():
        expected = {d: "committed" for d in [*devices, joiner]} | {offline: "unreachable"}
        assert states(rid) == expected, model
        detail = client.get(f"{API}/rollouts/{rid}/", **ci_token.headers).json()
        assert sum(w["counts"].get("unreachable", 0) for w in detail["waves"]) == 1
        for device_id in [*devices[:-1], joiner]:
            assert agents.model_sha(device_id, model) == sha[model], (device_id, model)

    agents.start(offline)
    wait_until(lambda: all(states(rid)[offline] == "committed" for rid in rids.values()), 180,
               "the offline box to converge to both models, recorded after completion", platform, agents)
    assert {model: agents.model_sha(offline, model) for model in sha} == sha


def test_it_converges_when_ingest_and_then_the_broker_are_killed_mid_rollout(
    client, admin_token, ci_token, platform, agents, live_server, secure_broker
):
    release(client, admin_token, "detector", "1.0", scale=2.0, bias=1.0, health=health_for(2.0, 1.0))
    sha = Artifact.objects.get(version__version="1.0").sha256
    devices = agents.enroll(live_server.url, enrollment_token(client, admin_token, 6), 6)
    first, offline = devices[0], devices[-1]
    for device_id in devices[:-1]:
        agents.start(device_id)
    ingest = next(p for p in platform.procs if p.name == "ingest")

    rid = started(client, ci_token, model="detector", version="1.0", waves=[{"devices": [first]}, {"percent": 100}],
                  gates=gates(delivery_seconds=25))
    # The busiest wave: the second (five devices). Kill ingest as its directives go out.
    wait_until(lambda: RolloutDevice.objects.filter(rollout_id=rid, wave__index=1, state="directed").exists(), 120,
               "the second wave to start", platform, agents)
    platform.kill(ingest)
    time.sleep(5)
    platform.start_ingest("ingest-after-sigkill")
    # The offline box holds the wave open (25 s delivery timeout): the broker dies mid-rollout.
    wait_until(lambda: sum(s == "committed" for s in states(rid).values()) >= 2, 120,
               "some devices of the second wave to commit", platform, agents)
    assert rollout_state(rid) == "running"
    secure_broker.kill()
    time.sleep(2)
    secure_broker.start()

    wait_until(lambda: rollout_state(rid) == "completed", 240, "the rollout to complete", platform, agents)
    assert states(rid) == {d: "committed" for d in devices} | {offline: "unreachable"}
    agents.start(offline)  # its retained directive died with the broker: the server must send it again
    wait_until(lambda: states(rid)[offline] == "committed", 180, "the offline box to converge", platform, agents)
    assert {d: agents.model_sha(d, "detector") for d in devices} == {d: sha for d in devices}
    assert not RolloutDevice.objects.filter(rollout_id=rid, state="timed_out").exists()


def power_cuts(agents, devices, rid, *, seconds: float, rng: random.Random, until=None) -> dict[str, list[str]]:
    """kill -9 random agents and start them again for `seconds` (or until `until()`); returns,
    per device, the state its assignment was in at each cut."""
    cut: dict[str, list[str]] = {d: [] for d in devices}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until and until()):
        victim = rng.choice(devices)
        if agents.running(victim):
            agents.kill(victim)
            cut[victim].append(states(rid)[victim])
            time.sleep(rng.uniform(0.1, 0.5))  # the power comes back
            agents.start(victim)
        time.sleep(rng.uniform(0.05, 0.4))
    return cut


def test_it_completes_a_rollout_and_a_revert_through_kill_9_storms_on_the_agents(
    client, admin_token, ci_token, operator_token, platform, agents, live_server
):
    release(client, admin_token, "detector", "1.0", scale=2.0, bias=1.0, health=health_for(2.0, 1.0))
    release(client, admin_token, "detector", "2.0", scale=0.5, bias=0.0, health=health_for(0.5, 0.0))
    release(client, admin_token, "detector", "3.0", scale=1.5, bias=0.5, health=health_for(1.5, 0.5))
    sha = {v: Artifact.objects.get(version__version=v).sha256 for v in ("1.0", "2.0", "3.0")}
    # A 4 s trial (pacing only) leaves the storm time to cut the power in every phase.
    devices = agents.enroll(live_server.url, enrollment_token(client, admin_token, 6), 6, update={"trial_seconds": 4})
    for device_id in devices:
        agents.start(device_id)
    first = started(client, ci_token, model="detector", version="1.0", waves=[{"percent": 100}], gates=gates(600))
    wait_until(lambda: rollout_state(first) == "completed", 240, "1.0 everywhere", platform, agents)

    rid = started(client, ci_token, model="detector", version="2.0", waves=[{"percent": 100}], gates=gates(600),
                  abort_policy="revert")
    rng = random.Random(10)
    cut = power_cuts(agents, devices, rid, seconds=90, rng=rng, until=lambda: rollout_state(rid) != "running")
    mid_update = {d: [s for s in c if s in RolloutDevice.IN_FLIGHT] for d, c in cut.items()}
    print(f"power cuts per device, by the state its update was in: {cut}")
    assert sum(map(len, mid_update.values())) >= len(devices), "the storm must hit updates in flight"

    wait_until(lambda: rollout_state(rid) != "running", 240, "the rollout to finish", platform, agents)
    assert rollout_state(rid) == "completed", Rollout.objects.get(pk=rid).state_reason
    assert states(rid) == {d: "committed" for d in devices}
    assert {d: agents.model_sha(d, "detector") for d in devices} == {d: sha["2.0"] for d in devices}

    # 3.0 goes out and is aborted and reverted while it installs, under the same storm: every box
    # ends on 2.0, the release it ran before, or is listed with the reason.
    bad = started(client, ci_token, model="detector", version="3.0", waves=[{"percent": 100}], gates=gates(600))
    wait_until(lambda: sum(s in RolloutDevice.IN_FLIGHT[1:] for s in states(bad).values()) >= 3, 120,
               "3.0 to be installing on half the fleet", platform, agents)
    assert act(client, operator_token, bad, "rollback", reason="storm test").status_code == 200
    cut = power_cuts(agents, devices, bad, seconds=20, rng=rng)
    print(f"power cuts during the revert: {cut}")
    for device_id in devices:
        if not agents.running(device_id):
            agents.start(device_id)
    settled = {"reverted", "revert_failed", "skipped", "failed", "rejected", "rolled_back"}
    wait_until(lambda: set(states(bad).values()) <= settled, 240, "every revert to settle", platform, agents)
    outcome = {d: (a.state, a.error_code) for d, a in
               ((a.device_id, a) for a in RolloutDevice.objects.filter(rollout_id=bad))}
    on_previous = {d for d in devices if agents.model_sha(d, "detector") == sha["2.0"]}
    listed = {d for d, (state, code) in outcome.items() if state == "revert_failed" and code}
    assert on_previous | listed == set(devices), outcome
    assert on_previous == set(devices), f"a failed revert is retried until it sticks: {outcome}"
