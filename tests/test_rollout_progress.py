"""Rollout progress: the state groups and progress buckets of ota.models.RolloutDevice are the one
definition the gates, the API, the web page and fleetctl show (a device that fails the health
gate, `unhealthy`, once showed as pending on the rollout page and was missing from its failures)."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from fleetctl.rollout import render
from ota.models import Device, RolloutDevice
from ota.rollouts.actions import rollout_start
from ota.rollouts.create import rollout_create
from ota.rollouts.engine import rollout_evaluate
from tests.support import web_data
from tests.support.registry_api import API

pytestmark = pytest.mark.django_db

RD = RolloutDevice.State


@pytest.fixture
def running(db):
    """A started rollout of 6 devices in one wave, every device directed."""
    web_data.released("detector", "2.0.0", hardware_ids=("jetson-orin",))
    Device.objects.bulk_create(
        [Device(id=f"cam-{i}", hardware_id="jetson-orin", labels={"site": "berlin"}, mqtt_username=f"cam-{i}",
                online=True) for i in range(6)]
    )
    rollout = rollout_create(
        model="detector", version="2.0.0", target={"labels": {"site": "berlin"}}, waves=[{"percent": 100}],
        gates={"failure": {"min_reports": 10}}, actor="user:x",
    )
    rollout_start(rollout_id=rollout.pk, actor="user:x")
    rollout_evaluate(rollout_id=rollout.pk)
    return rollout


def set_states(rollout, *states_and_codes):
    rows = list(RolloutDevice.objects.filter(rollout=rollout).order_by("rank"))
    for row, (state, code) in zip(rows, states_and_codes):
        RolloutDevice.objects.filter(pk=row.pk).update(state=state, error_code=code)
    return [r.device_id for r in rows]


def test_it_puts_every_device_state_in_exactly_one_progress_bucket():
    placed = [s for _, _, states in RolloutDevice.PROGRESS_BUCKETS for s in states]
    assert sorted(placed) == sorted(RD.values)
    assert set(RolloutDevice.FAILURES) <= set(RolloutDevice.PROBLEMS) <= set(RolloutDevice.FINISHED)
    assert not set(RolloutDevice.IN_FLIGHT) & set(RolloutDevice.FINISHED)
    assert RD.UNHEALTHY in RolloutDevice.FAILURES


def test_it_shows_an_unhealthy_device_as_failed_on_the_rollout_page(client, viewer, running):
    devices = set_states(running, (RD.UNHEALTHY, "HEALTH_GATE"), (RD.COMMITTED, ""))
    client.force_login(viewer)

    html = client.get(reverse("web:rollout_live", args=[running.pk])).content.decode()

    wave0 = html[html.index('data-wave="0"'):]
    counts = dict(re.findall(r'data-state="(\w+)"><i class="s-\w+"></i>[\w ]+ <b data-count>(\d+)</b>', wave0))
    assert counts["failed"] == "1" and counts["healthy"] == "1" and counts["pending"] == "0"
    assert re.search(rf'<span class="badge bad">HEALTH_GATE</span> <b>1</b> device:\s*<a href="/devices/{devices[0]}/">',
                     html)


def test_it_returns_failed_and_in_flight_counts_from_the_api(client, read_token, running):
    set_states(running, (RD.UNHEALTHY, "HEALTH_GATE"), (RD.TIMED_OUT, "TIMEOUT_TRIAL"), (RD.COMMITTED, ""),
               (RD.TRIAL, ""), (RD.DOWNLOADING, ""))

    data = client.get(f"{API}/rollouts/{running.pk}/", **read_token.headers).json()

    wave = data["waves"][0]
    assert (wave["committed"], wave["failed"], wave["in_flight"], wave["waiting"]) == (1, 2, 3, 0)
    assert data["progress"] == {"committed": 1, "failed": 2, "in_flight": 3, "waiting": 0, "unreachable": 0,
                                "skipped": 0, "waiting_for_window": 0}


def test_it_has_fleetctl_show_the_servers_counts_not_its_own_copy_of_the_states():
    # A state fleetctl has never heard of still counts where the server says it does.
    rollout = {
        "id": 7, "model": "detector", "version": "2.0.0", "state": "running", "state_reason": "",
        "waves": [{"index": 0, "name": "canary", "spec": {"count": 6}, "state": "running", "size": 6,
                   "counts": {"committed": 1, "quarantined": 2, "directed": 3},
                   "committed": 1, "failed": 2, "in_flight": 3, "waiting": 0}],
    }

    line = render(rollout)[1]

    assert "1/6 ok  2 failed  3 updating" in line
