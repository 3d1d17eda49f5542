"""Offline release signing (RELEASE_SIGNING=offline): the server holds no release private key;
admins register release public keys, CI signs the exact manifest payload elsewhere
(`fleetctl push --sign-with`), the server accepts a release only with signatures by a threshold
of registered keys, and a real agent installs it, refusing releases by keys it did not pin."""

from __future__ import annotations

import base64
import json
import os
import stat
import urllib.request

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from django.contrib.auth.models import User

from agent import signing
from registry.errors import ApiError
from tests.support.agent_harness import Artifact, linear_contract, release_envelope
from tests.support.onnx_models import linear_model, write_linear_model
from tests.support.registry_api import create_hardware, create_model, create_version, upload, version_url
from tests.test_fleetctl import run_fleetctl

MODEL = "detector"


@pytest.fixture
def offline(settings, tmp_path):
    settings.RELEASE_SIGNING = "offline"
    settings.RELEASE_SIGNATURE_THRESHOLD = 1
    settings.RELEASE_KEY_PATH = tmp_path / "absent" / "release.pem"  # never read, never created
    return settings


def new_key():
    return signing.load_private_key_pem(signing.generate_private_key_pem())


def pem_of(key) -> str:
    return signing.public_key_pem(key.public_key())


def register(client, token, pem: str):
    return client.post("/api/v1/keys/", {"role": "release", "public_key_pem": pem},
                       content_type="application/json", **token.headers)


def error_code(response) -> str:
    return response.json()["error"]["code"]


def sign(key, payload: bytes) -> dict:
    sig = key.sign(signing.pae(signing.RELEASE_PAYLOAD_TYPE, payload))
    return {"keyid": signing.keyid_of(key.public_key()), "sig": base64.b64encode(sig).decode()}


def two_key_envelope(payload_envelope: dict, key) -> dict:
    payload = base64.b64decode(payload_envelope["payload"])
    return {**payload_envelope, "signatures": [*payload_envelope["signatures"], sign(key, payload)]}


