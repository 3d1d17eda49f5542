"""fleetctl, run as a real subprocess against a live registry (pytest-django's live_server)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.signing import load_private_key_pem, public_key_pem
from fleetctl.progress import Progress
from tests.support.net import free_port
from tests.support.onnx_models import write_linear_model

FLEETCTL = Path(sys.executable).with_name("fleetctl")
MODEL = "detector"


def run_fleetctl(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {key: value for key, value in os.environ.items() if not key.startswith("FLEET_")}
    full_env.update(env)
    return subprocess.run(
        [str(FLEETCTL), *args], env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def hardware(db):
    from registry.models import HardwareTarget

    HardwareTarget.objects.create(id="jetson-orin", description="NVIDIA Jetson Orin", max_artifact_bytes=50_000_000)
    HardwareTarget.objects.create(id="rpi5", description="Raspberry Pi 5", max_artifact_bytes=50_000_000)


@pytest.fixture
def fleet_env(live_server, ci_token, hardware) -> dict[str, str]:
    return {"FLEET_URL": live_server.url, "FLEET_TOKEN": ci_token.secret}


@pytest.fixture
def models_dir(tmp_path) -> Path:
    """A 2 MB ONNX model per hardware target (different weights, so different hashes)."""
    directory = tmp_path / "build"
    directory.mkdir()
    write_linear_model(directory / "orin.onnx", scale=2.0, padding_bytes=2 * 1024 * 1024)
    write_linear_model(directory / "rpi.onnx", scale=3.0, padding_bytes=2 * 1024 * 1024)
    return directory


@pytest.fixture
def release_pub(signing_keys, tmp_path) -> Path:
    private = load_private_key_pem((signing_keys / "release.pem").read_bytes())
    path = tmp_path / "release.pub.pem"
    path.write_text(public_key_pem(private.public_key()))
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def push(env, models_dir, version="1.0.0", *extra: str) -> subprocess.CompletedProcess:
    return run_fleetctl(
        "push", "--model", MODEL, "--version", version,
        "--artifact", f"jetson-orin={models_dir / 'orin.onnx'}",
        "--artifact", f"rpi5={models_dir / 'rpi.onnx'}",
        *extra,
        env=env,
    )  # fmt: skip


@pytest.mark.django_db(transaction=True)
def test_it_pushes_releases_and_moves_the_alias(fleet_env, models_dir, tmp_path):
    from registry.models import Alias, ModelVersion

    envelope_path = tmp_path / "envelope.json"
    result = push(
        fleet_env, models_dir, "1.0.0",
        "--create-model", "--release", "--alias", "production",
        "--git-sha", "0123abcd", "--ci-run-url", "https://ci.example.com/run/42",
        "--metadata", '{"dataset": "v7"}', "--envelope-out", str(envelope_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    version = ModelVersion.objects.get(model__name=MODEL, version="1.0.0")
    assert version.state == ModelVersion.State.RELEASED
    assert version.git_sha == "0123abcd" and version.ci_run_url == "https://ci.example.com/run/42"
    assert version.metadata == {"dataset": "v7"}
    stored = {a.hardware_id: (a.sha256, a.length) for a in version.artifacts.all()}
    assert stored == {
        "jetson-orin": (sha256_of(models_dir / "orin.onnx"), (models_dir / "orin.onnx").stat().st_size),
        "rpi5": (sha256_of(models_dir / "rpi.onnx"), (models_dir / "rpi.onnx").stat().st_size),
    }
    # stdout is exactly the digest of the signed payload, so CI can capture it.
    payload = base64.b64decode(version.envelope["payload"])
    assert result.stdout == hashlib.sha256(payload).hexdigest() + "\n"
    assert json.loads(envelope_path.read_text()) == version.envelope
    assert Alias.objects.get(model__name=MODEL, name="production").version == version
    # Progress goes to stderr as plain lines (not a TTY here), ending at 100 %.
    assert "jetson-orin orin.onnx  100%" in result.stderr
    assert "MiB/s" in result.stderr


@pytest.mark.django_db(transaction=True)
def test_it_leaves_a_draft_without_release_and_lists_versions(fleet_env, models_dir):
    assert push(fleet_env, models_dir, "1.0.0", "--create-model", "--release").returncode == 0
    draft = push(fleet_env, models_dir, "1.1.0", "--quiet")
    assert draft.returncode == 0, draft.stderr
    assert draft.stdout == ""
    assert "left as a draft" in draft.stderr

    listed = run_fleetctl("versions", MODEL, env=fleet_env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["VERSION", "COUNTER", "STATE", "RELEASED", "ALIASES", "HARDWARE"]
    assert lines[1].split()[0:3] == ["1.1.0", "2", "draft"]
    assert lines[2].split()[0:3] == ["1.0.0", "1", "released"]
    assert "jetson-orin,rpi5" in lines[2]

    as_json = json.loads(run_fleetctl("versions", MODEL, "--json", env=fleet_env).stdout)
    assert [v["version"] for v in as_json] == ["1.1.0", "1.0.0"]


@pytest.mark.django_db(transaction=True)
def test_it_moves_aliases_and_reports_refusals(fleet_env, models_dir):
    from registry.models import Alias

    assert push(fleet_env, models_dir, "1.0.0", "--create-model", "--release", "-q").returncode == 0
    assert push(fleet_env, models_dir, "2.0.0", "--release", "-q").returncode == 0

    moved = run_fleetctl("alias", "set", MODEL, "staging", "2.0.0", env=fleet_env)
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout == f"{MODEL}:staging -> 2.0.0\n"
    assert Alias.objects.get(model__name=MODEL, name="staging").version.version == "2.0.0"
    assert run_fleetctl("alias", "set", MODEL, "staging", "1.0.0", env=fleet_env).returncode == 0

    listed = json.loads(run_fleetctl("alias", "list", MODEL, "--json", env=fleet_env).stdout)
    staging = next(a for a in listed if a["name"] == "staging")
    assert staging["version"] == "1.0.0"
    assert [m["to_version"] for m in staging["history"]] == ["1.0.0", "2.0.0"]

    missing = run_fleetctl("alias", "set", MODEL, "staging", "9.9.9", env=fleet_env)
    assert missing.returncode == 3
    assert "has no version '9.9.9'" in missing.stderr
    assert Alias.objects.get(model__name=MODEL, name="staging").version.version == "1.0.0"


@pytest.mark.django_db(transaction=True)
def test_it_verifies_a_release_offline_and_refuses_tampering(fleet_env, models_dir, tmp_path, release_pub):
    envelope_path = tmp_path / "envelope.json"
    pushed = push(fleet_env, models_dir, "1.0.0", "--create-model", "--release", "-q", "--envelope-out", str(envelope_path))
    assert pushed.returncode == 0, pushed.stderr
    envelope = json.loads(envelope_path.read_text())

    good = run_fleetctl(
        "verify", str(envelope_path), "--key", str(release_pub),
        "--artifact", f"rpi5={models_dir / 'rpi.onnx'}", env={},
    )  # fmt: skip
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith(f"OK: {MODEL} 1.0.0 (counter 1")
    assert f"digest: {pushed.stdout.strip()}" in good.stdout
    assert sha256_of(models_dir / "orin.onnx") in good.stdout

    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload["artifacts"][0]["sha256"] = "0" * 64
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps({**envelope, "payload": base64.b64encode(json.dumps(payload).encode()).decode()}))
    refused = run_fleetctl("verify", str(tampered), "--key", str(release_pub), env={})
    assert refused.returncode == 1
    assert "SIGNATURE_INVALID" in refused.stderr

    raw = base64.b64decode(envelope["payload"])
    truncated = tmp_path / "truncated.json"
    truncated.write_text(json.dumps({**envelope, "payload": base64.b64encode(raw[: len(raw) // 2]).decode()}))
    cut = run_fleetctl("verify", str(truncated), "--key", str(release_pub), env={})
    assert cut.returncode == 1
    assert "SIGNATURE_INVALID" in cut.stderr

    other_key = tmp_path / "other.pub.pem"
    from agent.signing import generate_private_key_pem

    other_key.write_text(public_key_pem(load_private_key_pem(generate_private_key_pem()).public_key()))
    wrong_key = run_fleetctl("verify", str(envelope_path), "--key", str(other_key), env={})
    assert wrong_key.returncode == 1
    assert "UNKNOWN_KEY" in wrong_key.stderr

    # The right signature, but a local file that is not the released one.
    wrong_file = run_fleetctl(
        "verify", str(envelope_path), "--key", str(release_pub),
        "--artifact", f"rpi5={models_dir / 'orin.onnx'}", env={},
    )  # fmt: skip
    assert wrong_file.returncode == 1
    assert "HASH_MISMATCH" in wrong_file.stderr

    not_a_key = run_fleetctl("verify", str(envelope_path), "--key", str(envelope_path), env={})
    assert not_a_key.returncode == 2
    assert "not a PEM public key" in not_a_key.stderr


@pytest.mark.django_db(transaction=True)
def test_it_prints_the_server_message_for_bad_tokens(fleet_env, read_token, models_dir):
    from registry.models import Model

    bad = run_fleetctl("versions", MODEL, env={**fleet_env, "FLEET_TOKEN": "mf_not-a-real-token"})
    assert bad.returncode == 3
    assert "Invalid or revoked token." in bad.stderr
    assert "HTTP 401" in bad.stderr

    read_only = push({**fleet_env, "FLEET_TOKEN": read_token.secret}, models_dir, "1.0.0", "--create-model")
    assert read_only.returncode == 3
    assert "needs the 'ci' scope" in read_only.stderr
    assert "HTTP 403" in read_only.stderr
    assert not Model.objects.exists()

    no_token = run_fleetctl("versions", MODEL, env={"FLEET_URL": fleet_env["FLEET_URL"]})
    assert no_token.returncode == 2
    assert "set FLEET_TOKEN or pass --token" in no_token.stderr


@pytest.mark.django_db(transaction=True)
def test_it_refuses_a_missing_file_before_touching_the_server(fleet_env, models_dir):
    from registry.models import Model, ModelVersion

    result = run_fleetctl(
        "push", "--model", MODEL, "--version", "1.0.0", "--create-model",
        "--artifact", f"jetson-orin={models_dir / 'orin.onnx'}",
        "--artifact", f"rpi5={models_dir / 'missing.onnx'}",
        env=fleet_env,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"--artifact rpi5={models_dir / 'missing.onnx'}: no such file" in result.stderr
    assert not Model.objects.exists() and not ModelVersion.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_it_says_when_the_model_does_not_exist(fleet_env, models_dir):
    from registry.models import Model

    result = push(fleet_env, models_dir, "1.0.0")
    assert result.returncode == 3
    assert f"model '{MODEL}' does not exist on {fleet_env['FLEET_URL']}; pass --create-model" in result.stderr
    assert not Model.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_it_deletes_the_draft_it_created_when_the_server_refuses_so_it_can_run_again(
    fleet_env, models_dir, isolated_storage, tmp_path
):
    from registry.models import Artifact, Model

    wrong = "ab" * 32
    local = push(fleet_env, models_dir, "1.0.0", "--create-model", "-q", "--expect-sha256", f"rpi5={wrong}")
    assert local.returncode == 2  # a file that is already wrong here: refused before any request
    assert wrong in local.stderr and sha256_of(models_dir / "rpi.onnx") in local.stderr
    assert not Model.objects.exists()

    # A contract naming an input the model does not have: the server refuses the first upload,
    # after the draft was created.
    contract = tmp_path / "health.json"
    contract.write_text(json.dumps({"inputs": {"pixels": {"dtype": "float32", "shape": [1, 4], "data": [0, 1, 2, 3]}}}))
    result = push(fleet_env, models_dir, "1.0.0", "--create-model", "-q", "--health", str(contract))
    assert result.returncode == 3
    assert "HTTP 400" in result.stderr and "pixels" in result.stderr
    assert f"note: the draft {MODEL} 1.0.0 this push created was deleted; push again" in result.stderr
    # Nothing of the refused push is left: no version, no stored bytes.
    assert not Artifact.objects.exists()
    assert [p.name for p in isolated_storage.rglob("*") if p.is_file()] == []

    # The same command, with the cause fixed, goes through under the same version.
    again = push(fleet_env, models_dir, "1.0.0", "-q", "--release")
    assert again.returncode == 0, again.stderr
    assert sorted(Artifact.objects.values_list("hardware_id", flat=True)) == ["jetson-orin", "rpi5"]


@pytest.mark.django_db(transaction=True)
def test_it_creates_hardware_and_checks_the_push_against_it_before_writing_anything(live_server, ci_token, models_dir):
    from registry.models import HardwareTarget, Model, ModelVersion

    env = {"FLEET_URL": live_server.url, "FLEET_TOKEN": ci_token.secret}
    unknown = push(env, models_dir, "1.0.0", "--create-model", "-q")
    assert unknown.returncode == 3
    assert "hardware 'jetson-orin' does not exist" in unknown.stderr
    assert "fleetctl hardware create --id jetson-orin" in unknown.stderr
    assert not Model.objects.exists() and not ModelVersion.objects.exists()

    for hw, limit in (("jetson-orin", "50000000"), ("rpi5", "1000")):
        created = run_fleetctl("hardware", "create", "--id", hw, "--description", f"{hw} boxes", "--max-bytes", limit,
                               env=env)
        assert created.returncode == 0, created.stderr
    exists = run_fleetctl("hardware", "create", "--id", "rpi5", "--max-bytes", "1000", env=env)
    assert exists.returncode == 3 and "already exists" in exists.stderr
    rerun = run_fleetctl("hardware", "create", "--id", "rpi5", "--max-bytes", "1000", "--if-missing", env=env)
    assert rerun.returncode == 0 and "exists already" in rerun.stderr
    listing = run_fleetctl("hardware", "list", env=env)
    assert listing.returncode == 0 and "jetson-orin" in listing.stdout and "rpi5" in listing.stdout

    too_large = push(env, models_dir, "1.0.0", "--create-model", "-q")
    assert too_large.returncode == 3
    assert "(1000 bytes) limit of hardware 'rpi5'" in too_large.stderr
    assert not Model.objects.exists() and not ModelVersion.objects.exists()

    HardwareTarget.objects.filter(pk="rpi5").update(max_artifact_bytes=50_000_000)
    assert push(env, models_dir, "1.0.0", "--create-model", "-q", "--release").returncode == 0


@pytest.mark.django_db(transaction=True)
def test_it_deletes_drafts_but_never_a_released_version(fleet_env, models_dir):
    from registry.models import ModelVersion

    assert push(fleet_env, models_dir, "1.0.0", "--create-model", "-q").returncode == 0  # a draft
    assert push(fleet_env, models_dir, "2.0.0", "-q", "--release").returncode == 0

    taken = push(fleet_env, models_dir, "1.0.0", "-q")
    assert taken.returncode == 3 and "--replace-draft" in taken.stderr
    replaced = push(fleet_env, models_dir, "1.0.0", "-q", "--replace-draft")
    assert replaced.returncode == 0, replaced.stderr

    deleted = run_fleetctl("version", "delete", MODEL, "1.0.0", env=fleet_env)
    assert deleted.returncode == 0, deleted.stderr
    assert not ModelVersion.objects.filter(version="1.0.0").exists()
    refused = run_fleetctl("version", "delete", MODEL, "2.0.0", env=fleet_env)
    assert refused.returncode == 3
    assert "released versions are immutable and never deleted" in refused.stderr
    assert ModelVersion.objects.filter(version="2.0.0", state="released").exists()
    again = push(fleet_env, models_dir, "2.0.0", "-q")
    assert again.returncode == 3 and "already released" in again.stderr


@pytest.mark.django_db(transaction=True)
def test_it_says_the_release_stands_when_only_the_alias_move_fails(fleet_env, models_dir):
    from registry.models import Alias, ModelVersion

    result = push(fleet_env, models_dir, "1.0.0", "--create-model", "-q", "--release", "--alias", "a" * 65)
    assert result.returncode == 3
    assert "Alias names use 1-64 letters" in result.stderr
    assert f"note: {MODEL} 1.0.0 is released; only the alias move failed" in result.stderr
    assert "still a draft" not in result.stderr
    assert result.stdout == ""
    assert ModelVersion.objects.get(version="1.0.0").state == ModelVersion.State.RELEASED
    assert not Alias.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_it_exits_4_when_the_server_is_unreachable(ci_token, models_dir):
    url = f"http://127.0.0.1:{free_port()}"
    result = run_fleetctl("versions", MODEL, "--url", url, "--token", ci_token.secret, env={})
    assert result.returncode == 4
    assert f"cannot reach {url}" in result.stderr


def test_it_rejects_bad_usage_with_exit_code_2(tmp_path):
    env = {"FLEET_URL": "http://127.0.0.1:9", "FLEET_TOKEN": "x"}
    model = write_linear_model(tmp_path / "m.onnx")
    cases = [
        (["push", "--model", "m", "--version", "1", "--artifact", str(model)], "expected HARDWARE=PATH"),
        (["push", "--model", "m", "--version", "1", "--artifact", f"a={model}", "--alias", "production"],
         "--alias needs --release"),
        (["push", "--model", "m", "--version", "1", "--artifact", f"a={model}", "--metadata", "{nope"],
         "--metadata: not valid JSON"),
        (["push", "--model", "m", "--version", "1", "--artifact", f"a={model}", "--artifact", f"a={model}"],
         "hardware 'a' given twice"),
        (["push", "--model", "m", "--version", "1", "--artifact", f"a={model}", "--expect-sha256", "a=xyz"],
         "must be 64 hex characters"),
        (["push", "--model", "m", "--artifact", f"a={model}"], "the following arguments are required: --version"),
        (["versions", "m", "--url", "ftp://example.com"], "server URL must look like http(s)://host[:port]"),
        # FLEET_TOKEN=$(manage.py tokens create ... 2>&1) catches the message along with the token.
        (["versions", "m", "--token", "mf_abc\ncreated ci token 'x'"], "the API token contains spaces, line breaks"),
    ]
    for argv, message in cases:
        result = run_fleetctl(*argv, env=env)
        assert result.returncode == 2, (argv, result.stderr)
        assert message in result.stderr, (argv, result.stderr)


def test_it_draws_a_live_bar_on_a_terminal():
    stream = io.StringIO()
    progress = Progress("rpi5 model.onnx", stream, tty=True)
    progress(0, 4 * 1024 * 1024)
    progress(4 * 1024 * 1024, 4 * 1024 * 1024)
    text = stream.getvalue()
    assert "\r\x1b[K[------------------------]" in text
    assert "[########################] rpi5 model.onnx  100%  4.0 MiB / 4.0 MiB" in text
    assert text.endswith("\n")


@pytest.mark.django_db(transaction=True)
def test_it_reports_the_budget_when_the_server_cuts_an_upload_short(live_server, ci_token, tmp_path):
    """The server stops reading a body that outgrows every hardware budget; the client must
    still show its 413 answer, not a broken pipe. (fleetctl push refuses such a file before
    uploading; this drives the client's upload directly, as any caller of it may.)"""
    from fleetctl.client import ApiError, FleetClient
    from registry.models import HardwareTarget, Model, ModelVersion

    HardwareTarget.objects.create(id="tiny-mcu", max_artifact_bytes=1_000_000)
    ModelVersion.objects.create(model=Model.objects.create(name=MODEL), version="1.0.0", counter=1)
    big = write_linear_model(tmp_path / "big.onnx", padding_bytes=16 * 1024 * 1024)
    client = FleetClient(live_server.url, ci_token.secret)
    with pytest.raises(ApiError) as refused:
        client.upload(f"/api/v1/models/{MODEL}/versions/1.0.0/artifacts/",
                      fields={"hardware": "tiny-mcu", "format": "onnx"}, file_path=big)
    assert refused.value.status == 413
    assert "1000000" in refused.value.message.replace(",", "").replace("_", "")

    env = {"FLEET_URL": live_server.url, "FLEET_TOKEN": ci_token.secret}
    result = run_fleetctl("push", "--model", MODEL, "--version", "2.0.0", "--artifact", f"tiny-mcu={big}", "-q", env=env)
    assert result.returncode == 3, result.stderr
    assert "HTTP 413" in result.stderr and "(1000000 bytes) limit of hardware 'tiny-mcu'" in result.stderr
