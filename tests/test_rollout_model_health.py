"""Model-aware rollouts end to end: real agents, each beside a real app process that reports its
model's latency as StatsD lines, and the real server processes (ingest, Celery worker and beat).

A release 40 % slower than the one it replaces passes every device's precheck and trial (the
agents have no latency limit of their own), yet the canary's control-group gate compares it with
the boxes still on the old release and the rollout is reverted at the canary; a release as good
as the old one passes and completes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ota.models import Rollout, RolloutDevice
from registry.models import Artifact, AuditEntry
from tests.support.fleet_agents import Agents, wait_until
from tests.support.net import free_port
from tests.support.platform import REPO
from tests.support.rollout_data import act, create_rollout, health_for, release

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

API = "/api/v1"
MODELS = {"1.0": (2.0, 1.0), "2.0": (3.0, 0.5), "3.0": (4.0, 0.0)}


@pytest.fixture
def agents(server_platform, tmp_path):
    fleet = Agents(tmp_path / "agents", server_platform.env)
    yield fleet
    fleet.stop_all()


@pytest.fixture
def apps():
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def started(client, ci_token, version: str, waves, gates: dict) -> int:
    response = create_rollout(client, ci_token, model="detector", version=version, target={"labels": {"site": "berlin"}},
                              waves=waves, gates=gates, abort_policy="revert")
    assert response.status_code == 201, response.content
    rid = response.json()["id"]
    assert act(client, ci_token, rid, "start").status_code == 200
    return rid


def test_it_reverts_a_slower_release_at_the_canary_and_passes_an_equally_good_one(
    client, admin_token, ci_token, server_platform, agents, apps, live_server
):
    for version, (scale, bias) in MODELS.items():
        release(client, admin_token, "detector", version, scale=scale, bias=bias, health=health_for(scale, bias))
    sha = {v: Artifact.objects.get(version__version=v).sha256 for v in MODELS}
    response = client.post(f"{API}/enrollment-tokens/", {"max_uses": 6, "name": "model health"},
                           content_type="application/json", **admin_token.headers)
    devices = agents.enroll(live_server.url, response.json()["token"], 6)
    slower = {sha["2.0"]: {"latency_ms": 14.0}}  # 1.0 and 3.0 serve at the app's default 10 ms
    for device_id in devices:
        port = free_port()
        agents.add_table(device_id, "metrics", {"statsd_listen": f"127.0.0.1:{port}"})
        agents.add_table(device_id, "telemetry", {"interval_seconds": 1})
        agents.start(device_id)
        apps.append(subprocess.Popen([sys.executable, "-m", "tests.support.statsd_app",
                                      str(agents.state_dir(device_id)), "detector", str(port), json.dumps(slower)],
                                     cwd=REPO))

    def rollout_state(rid):
        return Rollout.objects.get(pk=rid).state

    first = started(client, ci_token, "1.0", [{"percent": 100}], {"health": {"control": False}})
    wait_until(lambda: rollout_state(first) == "completed", 180, "1.0 everywhere", server_platform, agents)

    gates = {"soak_seconds": 2, "failure": {"min_reports": 1, "max_failed_percent": 50},
             "health": {"control": {"min_devices": 3, "min_requests": 100, "wait_seconds": 120}}}
    canary = devices[:3]
    slow = started(client, ci_token, "2.0", [{"name": "canary", "devices": canary}, {"percent": 100}], gates)
    wait_until(lambda: rollout_state(slow) == "aborted", 180, "the control-group gate to stop 2.0",
               server_platform, agents)
    rollout = Rollout.objects.get(pk=slow)
    assert "tripped its control-group gate: latency" in rollout.state_reason
    assert rollout.reverted_at is not None
    states = dict(RolloutDevice.objects.filter(rollout_id=slow).values_list("device_id", "state"))
    # The canary passed precheck and trial on every box: only the fleet-side comparison saw it.
    assert {states[d] for d in canary} <= {"reverting", "reverted"}
    assert {states[d] for d in devices[3:]} == {"skipped"}
    entry = AuditEntry.objects.get(object_type="rollout", object_id=str(slow), action="rollout.auto_revert")
    gate = entry.detail["control_gate"]
    assert gate["new_devices"] == 3 and gate["control_devices"] == 3
    assert 1.25 < gate["latency"]["p50"]["ratio"] < 1.6, gate
    wait_until(lambda: all(agents.model_sha(d, "detector") == sha["1.0"] for d in canary), 120,
               "the canary back on 1.0", server_platform, agents)

    good = started(client, ci_token, "3.0", [{"name": "canary", "devices": canary}, {"percent": 100}], gates)
    wait_until(lambda: rollout_state(good) == "completed", 240, "3.0 to pass and complete", server_platform, agents)
    # Wave 2 has no control group left (every other box runs 3.0 by then): only the canary's compared.
    passed = AuditEntry.objects.get(object_type="rollout", object_id=str(good), action="wave.control_gate")
    assert passed.detail["wave"] == 0 and passed.detail["verdict"] == "pass" and passed.detail["new_devices"] == 3
    assert 0.8 < passed.detail["latency"]["p50"]["ratio"] < 1.2
    assert all(agents.model_sha(d, "detector") == sha["3.0"] for d in devices)
