"""Least privilege: a device token reads only the manifests and artifacts of releases directed to
it; upload file names every agent would refuse are refused at upload; the agent sends its token
only to the server it enrolled with; rollouts and reverts refuse revoked or expired releases."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from agent.download import fetch
from ota.models import Directive, RolloutDevice
from registry.models import Artifact, ModelVersion
from tests.support.agent_harness import ArtifactServer
from tests.support.fleet import enroll_device, record_directive
from tests.support.registry_api import create_version, upload, version_url
from tests.support.rollout_data import act, create_rollout, make_devices, release

pytestmark = pytest.mark.django_db
API = "/api/v1"


def code_of(response) -> str:
    return response.json()["error"]["code"]


@pytest.fixture
def two_models(client, admin_token):
    release(client, admin_token, "detector", "1.0", hardware=("rpi4",))
    release(client, admin_token, "classifier", "1.0", hardware=("rpi4",))


def test_it_lets_a_device_token_read_only_what_was_directed_to_it(client, two_models, settings):
    settings.MQTT_BROKER_AUTH = "none"  # a device row and its token; no broker in this test
    enrolled = enroll_device(hardware_id="rpi4")
    auth = {"HTTP_AUTHORIZATION": f"Bearer {enrolled.api_token}"}
    manifest = f"{version_url('detector', '1.0')}/manifest"
    download = f"{version_url('detector', '1.0')}/artifacts/rpi4/download"

    before = [client.get(manifest, **auth), client.get(download, **auth)]
    record_directive(device=enrolled.device, version=ModelVersion.objects.get(model__name="detector"))
    after = [client.get(manifest, **auth), client.get(download, **auth)]
    other = client.get(f"{version_url('classifier', '1.0')}/manifest", **auth)
    other_download = client.get(f"{version_url('classifier', '1.0')}/artifacts/rpi4/download", **auth)
    elsewhere = [client.get(f"{API}/{path}", **auth) for path in ("models/", "keys/", "audit/", "rollouts/")]

    assert [(r.status_code, code_of(r)) for r in before] == [(403, "not_directed")] * 2
    assert [r.status_code for r in after] == [200, 200]
    assert (other.status_code, code_of(other)) == (403, "not_directed")
    assert (other_download.status_code, code_of(other_download)) == (403, "not_directed")
    assert [r.status_code for r in elsewhere] == [403] * 4


@pytest.mark.parametrize("name", [".hidden.onnx", ".onnx"])
def test_it_refuses_upload_file_names_every_agent_would_refuse(client, ci_token, two_models, name):
    create_version(client, ci_token, "detector", "2.0")
    response = upload(client, ci_token, "detector", "2.0", hardware="rpi4", data=b"x" * 64, file_name=name)
    assert response.status_code == 400 and code_of(response) == "invalid_file_name", response.content
    assert name in response.json()["error"]["message"]
    assert not Artifact.objects.filter(version__version="2.0").exists()


def test_it_sends_the_device_token_only_to_the_server_it_enrolled_with(tmp_path):
    data = b"weights" * 1000
    enrolled = ArtifactServer().start()
    foreign = ArtifactServer().start()
    try:
        foreign.add("/direct", data)
        foreign.add("/presigned", data)
        enrolled.add("/own", data)
        enrolled.redirects["/redirected"] = foreign.url("/presigned")
        for i, url in enumerate([enrolled.url("/own"), foreign.url("/direct"), enrolled.url("/redirected")]):
            fetch(url, tmp_path / f"{i}.part", length=len(data), token="mfd_secret",
                  server_url=enrolled.url(""), backoff=0.01, timeout=5)
        # Same host, other port: another origin, so no token either.
        fetch(foreign.url("/direct"), tmp_path / "x.part", length=len(data), token="mfd_secret",
              server_url=foreign.url("").replace(str(foreign.port), str(enrolled.port)), backoff=0.01, timeout=5)
    finally:
        enrolled.stop()
        foreign.stop()
    assert {r["authorization"] for r in enrolled.requests} == {"Bearer mfd_secret"}
    assert [r["path"] for r in foreign.requests] == ["/direct", "/presigned", "/direct"]
    assert {r["authorization"] for r in foreign.requests} == {None}


@pytest.fixture
def fleet(client, admin_token):
    release(client, admin_token, "detector", "1.0", hardware=("rpi4",))
    release(client, admin_token, "detector", "2.0", hardware=("rpi4",))
    return make_devices(4, hardware="rpi4", labels={"site": "berlin"}, prefix="rpi")


def definition(version: str = "2.0") -> dict:
    return {"model": "detector", "version": version, "target": {"labels": {"site": "berlin"}},
            "waves": [{"percent": 100}]}


def spoil(version: str, how: str) -> None:
    row = ModelVersion.objects.get(model__name="detector", version=version)
    if how == "revoked":
        row.state = ModelVersion.State.REVOKED
    else:
        row.expires_at = timezone.now() - timedelta(minutes=1)
    row.save()


@pytest.mark.parametrize("how", ["revoked", "expired"])
def test_it_refuses_a_new_rollout_of_a_revoked_or_expired_release(client, ci_token, fleet, how):
    spoil("2.0", how)
    response = create_rollout(client, ci_token, **definition())
    assert response.status_code == 409 and code_of(response) == f"release_{how}", response.content
    assert response.json()["error"]["release"] == "detector@2.0"


def test_it_refuses_to_start_a_rollout_whose_release_expired_since_it_was_created(client, ci_token, fleet):
    created = create_rollout(client, ci_token, **definition())
    assert created.status_code == 201, created.content
    spoil("2.0", "expired")
    response = act(client, ci_token, created.json()["id"], "start")
    assert response.status_code == 409 and code_of(response) == "release_expired", response.content


@pytest.mark.parametrize("how", ["revoked", "expired"])
def test_it_lists_devices_whose_previous_release_is_revoked_or_expired_instead_of_reverting_them(
    client, ci_token, operator_token, fleet, how
):
    created = create_rollout(client, ci_token, **definition())
    rollout_id = created.json()["id"]
    assert act(client, ci_token, rollout_id, "start").status_code == 200
    previous = ModelVersion.objects.get(model__name="detector", version="1.0")
    RolloutDevice.objects.filter(rollout_id=rollout_id).update(
        state=RolloutDevice.State.COMMITTED, previous_version=previous
    )
    spoil("1.0", how)

    response = act(client, operator_token, rollout_id, "rollback")

    assert response.status_code == 200, response.content
    assert not Directive.objects.filter(rollout_id=rollout_id, kind=Directive.Kind.REVERT).exists()
    entry = client.get(f"{API}/audit/?object_id={rollout_id}&action=rollout.rollback", **ci_token.headers).json()
    detail = (entry["results"] if isinstance(entry, dict) else entry)[0]["detail"]
    assert detail["revert_directives"] == 0
    refused = sorted(detail["previous_release_refused"], key=lambda r: r["device"])
    assert refused == [{"device": d, "code": f"release_{how}"} for d in fleet]
    assert set(RolloutDevice.objects.filter(rollout_id=rollout_id).values_list("detail", flat=True)) == {
        f"cannot revert: the previous release is {how}"
    }


def test_it_shows_a_release_expiring_within_30_days_and_an_expired_one_on_the_version_page(client, viewer, fleet):
    client.force_login(viewer)
    row = ModelVersion.objects.get(model__name="detector", version="2.0")
    pages = {}
    for label, left in (("later", timedelta(days=200)), ("soon", timedelta(days=10)), ("expired", -timedelta(hours=1))):
        ModelVersion.objects.filter(pk=row.pk).update(expires_at=timezone.now() + left)
        response = client.get("/registry/detector/versions/2.0/")
        assert response.status_code == 200
        pages[label] = response.content.decode()
    assert "data-expiry" not in pages["later"]
    assert 'data-expiry="soon"' in pages["soon"] and "expires within 30 days" in pages["soon"]
    assert 'data-expiry="expired"' in pages["expired"] and "rollouts and reverts to it are refused" in pages["expired"]
