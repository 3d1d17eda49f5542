"""Release: the signed DSSE manifest verifies with the agent's verifier against the published key,
describes the exact bytes stored, and freezes the version for good."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import timedelta

import pytest

from agent.protocol import verify_release
from agent.signing import Keyring, VerificationError
from registry.models import Artifact, AuditEntry, ModelVersion
from tests.support.onnx_models import linear_model
from tests.support.registry_api import create_hardware, create_model, create_version, upload, version_url

pytestmark = pytest.mark.django_db

ORIN = linear_model(scale=2.0)
RPI = linear_model(scale=3.0)
HEALTH = {
    "inputs": {"x": {"dtype": "float32", "shape": [1, 4], "data": [1.0, 2.0, 3.0, 4.0]}},
    "outputs": {"y": {"dtype": "float32", "shape": [1, 4], "data": [3.0, 5.0, 7.0, 9.0]}},
    "atol": 1e-5,
    "rtol": 1e-4,
    "latency_budget_ms": 50,
}


@pytest.fixture
def draft(client, ci_token):
    create_hardware(client, ci_token, "jetson-orin")
    create_hardware(client, ci_token, "rpi5")
    create_model(client, ci_token, "detector")
    create_version(
        client,
        ci_token,
        "detector",
        "1.0.0",
        health=HEALTH,
        metadata={"dataset": "coco-mini"},
        provenance={
            "git_sha": "a" * 40,
            "ci_run_url": "https://ci.example/run/7",
            "training_run_id": "run-7",
        },
    )
    for hardware, data in (("jetson-orin", ORIN), ("rpi5", RPI)):
        assert upload(client, ci_token, "detector", "1.0.0", hardware=hardware, data=data).status_code == 201
    return ("detector", "1.0.0")


def release_keyring(client, token) -> Keyring:
    keys = client.get("/api/v1/keys/", **token.headers).json()
    return Keyring.from_pems(next(k["public_key_pem"] for k in keys if k["role"] == "release"))


def test_it_signs_a_manifest_the_agent_verifier_accepts(
    client, ci_token, read_token, draft, isolated_storage
):
    response = client.post(f"{version_url(*draft)}/release", **ci_token.headers)

    assert response.status_code == 200, response.content
    envelope = response.json()
    manifest = verify_release(envelope, release_keyring(client, read_token))
    assert (manifest.model, manifest.version, manifest.counter, manifest.rollback_floor) == (
        "detector",
        "1.0.0",
        1,
        0,
    )
    assert manifest.expires - manifest.created == timedelta(days=365)
    assert manifest.health == HEALTH
    assert manifest.provenance == {
        "git_sha": "a" * 40,
        "ci_run_url": "https://ci.example/run/7",
        "training_run_id": "run-7",
        "approver": "token:test-ci",
    }
    by_hardware = {a.hardware: a for a in manifest.artifacts}
    assert set(by_hardware) == {"jetson-orin", "rpi5"}
    for hardware, data in (("jetson-orin", ORIN), ("rpi5", RPI)):
        entry = by_hardware[hardware]
        stored = (isolated_storage / Artifact.objects.get(hardware_id=hardware).storage_key).read_bytes()
        assert stored == data
        assert (entry.sha256, entry.length) == (hashlib.sha256(data).hexdigest(), len(data))
        assert (entry.format, entry.file_name) == ("onnx", "model.onnx")

    payload = base64.b64decode(envelope["payload"])
    version = ModelVersion.objects.get(version="1.0.0")
    assert version.state == "released" and version.envelope == envelope
    assert version.manifest_sha256 == hashlib.sha256(payload).hexdigest() == response["X-Manifest-Sha256"]
    assert AuditEntry.objects.filter(action="version.release", object_id=str(version.pk)).exists()

    fetched = client.get(f"{version_url(*draft)}/manifest", **read_token.headers)
    assert fetched.status_code == 200 and fetched.json() == envelope


def test_it_refuses_a_tampered_truncated_or_wrongly_keyed_manifest(client, ci_token, read_token, draft):
    envelope = client.post(f"{version_url(*draft)}/release", **ci_token.headers).json()
    keys = {k["role"]: k["public_key_pem"] for k in client.get("/api/v1/keys/", **read_token.headers).json()}
    payload = base64.b64decode(envelope["payload"])

    tampered = json.loads(payload)
    tampered["artifacts"][0]["sha256"] = "f" * 64
    forged = {**envelope, "payload": base64.b64encode(json.dumps(tampered).encode()).decode()}
    truncated = {**envelope, "payload": base64.b64encode(payload[:-20]).decode()}

    with pytest.raises(VerificationError) as exc:
        verify_release(forged, Keyring.from_pems(keys["release"]))
    assert exc.value.code == "SIGNATURE_INVALID"
    with pytest.raises(VerificationError):
        verify_release(truncated, Keyring.from_pems(keys["release"]))
    with pytest.raises(VerificationError) as exc:
        verify_release(envelope, Keyring.from_pems(keys["rollout"]))
    assert exc.value.code == "UNKNOWN_KEY"


def test_it_freezes_a_released_version(client, ci_token, draft):
    client.post(f"{version_url(*draft)}/release", **ci_token.headers)

    again = client.post(f"{version_url(*draft)}/release", **ci_token.headers)
    assert again.status_code == 409 and again.json()["error"]["code"] == "version_immutable"
    create_hardware(client, ci_token, "x86")
    late = upload(client, ci_token, *draft, hardware="x86", data=ORIN)
    assert late.status_code == 409 and late.json()["error"]["code"] == "version_immutable"


def test_it_lets_no_admin_change_or_delete_a_released_artifact(client, ci_token, draft, django_user_model):
    client.post(f"{version_url(*draft)}/release", **ci_token.headers)
    # force_login: client.login() calls authenticate() without a request, which django-axes refuses.
    client.force_login(django_user_model.objects.create_superuser("root", "root@example.com", "root-password-123"))
    artifact = Artifact.objects.get(hardware_id="jetson-orin")
    version = artifact.version

    change = client.post(
        f"/admin/registry/artifact/{artifact.pk}/change/",
        {"sha256": "0" * 64, "length": 1, "file_name": "evil.onnx", "format": "onnx"},
    )
    assert change.status_code == 403
    assert client.post(f"/admin/registry/artifact/{artifact.pk}/delete/", {"post": "yes"}).status_code == 403
    assert (
        client.post(f"/admin/registry/modelversion/{version.pk}/delete/", {"post": "yes"}).status_code == 403
    )
    page = client.get(f"/admin/registry/modelversion/{version.pk}/change/")
    assert page.status_code == 200
    assert b'name="envelope"' not in page.content and b'name="artifacts-0-sha256"' not in page.content
    artifact.refresh_from_db()
    assert artifact.sha256 == hashlib.sha256(ORIN).hexdigest() and artifact.length == len(ORIN)
    assert Artifact.objects.count() == 2


def test_it_refuses_to_release_a_version_without_artifacts(client, ci_token, draft):
    create_version(client, ci_token, "detector", "2.0.0")
    response = client.post(f"{version_url('detector', '2.0.0')}/release", **ci_token.headers)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "no_artifacts"
    assert ModelVersion.objects.get(version="2.0.0").state == "draft"


def test_it_says_how_to_create_missing_keys(client, ci_token, draft, settings, tmp_path):
    settings.RELEASE_KEY_PATH = tmp_path / "nowhere" / "release.pem"
    response = client.post(f"{version_url(*draft)}/release", **ci_token.headers)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "signing_key_missing" and "manage.py keys init" in error["message"]
    assert ModelVersion.objects.get(version="1.0.0").state == "draft"


def test_it_has_no_manifest_for_a_draft(client, read_token, draft):
    response = client.get(f"{version_url(*draft)}/manifest", **read_token.headers)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_released"


def test_it_deprecates_and_revokes_as_states_with_the_admin_scope(client, ci_token, admin_token, draft):
    client.post(f"{version_url(*draft)}/release", **ci_token.headers)

    assert client.post(f"{version_url(*draft)}/revoke", **ci_token.headers).status_code == 403
    deprecated = client.post(f"{version_url(*draft)}/deprecate", **admin_token.headers)
    assert deprecated.status_code == 200 and deprecated.json()["state"] == "deprecated"
    revoked = client.post(
        f"{version_url(*draft)}/revoke",
        {"reason": "bad calibration"},
        content_type="application/json",
        **admin_token.headers,
    )
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
    again = client.post(f"{version_url(*draft)}/revoke", **admin_token.headers)
    assert again.status_code == 409

    version = ModelVersion.objects.get(version="1.0.0")
    assert version.artifacts.count() == 2 and version.envelope is not None  # kept, never deleted
    entry = AuditEntry.objects.get(action="version.revoke")
    assert entry.reason == "bad calibration" and entry.actor == "token:test-admin"
    download = client.get(f"{version_url(*draft)}/artifacts/rpi5/download", **ci_token.headers)
    assert download.status_code == 410
    assert (
        download.json()["error"]["code"] == "version_revoked"
        and "revoked" in download.json()["error"]["message"]
    )


def test_it_keeps_private_keys_out_of_the_database(client, ci_token, draft, settings):
    import io

    from cryptography.hazmat.primitives import serialization
    from django.core.management import call_command

    from agent.signing import load_private_key_pem

    assert client.post(f"{version_url(*draft)}/release", **ci_token.headers).status_code == 200
    dump = io.StringIO()
    call_command("dumpdata", stdout=dump)
    everything = dump.getvalue()
    assert "detector" in everything  # the dump does see the registry's rows
    for path in (settings.RELEASE_KEY_PATH, settings.ROLLOUT_KEY_PATH):
        pem = path.read_bytes()
        raw = load_private_key_pem(pem).private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        body = "".join(line for line in pem.decode().splitlines() if not line.startswith("-----"))
        for secret in (body, raw.hex(), base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()):
            assert secret not in everything
        assert "PRIVATE KEY" not in everything