def get_json(url: str, token) -> object:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token.secret}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.django_db(transaction=True)
def test_it_releases_signed_by_fleetctl_and_a_real_agent_installs_it(
    offline, live_server, ci_token, admin_token, read_token, rig, tmp_path
):
    from registry.models import AuditEntry, HardwareTarget, ModelVersion

    HardwareTarget.objects.create(id="test-hw", description="test box", max_artifact_bytes=50_000_000)
    env = {"FLEET_URL": live_server.url, "FLEET_TOKEN": ci_token.secret}
    admin_env = {**env, "FLEET_TOKEN": admin_token.secret}
    model_file = tmp_path / "model.onnx"
    write_linear_model(model_file, scale=2.0, padding_bytes=200_000)

    generated = run_fleetctl("keys", "generate", "--out", str(tmp_path / "ci.pem"), env={})
    assert generated.returncode == 0, generated.stderr
    keyid = generated.stdout.strip()
    assert stat.S_IMODE(os.stat(tmp_path / "ci.pem").st_mode) == 0o600
    public = (tmp_path / "ci.pub.pem").read_text()
    assert signing.keyid_of(signing.load_public_key_pem(public)) == keyid
    again = run_fleetctl("keys", "generate", "--out", str(tmp_path / "ci.pem"), env={})
    assert again.returncode == 2 and "exists already" in again.stderr
    rogue = new_key()
    (tmp_path / "rogue.pem").write_bytes(rogue.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    added = run_fleetctl("keys", "add", str(tmp_path / "ci.pub.pem"), env=admin_env)
    assert added.returncode == 0 and keyid in added.stdout, added.stderr
    by_ci = run_fleetctl("keys", "add", str(tmp_path / "ci.pub.pem"), env=env)
    assert by_ci.returncode == 3 and "admin" in by_ci.stderr  # only admins register keys
    assert AuditEntry.objects.filter(action="release_key.add", detail__keyid=keyid).count() == 1
    published = get_json(f"{live_server.url}/api/v1/keys/", read_token)
    assert [k["keyid"] for k in published if k["role"] == "release"] == [keyid]
    assert not offline.RELEASE_KEY_PATH.exists()

    def push(version: str, key: str):
        return run_fleetctl("push", "--model", MODEL, "--version", version, "--create-model", "-q",
                            "--artifact", f"test-hw={model_file}", "--release", "--sign-with", str(tmp_path / key),
                            env=env)  # fmt: skip

    refused = push("1.0.0", "rogue.pem")
    assert refused.returncode == 3, refused.stderr
    assert "unknown_key" in refused.stderr and signing.keyid_of(rogue.public_key()) in refused.stderr
    assert not ModelVersion.objects.filter(version="1.0.0").exists()  # the refused draft is deleted

    pushed = push("1.0.0", "ci.pem")
    assert pushed.returncode == 0, pushed.stderr
    version = ModelVersion.objects.get(model__name=MODEL, version="1.0.0")
    assert version.state == "released" and pushed.stdout.strip() == version.manifest_sha256
    assert [s["keyid"] for s in version.envelope["signatures"]] == [keyid]
    listed = run_fleetctl("keys", "list", "--json", env=admin_env)
    assert [(k["keyid"], k["revoked_at"]) for k in json.loads(listed.stdout)] == [(keyid, None)], listed.stderr
    (tmp_path / "release.json").write_text(json.dumps(version.envelope))
    (tmp_path / "rogue.pub.pem").write_text(pem_of(rogue))
    verify = ("verify", str(tmp_path / "release.json"), "--key", str(tmp_path / "ci.pub.pem"))
    assert run_fleetctl(*verify, env={}).returncode == 0
    two = run_fleetctl(*verify, "--key", str(tmp_path / "rogue.pub.pem"), "--threshold", "2", env={})
    assert two.returncode == 1 and "SIGNATURE_INVALID" in two.stderr and "1 of the 2" in two.stderr

    # A real agent pinned (as enrollment pins) to the published release keys installs it, and
    # refuses a release whose manifest a key it did not pin signed.
    release_pems = [k["public_key_pem"] for k in published if k["role"] == "release"]
    rig.config("dev-1", release_pems=release_pems)
    agent = rig.agent("dev-1").start()
    data = model_file.read_bytes()
    entry = dict(next(a for a in json.loads(base64.b64decode(version.envelope["payload"]))["artifacts"]))
    unpinned = release_envelope(rig.keys, model=MODEL, version="0.9.0", counter=1, artifacts=[entry])
    url = rig.server.add(f"/artifacts/{entry['sha256']}", data)
    rig.publish_directive("dev-1", rig.directive("dev-1", 1, MODEL, unpinned, entry, url=url))
    outcome = rig.subscriber.wait_outcome("dev-1", 1, agent=agent)
    assert (outcome["state"], outcome["error_code"]) == ("rejected", "UNKNOWN_KEY"), outcome
    rig.publish_directive("dev-1", rig.directive("dev-1", 2, MODEL, version.envelope, entry, url=url))
    outcome = rig.subscriber.wait_outcome("dev-1", 2, agent=agent)
    assert outcome["state"] == "committed" and outcome["active_sha256"] == entry["sha256"], outcome
    assert (rig.tmp / "dev-1" / "state" / "models" / MODEL / "current" / "model.onnx").read_bytes() == data


@pytest.fixture
def draft(client, ci_token):
    create_hardware(client, ci_token, "test-hw")
    create_model(client, ci_token, MODEL)
    create_version(client, ci_token, MODEL, "1.0.0", health=linear_contract(scale=2.0, bias=1.0))
    assert upload(client, ci_token, MODEL, "1.0.0", hardware="test-hw",
                  data=linear_model(scale=2.0, bias=1.0)).status_code == 201
    return version_url(MODEL, "1.0.0")


@pytest.mark.django_db
def test_it_needs_a_threshold_of_distinct_registered_keys(offline, client, ci_token, admin_token, draft):
    from registry.models import ModelVersion

    offline.RELEASE_SIGNATURE_THRESHOLD = 2
    first, second, stranger = new_key(), new_key(), new_key()
    assert register(client, admin_token, pem_of(first)).status_code == 201
    assert register(client, admin_token, pem_of(second)).status_code == 201
    answer = client.get(f"{draft}/manifest-payload", **ci_token.headers).json()
    assert answer["payloadType"] == signing.RELEASE_PAYLOAD_TYPE and answer["threshold"] == 2
    payload = base64.b64decode(answer["payload"])

    def release(*signatures, body_payload=answer["payload"]):
        return client.post(f"{draft}/release", {"payload": body_payload, "signatures": list(signatures)},
                           content_type="application/json", **ci_token.headers)

    cases = [
        (release(), "signature_required"),
        (release(sign(first, payload)), "signature_threshold"),
        (release(sign(first, payload), sign(first, payload)), "signature_threshold"),  # one key twice
        (release(sign(first, payload), sign(stranger, payload)), "unknown_key"),
        (release(sign(first, payload), {**sign(second, payload), "sig": sign(second, b"other")["sig"]}),
         "signature_invalid"),
    ]
    tampered = payload.replace(b'"counter":1', b'"counter":7')
    cases.append((release(sign(first, tampered), sign(second, tampered),
                          body_payload=base64.b64encode(tampered).decode()), "payload_mismatch"))
    for response, code in cases:
        assert (response.status_code, error_code(response)) == (400, code), response.json()
    assert ModelVersion.objects.get(version="1.0.0").state == "draft"

    done = release(sign(first, payload), sign(second, payload))
    assert done.status_code == 200, done.json()
    envelope = done.json()
    assert base64.b64decode(envelope["payload"]) == payload
    keyring = signing.Keyring.from_pems(pem_of(first), pem_of(second), threshold=2)
    assert signing.verify_envelope(envelope, signing.RELEASE_PAYLOAD_TYPE, keyring) == payload
    assert client.get(f"{draft}/manifest", **ci_token.headers).json() == envelope


@pytest.mark.django_db
def test_it_manages_registered_keys_and_pins_them_at_enrollment(offline, client, admin_token, ci_token, db):
    from ota.fleet.enrollment import Enrollment
    from ota.models import Device
    from registry.keys import public_keys

    enrolled = Enrollment(device=Device(id="dev-x", hardware_id="test-hw", mqtt_username="dev-x"),
                          mqtt_password="p", api_token="t")
    with pytest.raises(ApiError) as refused:
        enrolled.agent_settings()
    assert refused.value.get_codes() == "release_keys_missing"

    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    for bad in ("not a pem", rsa_pem, signing.generate_private_key_pem().decode()):
        response = register(client, admin_token, bad)
        assert (response.status_code, error_code(response)) == (400, "invalid_public_key"), bad[:30]
    key, other = new_key(), new_key()
    assert register(client, ci_token, pem_of(key)).status_code == 403
    assert register(client, admin_token, pem_of(key)).status_code == 201
    duplicate = register(client, admin_token, pem_of(key))
    assert (duplicate.status_code, error_code(duplicate)) == (409, "key_exists")
    assert register(client, admin_token, pem_of(other)).status_code == 201

    offline.RELEASE_SIGNATURE_THRESHOLD = 2
    answer = enrolled.agent_settings()["keys"]
    assert answer["release"] == [pem_of(key), pem_of(other)] and answer["release_threshold"] == 2
    assert len(answer["rollout"]) == 1

    keyid = signing.keyid_of(other.public_key())
    assert client.post(f"/api/v1/keys/registered/{keyid}/revoke", {"reason": "lost"},
                       content_type="application/json", **admin_token.headers).status_code == 200
    again = client.post(f"/api/v1/keys/registered/{keyid}/revoke", content_type="application/json",
                        **admin_token.headers)
    assert (again.status_code, error_code(again)) == (409, "key_revoked")
    listed = client.get("/api/v1/keys/registered/", **admin_token.headers).json()
    rows = listed["results"] if isinstance(listed, dict) else listed
    assert [(r["keyid"], r["revoked_at"] is not None) for r in rows] == [
        (signing.keyid_of(key.public_key()), False), (keyid, True)]
    assert [k.keyid for k in public_keys() if k.role == "release"] == [signing.keyid_of(key.public_key())]
    with pytest.raises(ApiError) as below:  # 1 key left, threshold 2: no device could install anything
        enrolled.agent_settings()
    assert below.value.get_codes() == "release_keys_missing"
    page = client.get("/api/v1/keys/", **ci_token.headers)
    assert page.status_code == 200 and len(page.json()) == 2  # one release key, the rollout key
    client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
    access = client.get("/access/").content.decode()
    assert f"{keyid}</code></td><td>release</td>" in access and "revoked" in access
    assert "Release signing: <b>offline</b>, 2 distinct registered key(s) must sign" in access


@pytest.mark.django_db
def test_it_refuses_signatures_when_the_server_signs_itself(client, ci_token, draft):
    response = client.post(f"{draft}/release", {"signatures": [sign(new_key(), b"x")], "payload": "eA=="},
                           content_type="application/json", **ci_token.headers)
    assert (response.status_code, error_code(response)) == (400, "online_signing")


def test_it_makes_a_real_agent_require_the_threshold(rig):
    second = new_key()
    artifact = Artifact(linear_model(scale=2.0, bias=1.0, padding_bytes=100_000))
    one = release_envelope(rig.keys, model=MODEL, version="1.0", counter=1, artifacts=[artifact.entry()],
                           health=linear_contract(scale=2.0, bias=1.0))
    rig.config("dev-t", release_pems=[rig.keys.release_pem, pem_of(second)], release_threshold=2)
    agent = rig.agent("dev-t").start()
    rig.publish_directive("dev-t", rig.directive("dev-t", 1, MODEL, one, artifact))
    outcome = rig.subscriber.wait_outcome("dev-t", 1, agent=agent)
    assert (outcome["state"], outcome["error_code"]) == ("rejected", "SIGNATURE_INVALID"), outcome
    rig.publish_directive("dev-t", rig.directive("dev-t", 2, MODEL, two_key_envelope(one, second), artifact))
    outcome = rig.subscriber.wait_outcome("dev-t", 2, agent=agent)
    assert outcome["state"] == "committed" and outcome["active_sha256"] == artifact.sha256, outcome
