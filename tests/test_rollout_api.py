"""Rollout API contract: definitions, per-wave plan, incompatible devices, conflicts, scopes, 400s."""

from __future__ import annotations

import hashlib

import pytest

from ota.models import Rollout
from tests.support.rollout_data import act, create_rollout, make_devices, release

API = "/api/v1"
pytestmark = pytest.mark.django_db


@pytest.fixture
def fleet(client, admin_token):
    release(client, admin_token, "detector", "1.0", hardware=("rpi4", "jetson"))
    release(client, admin_token, "detector", "2.0", hardware=("rpi4",))
    release(client, admin_token, "detector", "3.0-draft", hardware=("rpi4",), released=False)
    release(client, admin_token, "classifier", "1.0", hardware=("rpi4",))
    rpi = make_devices(20, hardware="rpi4", labels={"site": "berlin"}, prefix="rpi")
    jet = make_devices(3, hardware="jetson", labels={"site": "berlin"}, prefix="jet")
    make_devices(4, hardware="rpi4", labels={"site": "paris"}, prefix="paris")
    return {"rpi": rpi, "jetson": jet}


def definition(**overrides):
    body = {
        "model": "detector",
        "version": "2.0",
        "target": {"labels": {"site": "berlin"}},
        "waves": [{"devices": ["rpi-0000", "rpi-0001"]}, {"percent": 25}, {"percent": 100}],
        "gates": {"success": {"min_healthy_percent": 90}, "failure": {"min_reports": 2, "max_failed_percent": 50}},
        "abort_policy": "revert",
    }
    body.update(overrides)
    return body


def test_it_plans_waves_by_stable_hash_and_lists_incompatible_devices(client, ci_token, fleet):
    response = create_rollout(client, ci_token, **definition())
    assert response.status_code == 201, response.content
    data = response.json()
    assert data["state"] == "created"
    assert [w["size"] for w in data["waves"]] == [2, 3, 15]  # 25 % of 20 compatible = 5 cumulative
    assert data["waves"][0]["name"] == "canary"
    assert sorted(d["device"] for d in data["incompatible"]) == fleet["jetson"]
    assert all("no artifact for hardware 'jetson'" in d["reason"] for d in data["incompatible"])
    assert data["totals"] == {"planned": 20}

    listing = client.get(f"{API}/rollouts/{data['id']}/devices/?wave=1", **ci_token.headers).json()
    wave1 = [row["device"] for row in listing["results"]]
    rest = sorted(set(fleet["rpi"]) - {"rpi-0000", "rpi-0001"},
                  key=lambda d: hashlib.sha256(f"{data['id']}:{d}".encode()).hexdigest())
    assert wave1 == rest[:3]

    audit = client.get(f"{API}/audit/?object_type=rollout&object_id={data['id']}", **ci_token.headers).json()
    assert [e["action"] for e in audit["results"]] == ["rollout.create"]
    assert audit["results"][0]["actor"] == "token:test-ci"
    assert audit["results"][0]["detail"]["wave_sizes"] == [2, 3, 15]


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"model": "nope"}, "model", "no model named 'nope'"),
        ({"version": "9.9"}, "version", "has no version '9.9'"),
        ({"version": "3.0-draft"}, "version", "only a released (signed) version"),
        ({"target": {}}, "target", "is empty"),
        ({"target": {"labels": {"site": "tokyo"}}}, "target", "matches no active device"),
        ({"target": {"hardware": ["jetson"]}, "waves": [{"percent": 100}]}, "target", "none of the 3 targeted devices"),
        ({"target": {"devices": ["ghost-1"]}}, "target.devices", "unknown or revoked devices: ghost-1"),
        ({"waves": [{"percent": 50}, {"percent": 25}]}, "waves[1].percent", "must increase: 25 follows 50"),
        ({"waves": [{"percent": 50}, {"percent": 50}]}, "waves[1].percent", "must increase"),
        ({"waves": [{"percent": 150}]}, "waves[0].percent", "between 0 and 100"),
        ({"waves": []}, "waves", "non-empty list"),
        ({"waves": [{"percent": 10, "count": 3}]}, "waves[0]", "exactly one of"),
        ({"waves": [{"devices": ["paris-0000"]}, {"percent": 100}]}, "waves[0].devices", "not in the compatible target: paris-0000"),
        ({"gates": {"success": {"min_healthy_percent": 120}}}, "gates.success.min_healthy_percent", "between 0 and 100, got 120"),
        ({"gates": {"failure": {"max_failed_percent": -1}}}, "gates.failure.max_failed_percent", "between 0 and 100"),
        ({"gates": {"failure": {"min_reports": 0}}}, "gates.failure.min_reports", "must be >= 1"),
        ({"gates": {"timeouts": {"trial_seconds": "soon"}}}, "gates.timeouts.trial_seconds", "must be an integer"),
        ({"gates": {"speed": 3}}, "gates.speed", "unknown gate setting"),
        ({"waves": [{"percent": 100, "gates": {"soak_seconds": -5}}]}, "waves[0].gates.soak_seconds", "must be >= 0"),
        ({"abort_policy": "explode"}, "abort_policy", "not a valid choice"),
    ],
)
def test_it_refuses_bad_definitions_with_specific_400s(client, ci_token, fleet, overrides, field, message):
    response = create_rollout(client, ci_token, **definition(**overrides))
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid"
    assert field in error["fields"], error
    assert message in str(error["fields"][field]), error


