"""Maintenance windows end to end (issue 15's acceptance): real agents on 1.0, the real server
processes (ingest, Celery worker and beat), and a rollout of 2.0 whose window opens two minutes
after the rollout is created, in Berlin time.

Every device downloads, verifies and prechecks at once and waits with 1.0 still running; each
activates only after the window opened, by its own journal's clock; a box that is down while the
window is open (kill -9 before it, back after it closed) reports its next opening and activates in
the next window; the activate timeout (60 s, shorter than the wait) never fires, and the rollout
completes."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from agent.protocol import parse_time, utcnow
from ota.models import Rollout, RolloutDevice
from registry.models import Artifact, AuditEntry
from tests.support.fleet_agents import Agents, wait_until
from tests.support.rollout_data import act, create_rollout, health_for, release

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

API = "/api/v1"
BERLIN = ZoneInfo("Europe/Berlin")


@pytest.fixture
def agents(server_platform, tmp_path):
    fleet = Agents(tmp_path / "agents", server_platform.env)
    yield fleet
    fleet.stop_all()


def berlin_window(start: datetime, seconds: int) -> str:
    end = start + timedelta(seconds=seconds)
    return f"{start.astimezone(BERLIN):%H:%M:%S}-{end.astimezone(BERLIN):%H:%M:%S} Europe/Berlin"


def activated(agents: Agents, device_id: str) -> datetime:
    import json

    journal = json.loads((agents.state_dir(device_id) / "journal.json").read_text())
    return parse_time(journal["models"]["detector"]["activated"], "activated")


def test_it_prepares_at_once_activates_in_the_window_and_completes_without_timeouts(
    client, admin_token, ci_token, server_platform, agents, live_server
):
    for version, (scale, bias) in {"1.0": (2.0, 1.0), "2.0": (3.0, 0.5)}.items():
        release(client, admin_token, "detector", version, scale=scale, bias=bias, health=health_for(scale, bias))
    sha2 = Artifact.objects.get(version__version="2.0").sha256
    token = client.post(f"{API}/enrollment-tokens/", {"max_uses": 3, "name": "windows"},
                        content_type="application/json", **admin_token.headers).json()["token"]
    devices = agents.enroll(live_server.url, token, 3)
    for device_id in devices:
        agents.start(device_id)
    target = {"labels": {"site": "berlin"}}
    first = create_rollout(client, ci_token, model="detector", version="1.0", target=target, waves=[{"percent": 100}],
                           gates={"soak_seconds": 1})
    assert act(client, ci_token, first.json()["id"], "start").status_code == 200
    wait_until(lambda: Rollout.objects.get(pk=first.json()["id"]).state == "completed", 120, "1.0 everywhere",
               server_platform, agents)

    created = utcnow().replace(microsecond=0)
    opens, closes = created + timedelta(seconds=120), created + timedelta(seconds=145)
    opens_again = created + timedelta(seconds=165)
    windows = [berlin_window(opens, 25), berlin_window(opens_again, 60)]
    response = create_rollout(client, ci_token, model="detector", version="2.0", target=target,
                              waves=[{"percent": 100}], windows=windows,
                              gates={"soak_seconds": 1, "timeouts": {"activate_seconds": 60}})
    assert response.status_code == 201, response.content
    rid = response.json()["id"]
    assert act(client, ci_token, rid, "start").status_code == 200

    def states():
        return dict(RolloutDevice.objects.filter(rollout_id=rid).values_list("device_id", "state"))

    wait_until(lambda: set(states().values()) == {"waiting_for_window"}, 90, "every device prepared and waiting",
               server_platform, agents)
    assert utcnow() < opens, "the machine was too slow to see the wait"
    rows = client.get(f"{API}/rollouts/{rid}/devices/", **ci_token.headers).json()["results"]
    assert {parse_time(r["window_opens_at"].replace("+00:00", "Z"), "opens") for r in rows} == {opens}
    summary = client.get(f"{API}/rollouts/{rid}/", **ci_token.headers).json()["waiting_for_window"]
    assert summary["devices"] == 3
    for device_id in devices:  # downloaded at once, not switched
        assert (agents.state_dir(device_id) / "store" / sha2 / "model.onnx").exists()
        assert agents.model_sha(device_id, "detector") != sha2

    offline = devices[2]
    agents.kill(offline)  # down while the first window is open
    wait_until(lambda: utcnow() >= closes + timedelta(seconds=2), 150, "the first window to close",
               server_platform, agents)
    agents.start(offline)
    wait_until(lambda: RolloutDevice.objects.get(rollout_id=rid, device_id=offline).window_opens_at == opens_again,
               60, "the box that was down reports its next opening", server_platform, agents)
    for device_id in devices[:2]:
        assert opens <= activated(agents, device_id) < closes
        assert agents.model_sha(device_id, "detector") == sha2
    assert agents.model_sha(offline, "detector") != sha2

    wait_until(lambda: Rollout.objects.get(pk=rid).state == "completed", 120, "2.0 everywhere",
               server_platform, agents)
    assert activated(agents, offline) >= opens_again
    assert set(states().values()) == {"committed"}
    assert not AuditEntry.objects.filter(object_type="rollout", object_id=str(rid), action="devices.timeout").exists()
