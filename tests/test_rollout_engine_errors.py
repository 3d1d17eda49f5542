"""The engine never crashes on a stored definition: a rollout whose evaluation raises is paused
with the exception in its audit log (never left "running", locking its devices out of other
rollouts), and the other rollouts of the same tick are still evaluated. The Celery task runs in
process (its function called directly), as the beat tick's loop calls it for each due rollout."""

from __future__ import annotations

from unittest import mock

import pytest
from django.db import OperationalError

from ota.models import Rollout, Wave
from ota.rollouts import engine
from ota.rollouts.actions import rollout_start
from ota.rollouts.create import rollout_create
from ota.rollouts.definition import gates_with_defaults
from ota.rollouts.engine import rollouts_due
from ota.rollouts.gates import wave_figures
from ota.rollouts.tasks import evaluate_rollout
from registry.models import AuditEntry
from tests.support.rollout_data import make_devices, release

pytestmark = pytest.mark.django_db


@pytest.fixture
def two_running(client, admin_token):
    """Two running rollouts of one release, on disjoint devices (site a, site b)."""
    release(client, admin_token, "detector", "2.0")
    make_devices(3, labels={"site": "a"}, prefix="a")
    make_devices(3, labels={"site": "b"}, prefix="b")
    ids = []
    for site in ("a", "b"):
        rollout = rollout_create(model="detector", version="2.0", target={"labels": {"site": site}},
                                 waves=[{"percent": 100}], actor="test")
        rollout_start(rollout_id=rollout.pk, actor="test")
        ids.append(rollout.pk)
    return ids


def tick():
    """What the beat's rollout_tick does for each due rollout (in process, without Redis)."""
    return {rid: evaluate_rollout(rid, catch_up=True) for rid in sorted(rollouts_due())}


def engine_errors(rollout_id):
    return AuditEntry.objects.filter(object_type="rollout", object_id=str(rollout_id), action="rollout.engine_error")


def test_it_pauses_a_stored_definition_with_an_absurd_timeout_and_evaluates_the_others(two_running, client, read_token):
    broken, healthy = two_running
    # As an old database would hold it: written past every entry's validation.
    gates = gates_with_defaults(Wave.objects.get(rollout_id=broken).gates)
    gates["timeouts"]["delivery_seconds"] = 10**11
    gates["soak_seconds"] = 10**11
    Wave.objects.filter(rollout_id=broken).update(gates=gates)

    outcomes = tick()

    assert outcomes[broken] == "engine-error"
    assert outcomes[healthy] == "dispatched"
    rollout = Rollout.objects.get(pk=broken)
    assert rollout.state == Rollout.State.PAUSED
    assert "OverflowError" in rollout.state_reason
    entry = engine_errors(broken).get()
    assert entry.actor == "system"
    assert entry.detail["error"] == "OverflowError"
    assert entry.detail["step"] == "evaluation"
    assert entry.detail["message"]
    # The step rolled back as a whole: the broken rollout's wave did not half-start.
    assert Wave.objects.get(rollout_id=broken).state == Wave.State.PENDING
    assert Wave.objects.get(rollout_id=healthy).state == Wave.State.RUNNING
    assert Rollout.objects.get(pk=healthy).state == Rollout.State.RUNNING
    # Paused, it is no longer due: the next tick leaves it alone instead of failing again.
    assert tick() == {healthy: "idle"}
    assert engine_errors(broken).count() == 1
    # Its page and its API answer show why.
    detail = client.get(f"/api/v1/rollouts/{broken}/", **read_token.headers)
    assert detail.status_code == 200 and detail.json()["state"] == "paused"
    assert "OverflowError" in detail.json()["state_reason"]


def test_it_pauses_the_rollout_whose_evaluation_raises_in_any_project_function(two_running):
    broken, healthy = two_running

    def figures_or_boom(wave):
        if wave.rollout_id == broken:
            raise RuntimeError("figures unavailable for this wave")
        return wave_figures(wave)

    with mock.patch.object(engine, "wave_figures", autospec=True, side_effect=figures_or_boom) as patched:
        outcomes = tick()
    assert patched.call_count >= 2
    assert outcomes == {broken: "engine-error", healthy: "dispatched"}
    assert Rollout.objects.get(pk=broken).state == Rollout.State.PAUSED
    entry = engine_errors(broken).get()
    assert entry.detail["error"] == "RuntimeError"
    assert entry.detail["message"] == "figures unavailable for this wave"
    assert "RuntimeError: figures unavailable" in entry.reason
    assert not engine_errors(healthy).exists()


def test_it_leaves_a_rollout_running_when_the_database_is_unreachable(two_running):
    """An OperationalError is the database's, not the rollout's: the task retries it."""
    broken, _ = two_running
    with mock.patch.object(engine, "wave_figures", autospec=True, side_effect=OperationalError("connection lost")):
        with pytest.raises(OperationalError):
            engine.rollout_evaluate(rollout_id=broken)
    assert Rollout.objects.get(pk=broken).state == Rollout.State.RUNNING
    assert not engine_errors(broken).exists()