def test_it_refuses_a_device_in_two_running_rollouts_of_the_same_model(client, ci_token, operator_token, fleet):
    first = create_rollout(client, ci_token, **definition()).json()
    assert act(client, ci_token, first["id"], "start").status_code == 200
    response = create_rollout(client, ci_token, **definition(target={"devices": ["rpi-0003", "rpi-0004"]}, waves=[{"percent": 100}]))
    assert response.status_code == 409, response.content
    error = response.json()["error"]
    assert error["code"] == "device_in_running_rollout"
    assert error["conflicts"] == {str(first["id"]): ["rpi-0003", "rpi-0004"]}
    assert "rpi-0003" in error["message"]

    # Another model on the same devices is fine; so is the same model once the first has ended.
    other = create_rollout(client, ci_token, **definition(model="classifier", version="1.0",
                                                           target={"devices": ["rpi-0003"]}, waves=[{"percent": 100}]))
    assert other.status_code == 201, other.content
    second = create_rollout(client, ci_token, **definition(target={"devices": ["rpi-0003"]}, waves=[{"percent": 100}]))
    assert second.status_code == 409
    assert act(client, operator_token, first["id"], "abort", reason="wrong build").status_code == 200
    third = create_rollout(client, ci_token, **definition(target={"devices": ["rpi-0003"]}, waves=[{"percent": 100}]))
    assert third.status_code == 201, third.content


def test_it_refuses_to_start_two_created_rollouts_over_the_same_devices(client, ci_token, fleet):
    a = create_rollout(client, ci_token, **definition()).json()
    b = create_rollout(client, ci_token, **definition()).json()
    assert act(client, ci_token, a["id"], "start").status_code == 200
    response = act(client, ci_token, b["id"], "start")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "device_in_running_rollout"


def test_it_gives_ci_create_start_pause_and_abort_and_operators_the_rest(
    client, ci_token, read_token, operator_token, fleet
):
    assert create_rollout(client, read_token, **definition()).status_code == 403
    created = create_rollout(client, ci_token, **definition()).json()
    rid = created["id"]
    assert act(client, read_token, rid, "start").status_code == 403
    assert act(client, ci_token, rid, "start").json()["state"] == "running"
    assert act(client, ci_token, rid, "pause", reason="looking at graphs").json()["state"] == "paused"
    again = act(client, operator_token, rid, "pause")
    assert again.status_code == 409
    assert "it is paused" in again.json()["error"]["message"]
    for operators_only in ("resume", "advance", "retry", "rollback", "approve"):
        response = act(client, ci_token, rid, operators_only)
        assert response.status_code == 403, operators_only
        assert "'operator'" in response.json()["error"]["message"]
    assert act(client, operator_token, rid, "resume").json()["state"] == "running"
    assert act(client, ci_token, rid, "abort", reason="bad canary").json()["state"] == "aborted"
    detail = client.get(f"{API}/rollouts/{rid}/", **read_token.headers).json()
    assert detail["totals"] == {"skipped": 20}
    actions = [e["action"] for e in client.get(f"{API}/audit/?object_type=rollout&object_id={rid}", **read_token.headers).json()["results"]]
    assert actions == ["rollout.abort", "rollout.resume", "rollout.pause", "rollout.start", "rollout.create"]


def test_it_holds_a_rollout_that_requires_approval(client, ci_token, operator_token, fleet):
    rid = create_rollout(client, ci_token, **definition(requires_approval=True)).json()["id"]
    response = act(client, ci_token, rid, "start")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "approval_required"
    assert act(client, ci_token, rid, "approve").status_code == 403
    approved = act(client, operator_token, rid, "approve").json()
    assert approved["approved_by"] == "token:test-operator"
    assert act(client, ci_token, rid, "start").json()["state"] == "running"


