"""Artifact downloads: exact bytes, HTTP Range for resumable fetches, read or device scope,
410 for revoked versions."""

from __future__ import annotations

import pytest

from tests.support.onnx_models import linear_model
from tests.support.registry_api import create_hardware, create_model, create_version, upload, version_url

pytestmark = pytest.mark.django_db

DATA = linear_model(padding_bytes=600_000)
URL = f"{version_url('detector', '1.0')}/artifacts/rpi5/download"


@pytest.fixture
def released(client, ci_token):
    create_hardware(client, ci_token, "rpi5")
    create_model(client, ci_token, "detector")
    create_version(client, ci_token, "detector", "1.0")
    assert upload(client, ci_token, "detector", "1.0", hardware="rpi5", data=DATA).status_code == 201
    assert client.post(f"{version_url('detector', '1.0')}/release", **ci_token.headers).status_code == 200


def body(response) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


def test_it_streams_the_whole_file(client, read_token, released):
    response = client.get(URL, **read_token.headers)
    assert response.status_code == 200 and response.streaming
    assert body(response) == DATA
    assert response["Content-Length"] == str(len(DATA))
    assert response["Accept-Ranges"] == "bytes"
    assert 'filename="model.onnx"' in response["Content-Disposition"]


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=0-99", 0, 99),
        ("bytes=1000-", 1000, len(DATA) - 1),
        ("bytes=-500", len(DATA) - 500, len(DATA) - 1),
        (f"bytes=10-{len(DATA) + 1000}", 10, len(DATA) - 1),
    ],
)
def test_it_serves_byte_ranges(client, read_token, released, header, first, last):
    response = client.get(URL, HTTP_RANGE=header, **read_token.headers)
    assert response.status_code == 206
    assert response["Content-Range"] == f"bytes {first}-{last}/{len(DATA)}"
    assert response["Content-Length"] == str(last - first + 1)
    assert body(response) == DATA[first : last + 1]


def test_it_answers_416_for_an_unsatisfiable_range(client, read_token, released):
    response = client.get(URL, HTTP_RANGE=f"bytes={len(DATA)}-", **read_token.headers)
    assert response.status_code == 416
    assert response["Content-Range"] == f"bytes */{len(DATA)}"


def test_it_sends_everything_when_if_range_names_other_bytes(client, read_token, released):
    response = client.get(
        URL, HTTP_RANGE="bytes=0-9", HTTP_IF_RANGE='"' + "0" * 64 + '"', **read_token.headers
    )
    assert response.status_code == 200 and body(response) == DATA


def test_it_lets_a_device_download_what_it_was_directed_to_but_nothing_else(client, released, settings):
    from registry.models import ModelVersion
    from tests.support.fleet import enroll_device, record_directive

    settings.MQTT_BROKER_AUTH = "none"  # a device row and its token; no broker in this test
    enrolled = enroll_device(hardware_id="rpi5")
    auth = {"HTTP_AUTHORIZATION": f"Bearer {enrolled.api_token}"}
    assert client.get(URL, **auth).status_code == 403  # not directed to this release yet
    record_directive(device=enrolled.device, version=ModelVersion.objects.get(version="1.0"))

    download = client.get(URL, HTTP_RANGE="bytes=0-9", **auth)
    manifest = client.get(f"{version_url('detector', '1.0')}/manifest", **auth)
    listing = client.get("/api/v1/models/", **auth)

    assert download.status_code == 206 and body(download) == DATA[:10]
    assert manifest.status_code == 200
    assert listing.status_code == 403


def test_it_answers_404_for_hardware_without_an_artifact(client, read_token, released):
    response = client.get(URL.replace("rpi5", "jetson"), **read_token.headers)
    assert response.status_code == 404 and response.json()["error"]["code"] == "artifact_not_found"


def test_it_refuses_downloads_of_a_revoked_version_with_410(client, read_token, admin_token, released):
    client.post(f"{version_url('detector', '1.0')}/revoke", **admin_token.headers)
    response = client.get(URL, **read_token.headers)
    assert response.status_code == 410
    assert response.json()["error"]["code"] == "version_revoked"


def test_it_gives_devices_this_servers_download_url(released, settings):
    from registry.downloads import artifact_download_url
    from registry.models import Artifact

    settings.PUBLIC_URL = "https://fleet.example"
    assert artifact_download_url(artifact=Artifact.objects.get()) == f"https://fleet.example{URL}"
