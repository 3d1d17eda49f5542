"""Complete audit: every change through the API, the web UI or the Django admin writes exactly one
audit entry with actor and the changed fields' before and after; the admin refuses deleting
directives, device events and open rollouts, and audits deleting a finished one."""

from __future__ import annotations

import json

import pytest

from ota.models import Device, DeviceEvent, Directive, EnrollmentToken, Rollout
from registry.models import ApiToken, AuditEntry, HardwareTarget, ModelVersion
from tests.support.fleet import record_directive
from tests.support.rollout_data import act, create_rollout, make_devices, release

pytestmark = pytest.mark.django_db
API = "/api/v1"


@pytest.fixture
def root(client, django_user_model, settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # speed only
    # force_login: client.login() calls authenticate() without a request, which django-axes refuses.
    client.force_login(django_user_model.objects.create_superuser("root", "root@example.com", "root-password-123"))
    return client


def audit(client, token, **query) -> list[dict]:
    response = client.get(f"{API}/audit/", query, **token.headers)
    assert response.status_code == 200, response.content
    body = response.json()
    return body["results"] if isinstance(body, dict) else body


def device_form(device: Device, **changes) -> dict:
    """The admin change form as a browser posts it (with the empty inline formsets' management forms)."""
    data = {"name": device.name, "labels": json.dumps(device.labels)}
    for prefix in ("model_states", "release_history"):
        data.update({f"{prefix}-TOTAL_FORMS": "0", f"{prefix}-INITIAL_FORMS": "0",
                     f"{prefix}-MIN_NUM_FORMS": "0", f"{prefix}-MAX_NUM_FORMS": "1000"})
    data.update(changes)
    return data


def test_it_shows_an_admin_edit_of_device_labels_in_the_audit_api_with_before_and_after(root, read_token):
    HardwareTarget.objects.create(id="rpi4", max_artifact_bytes=1 << 20)
    make_devices(1, hardware="rpi4", labels={"site": "berlin"}, prefix="rpi")
    device = Device.objects.get(pk="rpi-0000")

    response = root.post(f"/admin/ota/device/{device.pk}/change/",
                         device_form(device, labels=json.dumps({"site": "paris", "ring": "canary"})))
    unchanged = root.post(f"/admin/ota/device/{device.pk}/change/", device_form(Device.objects.get(pk=device.pk)))

    assert response.status_code == 302 and unchanged.status_code == 302, response.content
    assert Device.objects.get(pk=device.pk).labels == {"site": "paris", "ring": "canary"}
    entries = audit(root, read_token, object_type="device", object_id=device.pk)
    assert len(entries) == 1  # one per change; a save that changes nothing writes nothing
    entry = entries[0]
    assert entry["actor"] == "user:root" and entry["action"] == "device.change"
    assert entry["detail"]["before"] == {"labels": {"site": "berlin"}}
    assert entry["detail"]["after"] == {"labels": {"site": "paris", "ring": "canary"}}
    assert entry["detail"]["via"] == "admin"


def test_it_writes_one_entry_per_change_whichever_entry_point_made_it(root, admin_token, read_token):
    created = root.post(f"{API}/enrollment-tokens/", {"max_uses": 2, "name": "line 2"},
                        content_type="application/json", **admin_token.headers)
    assert created.status_code == 201, created.content
    token = EnrollmentToken.objects.get()
    edited = root.post(f"/admin/ota/enrollmenttoken/{token.pk}/change/",
                       {"name": "line 3", "max_uses": "5", "expires_at_0": "", "expires_at_1": "",
                        "default_labels": "{}"})
    revoked = root.post("/access/", {"kind": "revoke-enroll", "token_id": token.pk})  # the web UI
    hardware = HardwareTarget.objects.create(id="jetson", max_artifact_bytes=1000)
    budget = root.post("/admin/registry/hardwaretarget/jetson/change/",
                       {"description": "", "max_artifact_bytes": "2000"})
    api_token = ApiToken.objects.get(name="test-read")
    admin_revoke = root.post("/admin/registry/apitoken/", {"action": "revoke_selected", "_selected_action": [api_token.pk]})

    assert [r.status_code for r in (edited, revoked, budget, admin_revoke)] == [302] * 4, edited.content
    actions = [e["action"] for e in audit(root, admin_token, object_type="enrollment_token", object_id=token.pk)]
    assert sorted(actions) == ["enrollment_token.change", "enrollment_token.create", "enrollment_token.revoke"]
    change = AuditEntry.objects.get(action="enrollment_token.change")
    assert change.detail["before"] == {"name": "line 2", "max_uses": 2}
    assert change.detail["after"] == {"name": "line 3", "max_uses": 5}
    budget_entries = audit(root, admin_token, object_type="hardwaretarget", object_id=hardware.pk)
    assert [(e["action"], e["detail"]["before"], e["detail"]["after"]) for e in budget_entries] == [
        ("hardwaretarget.change", {"max_artifact_bytes": 1000}, {"max_artifact_bytes": 2000})
    ]
    assert [e["action"] for e in audit(root, admin_token, object_type="apitoken", object_id=api_token.pk)] == [
        "token.revoke"
    ]


@pytest.fixture
def rollout(client, admin_token):
    release(client, admin_token, "detector", "1.0", hardware=("rpi4",))
    make_devices(2, hardware="rpi4", labels={"site": "berlin"}, prefix="rpi")
    created = create_rollout(client, admin_token, model="detector", version="1.0",
                             target={"labels": {"site": "berlin"}}, waves=[{"percent": 100}])
    assert created.status_code == 201, created.content
    return Rollout.objects.get(pk=created.json()["id"])


def test_it_refuses_admin_deletes_of_directives_events_and_open_rollouts(root, admin_token, rollout):
    device = Device.objects.get(pk="rpi-0000")
    directive = record_directive(device=device, version=ModelVersion.objects.get())
    event = DeviceEvent.objects.create(device=device, model="detector", seq=1, event_no=0, state="committed")

    refused = [
        root.post(f"/admin/ota/directive/{directive.pk}/delete/", {"post": "yes"}),
        root.post(f"/admin/ota/deviceevent/{event.pk}/delete/", {"post": "yes"}),
        root.post(f"/admin/ota/rollout/{rollout.pk}/delete/", {"post": "yes"}),  # created: not finished
    ]
    bulk = root.post("/admin/ota/rollout/", {"action": "delete_selected", "_selected_action": [rollout.pk], "post": "yes"})

    assert [r.status_code for r in refused] == [403, 403, 403]
    assert Directive.objects.filter(pk=directive.pk).exists() and DeviceEvent.objects.filter(pk=event.pk).exists()
    assert Rollout.objects.filter(pk=rollout.pk).exists(), bulk.status_code
    assert not AuditEntry.objects.filter(action__endswith=".delete").exists()


def test_it_audits_the_admin_delete_of_a_finished_rollout_once(root, admin_token, rollout):
    assert act(root, admin_token, rollout.pk, "start").status_code == 200
    assert act(root, admin_token, rollout.pk, "abort").status_code == 200

    response = root.post(f"/admin/ota/rollout/{rollout.pk}/delete/", {"post": "yes"})

    assert response.status_code == 302, response.content
    assert not Rollout.objects.filter(pk=rollout.pk).exists()
    entries = audit(root, admin_token, object_type="rollout", object_id=rollout.pk, action="rollout.delete")
    assert len(entries) == 1 and entries[0]["actor"] == "user:root"
    assert entries[0]["detail"]["before"]["state"] == "aborted" and entries[0]["detail"]["after"] == {}


def test_it_checks_admin_label_edits_by_the_apis_rule_and_audits_nothing_refused(root):
    HardwareTarget.objects.create(id="rpi4", max_artifact_bytes=1 << 20)
    make_devices(1, hardware="rpi4", labels={"site": "berlin"}, prefix="rpi")
    device = Device.objects.get(pk="rpi-0000")

    for bad in ({"bad key!": "x"}, {"site": 3}, ["site"]):
        response = root.post(f"/admin/ota/device/{device.pk}/change/", device_form(device, labels=json.dumps(bad)))
        assert response.status_code == 200 and b"errorlist" in response.content, bad

    assert Device.objects.get(pk=device.pk).labels == {"site": "berlin"}
    assert not AuditEntry.objects.filter(object_type="device").exists()


def test_it_records_before_and_after_of_api_and_ui_changes(root, client, admin_token, rollout):
    """Not only the admin: an action through the API or the web UI says what it changed."""
    from unittest import mock

    def last(action):
        entry = AuditEntry.objects.filter(action=action).order_by("-id").first()
        return entry.detail["before"], entry.detail["after"]

    with mock.patch("ota.rollouts.actions.rollout_wake", autospec=True):
        assert act(client, admin_token, rollout.pk, "start").status_code == 200
        assert act(client, admin_token, rollout.pk, "pause", reason="night shift").status_code == 200
    before, after = last("rollout.pause")
    assert (before["state"], after["state"]) == ("running", "paused") and after["state_reason"] == "night shift"
    assert last("rollout.start")[0]["state"] == "created" and last("rollout.start")[1]["started_by"]

    response = client.post(f"{API}/models/detector/versions/1.0/deprecate", {}, content_type="application/json",
                           **admin_token.headers)
    assert response.status_code == 200, response.content
    assert last("version.deprecate") == ({"state": "released"}, {"state": "deprecated"})
    assert last("version.release")[0]["state"] == "draft" and last("version.release")[1]["state"] == "released"

    revoked = root.post("/devices/rpi-0001/revoke/", {"reason": "stolen"})  # the web UI
    assert revoked.status_code in (200, 302), revoked.content
    before, after = last("device.revoke")
    assert (before["state"], after["state"]) == ("active", "revoked") and after["revoked_by"]
