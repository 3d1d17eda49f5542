"""Devices API: filters, detail (per-model active release and history), revoke."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from agent.protocol import Topics, client_id
from ota.models import ActiveRelease, Device, DeviceModelState
from tests.support.broker_auth import MqttProbe
from tests.support.fleet import enroll_device, record_directive, release_rows

API = "/api/v1"
T = Topics("fleet")


def _ids(response) -> list[str]:
    assert response.status_code == 200, response.content
    return [d["id"] for d in response.json()["results"]]


@pytest.fixture
def fleet(db, settings):
    settings.MQTT_BROKER_AUTH = "none"  # these tests need rows, not broker credentials
    eu = enroll_device(labels={"site": "eu", "tier": "gold"}, name="eu-1").device
    us = enroll_device(labels={"site": "us"}, name="us-1").device
    jet = enroll_device(hardware_id="jetson-orin", labels={"site": "eu"}, name="jet-1").device
    v1, a1 = release_rows(version="1.0", counter=1)
    v2, a2 = release_rows(version="2.0", counter=2)
    now = timezone.now()
    DeviceModelState.objects.create(device=eu, model=v2.model, active_version=v2, active_sha256=a2.sha256,
                                    last_state="committed", last_seq=3)
    DeviceModelState.objects.create(device=us, model=v1.model, active_version=v1, active_sha256=a1.sha256,
                                    last_state="failed", last_error_code="PRECHECK_FAILED", last_seq=2)
    ActiveRelease.objects.create(device=eu, model=v1.model, version=v1, sha256=a1.sha256,
                                 from_time=now - timedelta(days=2), to_time=now - timedelta(hours=1))
    ActiveRelease.objects.create(device=eu, model=v2.model, version=v2, sha256=a2.sha256,
                                 from_time=now - timedelta(hours=1))
    Device.objects.filter(pk__in=[eu.pk, jet.pk]).update(online=True, last_seen=now)
    return {"eu": eu, "us": us, "jet": jet, "v1": v1, "v2": v2, "a2": a2}


def test_it_filters_devices_by_label_hardware_model_version_and_online(client, read_token, fleet):
    eu, us, jet = fleet["eu"].id, fleet["us"].id, fleet["jet"].id
    get = lambda q: client.get(f"{API}/devices/?{q}", **read_token.headers)  # noqa: E731
    assert sorted(_ids(get(""))) == sorted([eu, us, jet])
    assert sorted(_ids(get("label=site=eu"))) == sorted([eu, jet])
    assert _ids(get("label=site=eu&label=tier=gold")) == [eu]
    assert _ids(get("label=tier")) == [eu]
    assert _ids(get("hardware=jetson-orin")) == [jet]
    assert _ids(get("model=detector&version=2.0")) == [eu]
    assert _ids(get("model=detector&version=1.0")) == [us]
    assert sorted(_ids(get("model=detector"))) == sorted([eu, us])
    assert sorted(_ids(get("online=true"))) == sorted([eu, jet])
    assert _ids(get("online=false")) == [us]
    assert _ids(get("online=true&label=site=eu&hardware=rpi4-arm64")) == [eu]


def test_it_paginates_the_device_list(client, read_token, fleet):
    body = client.get(f"{API}/devices/?limit=2", **read_token.headers).json()
    assert body["count"] == 3 and len(body["results"]) == 2 and body["next"]
    rest = client.get(body["next"], **read_token.headers).json()
    assert len(rest["results"]) == 1
    assert {d["id"] for d in body["results"] + rest["results"]} == {fleet[k].id for k in ("eu", "us", "jet")}


@pytest.mark.parametrize(
    "query, message",
    [
        ("version=2.0", "the version filter needs a model filter"),
        ("online=maybe", "online must be true or false"),
        ("state=lost", "state must be one of"),
        ("label==x", "is not key=value or key"),
    ],
)
def test_it_rejects_bad_filters_with_specific_messages(client, read_token, fleet, query, message):
    response = client.get(f"{API}/devices/?{query}", **read_token.headers)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_filter"
    assert message in response.json()["error"]["message"]


def test_it_shows_per_model_active_release_and_history(client, read_token, fleet):
    body = client.get(f"{API}/devices/{fleet['eu'].id}/", **read_token.headers).json()
    assert body["labels"] == {"site": "eu", "tier": "gold"} and body["hardware"] == "rpi4-arm64"
    assert body["models"] == [
        {"model": "detector", "active_version": "2.0", "active_sha256": fleet["a2"].sha256, "last_state": "committed",
         "last_error_code": "", "last_seq": 3, "last_rollout_id": "", "updated_at": body["models"][0]["updated_at"]}
    ]
    assert [(h["version"], h["to_time"] is None) for h in body["history"]] == [("2.0", True), ("1.0", False)]
    assert client.get(f"{API}/devices/dev-missing/", **read_token.headers).status_code == 404


def test_it_requires_read_scope_and_admin_to_revoke(client, fleet, operator_token):
    assert client.get(f"{API}/devices/").status_code == 401
    response = client.post(f"{API}/devices/{fleet['eu'].id}/revoke", **operator_token.headers)
    assert response.status_code == 403 and "admin" in response.json()["error"]["message"]
    assert Device.objects.get(pk=fleet["eu"].id).state == "active"


@pytest.mark.django_db(transaction=True)
def test_it_revokes_a_device_session_directive_and_download_token(client, admin_token, secure_broker):
    enrolled = enroll_device()
    device = enrolled.device
    version, _artifact = release_rows()
    record_directive(device=device, version=version)
    download = f"{API}/models/detector/versions/1.0/artifacts/rpi4-arm64/download"
    bearer = {"HTTP_AUTHORIZATION": f"Bearer {enrolled.api_token}"}
    ok = client.get(download, **bearer)
    assert ok.status_code == 200, ok.content
    assert b"".join(ok.streaming_content) == b"detector-1.0-weights" * 64

    service = MqttProbe(secure_broker.port, secure_broker.username, secure_broker.password)
    assert service.connect()
    service.publish(T.directive(device.id, "detector"), b"a-directive", retain=True)
    live = MqttProbe(secure_broker.port, device.id, enrolled.mqtt_password, client_id=client_id(device.id))
    assert live.connect()
    try:
        response = client.post(f"{API}/devices/{device.id}/revoke", **admin_token.headers)
        assert response.status_code == 200, response.content
        assert response.json()["state"] == "revoked" and response.json()["revoked_at"]
        assert live.disconnected.wait(5), "the live broker session must be dropped"
        watcher = MqttProbe(secure_broker.port, secure_broker.username, secure_broker.password)
        assert watcher.connect()
        watcher.subscribe(T.directives(device.id))
        assert watcher.received(wait=1.0) == []
        watcher.close()
        denied = client.get(download, **bearer)
        assert denied.status_code == 401
        again = client.post(f"{API}/devices/{device.id}/revoke", **admin_token.headers)
        assert again.status_code == 200  # idempotent: retries the broker side
    finally:
        live.close()
        service.close()


@pytest.mark.parametrize("method, path", [
    ("get", "/devices/{eu}/"),
    ("get", "/devices/"),
    ("post", "/devices/{eu}/revoke"),
    ("get", "/rollouts/"),
    ("post", "/rollouts/"),
    ("get", "/audit/"),
    ("post", "/enrollment-tokens/"),
])
def test_it_keeps_a_device_of_another_fleet_out_of_fleet_data(client, fleet, other_fleet_device, method, path):
    url = API + path.format(eu=fleet["eu"].id)

    response = getattr(client, method)(url, {}, content_type="application/json", **other_fleet_device.headers)

    assert response.status_code == 403, response.content
    assert Device.objects.get(pk=fleet["eu"].id).state == "active"


def test_it_lets_a_device_token_fetch_artifacts_but_not_its_own_fleet_record(client, fleet, other_fleet_device):
    # The token exists for downloads (the proof it authenticates at all, so the 403s above are
    # about scope, not a dead token); device records are operator data, its own included.
    download = f"{API}/models/detector/versions/1.0/artifacts/rpi4-arm64/download"
    record_directive(device=other_fleet_device.device, version=fleet["v1"])
    assert client.get(download, **other_fleet_device.headers).status_code == 200
    own = client.get(f"{API}/devices/{other_fleet_device.device.id}/", **other_fleet_device.headers)
    assert own.status_code == 403


def test_it_refuses_a_device_token_a_release_it_was_not_directed_to(client, fleet, other_fleet_device):
    download = f"{API}/models/detector/versions/1.0/artifacts/rpi4-arm64/download"

    response = client.get(download, **other_fleet_device.headers)

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "not_directed"
    assert other_fleet_device.device.id in response.json()["error"]["message"]


def test_it_refuses_a_device_token_another_hardwares_artifact_of_its_release(client, fleet, other_fleet_device):
    record_directive(device=other_fleet_device.device, version=fleet["v1"])
    other_hw, _ = release_rows(version="1.0-x86", counter=3, hardware_id="x86-gpu")
    record_directive(device=other_fleet_device.device, version=other_hw, seq=2)

    response = client.get(f"{API}/models/detector/versions/1.0-x86/artifacts/x86-gpu/download",
                          **other_fleet_device.headers)

    assert response.status_code == 403 and response.json()["error"]["code"] == "not_directed"