def test_it_answers_404_for_an_unknown_rollout(client, operator_token):
    response = act(client, operator_token, 999999, "pause")
    assert response.status_code == 404
    assert "No rollout with id 999999" in response.json()["error"]["message"]


def test_it_shows_rollouts_in_the_django_admin_and_pauses_from_there(client, ci_token, fleet):
    from django.contrib.auth.models import User

    rid = create_rollout(client, ci_token, **definition()).json()["id"]
    act(client, ci_token, rid, "start")
    # force_login: client.login() calls authenticate() without a request, which django-axes refuses.
    client.force_login(User.objects.create_superuser("root", "root@example.com", "root-password-123"))
    assert client.get("/admin/ota/rollout/").status_code == 200
    page = client.get(f"/admin/ota/rollout/{rid}/change/")
    assert page.status_code == 200 and b"canary" in page.content
    assert client.get("/admin/ota/rolloutdevice/?state=planned").status_code == 200
    response = client.post("/admin/ota/rollout/", {"action": "pause_rollouts", "_selected_action": [rid]})
    assert response.status_code == 302
    detail = client.get(f"{API}/rollouts/{rid}/", **ci_token.headers).json()
    assert detail["state"] == "paused" and detail["state_reason"] == "paused from the admin"


@pytest.mark.django_db(transaction=True)
def test_it_starts_only_one_of_two_rollouts_started_at_the_same_moment(client, ci_token, fleet):
    """Two starts over the same devices in flight at once (two API workers): the second must see
    the first, not both pass the conflict check before either commits."""
    import threading
    from unittest import mock

    from django.db import connection, transaction

    from ota.rollouts.actions import rollout_start
    from registry.errors import Conflict

    a = create_rollout(client, ci_token, **definition()).json()["id"]
    b = create_rollout(client, ci_token, **definition()).json()["id"]
    first_started, release_first = threading.Event(), threading.Event()
    outcome = {}

    def start_and_hold():
        try:
            with transaction.atomic():
                rollout_start(rollout_id=a, actor="token:one")
                first_started.set()
                release_first.wait(10)  # still uncommitted while the second start runs
            outcome["a"] = "started"
        finally:
            connection.close()

    def start_second():
        try:
            rollout_start(rollout_id=b, actor="token:two")
            outcome["b"] = "started"
        except Conflict as exc:
            outcome["b"] = exc.detail
        finally:
            connection.close()

    with mock.patch("ota.rollouts.actions.rollout_wake", autospec=True):  # no engine in this test
        one = threading.Thread(target=start_and_hold)
        one.start()
        assert first_started.wait(10)
        two = threading.Thread(target=start_second)
        two.start()
        two.join(1.0)  # blocked behind the first start (or, without the lock, already through)
        release_first.set()
        one.join(10)
        two.join(10)

    assert outcome["a"] == "started"
    assert "already in a running rollout" in str(outcome["b"]), outcome
    assert Rollout.objects.get(pk=b).state == "created"


def test_it_takes_a_reason_on_every_action_and_writes_sentences_to_the_audit_log(
    client, operator_token, read_token, fleet, django_capture_on_commit_callbacks
):
    from unittest import mock

    from ota.rollouts.engine import rollout_evaluate
    from registry.models import AuditEntry

    rid = create_rollout(client, operator_token, **definition(requires_approval=True)).json()["id"]
    with mock.patch("ota.rollouts.actions.rollout_wake", autospec=True):  # the test drives the engine
        for action in ("approve", "start", "pause", "resume", "advance", "retry", "abort", "rollback"):
            response = act(client, operator_token, rid, action, reason=f"because of {action}")
            assert response.status_code == 200, (action, response.json())
            if action == "start":
                rollout_evaluate(rollout_id=rid)
    log = list(AuditEntry.objects.filter(object_type="rollout", object_id=str(rid)).order_by("id"))
    reasons = {e.action: e.reason for e in log}
    for action in ("approve", "start", "pause", "resume", "abort", "rollback"):
        assert reasons[f"rollout.{action}"] == f"because of {action}", action
    assert reasons["rollout.retry"].endswith(": because of retry")
    assert reasons["wave.pass"] == "Wave 1 passed: because of advance."
    # Automatic entries read as sentences, never as a Python dict of the wave's spec.
    assert reasons["wave.start"] == "Wave 1 (canary: 2 listed devices) started with 2 devices."
    assert all("{" not in e.reason for e in log), [e.reason for e in log]
