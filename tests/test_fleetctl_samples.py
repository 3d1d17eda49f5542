"""`fleetctl push --sample-inputs FILE.npz`: the model runs here on the samples, its outputs and a
latency budget are signed into the release as its health contract, the server's checks pass, and
a device's precheck passes with that contract. With a real model with dynamic input sizes:
silero-vad from its PyPI wheel. fleetctl runs as a real subprocess against a live registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.precheck import CONTRACT_MAX_BYTES, run_precheck
from agent.protocol import encode_json, verify_release
from agent.signing import Keyring, load_private_key_pem, public_key_pem
from tests.support.onnx_models import write_linear_model
from tests.support.silero import silero_vad_onnx, speech_like_samples
from tests.support.tflite_models import write_tflite_linear_model

FLEETCTL = Path(sys.executable).with_name("fleetctl")


@pytest.fixture(scope="session")
def silero_model(request) -> bytes:
    return silero_vad_onnx(request.config)


def run_fleetctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {key: value for key, value in os.environ.items() if not key.startswith("FLEET_")}
    full_env.update(env)
    return subprocess.run([str(FLEETCTL), *args], env=full_env, capture_output=True, text=True, timeout=180, check=False)


@pytest.fixture
def fleet_env(live_server, ci_token) -> dict[str, str]:
    from registry.models import HardwareTarget

    HardwareTarget.objects.create(id="rpi5", description="Raspberry Pi 5", max_artifact_bytes=50_000_000)
    return {"FLEET_URL": live_server.url, "FLEET_TOKEN": ci_token.secret}


@pytest.fixture
def silero_file(tmp_path, silero_model) -> Path:
    path = tmp_path / "silero_vad.onnx"
    path.write_bytes(silero_model)
    return path


def nothing_on_the_server() -> bool:
    from registry.models import Model, ModelVersion

    return not Model.objects.exists() and not ModelVersion.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_it_signs_a_contract_from_sample_inputs_that_the_server_and_the_device_accept(
    fleet_env, silero_file, tmp_path, signing_keys
):
    from registry.models import ModelVersion

    samples = tmp_path / "silero.npz"
    np.savez(samples, **speech_like_samples(512))
    envelope_path = tmp_path / "release.json"

    result = run_fleetctl(
        "push", "--model", "vad", "--version", "6.2.3", "--create-model", "--artifact", f"rpi5={silero_file}",
        "--sample-inputs", str(samples), "--release", "--envelope-out", str(envelope_path), "-q",
        env=fleet_env,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert "health contract from" in result.stderr and "sr int64 []" in result.stderr
    version = ModelVersion.objects.get(model__name="vad", version="6.2.3")
    assert version.state == ModelVersion.State.RELEASED
    release_key = load_private_key_pem((signing_keys / "release.pem").read_bytes()).public_key()
    manifest = verify_release(json.loads(envelope_path.read_text()), Keyring.from_pems(public_key_pem(release_key)))
    health = manifest.health
    assert health == version.health
    assert {n: (t["dtype"], t["shape"]) for n, t in health["inputs"].items()} == {
        "input": ("float32", [1, 512]), "state": ("float32", [2, 1, 128]), "sr": ("int64", []),
    }
    assert {n: (t["dtype"], t["shape"]) for n, t in health["outputs"].items()} == {
        "output": ("float32", [1, 1]), "stateN": ("float32", [2, 1, 128]),
    }
    assert health["inputs"]["sr"]["data"] == [16000]
    # The golden inputs are the samples, value for value, in a compact encoding.
    sent = np.asarray(health["inputs"]["input"]["data"], dtype=np.float32).reshape(1, 512)
    assert np.array_equal(sent, speech_like_samples(512)["input"])
    assert len(encode_json(health)) < CONTRACT_MAX_BYTES / 2
    assert health["latency_budget_ms"] >= 50 and health["atol"] > 0 and health["rtol"] > 0

    # The device side: the precheck a canary runs on this release passes, and compares outputs.
    result = run_precheck(silero_file, manifest.health, timeout=60, memory_mb=2048)
    assert result.ok and result.detail == "golden outputs match", result.detail
    # And it would catch a model that answers differently.
    changed = json.loads(json.dumps(health))
    changed["outputs"]["output"]["data"] = [changed["outputs"]["output"]["data"][0] + 0.5]
    assert not run_precheck(silero_file, changed, timeout=60, memory_mb=2048).ok


@pytest.mark.django_db(transaction=True)
def test_it_makes_a_contract_for_a_tflite_model_with_the_tflite_runtime(fleet_env, tmp_path, signing_keys):
    model = write_tflite_linear_model(tmp_path / "linear.tflite", scale=3.0, bias=0.5)
    samples = tmp_path / "x.npz"
    np.savez(samples, x=np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32))
    envelope_path = tmp_path / "release.json"

    result = run_fleetctl(
        "push", "--model", "linear", "--version", "1.0", "--create-model", "--artifact", f"rpi5={model}",
        "--format", "tflite", "--sample-inputs", str(samples), "--release", "--envelope-out", str(envelope_path),
        "-q", env=fleet_env,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    release_key = load_private_key_pem((signing_keys / "release.pem").read_bytes()).public_key()
    manifest = verify_release(json.loads(envelope_path.read_text()), Keyring.from_pems(public_key_pem(release_key)))
    assert manifest.artifacts[0].format == "tflite"
    assert manifest.health["outputs"]["y"] == {"dtype": "float32", "shape": [1, 4], "data": [3.5, 6.5, 9.5, 12.5]}
    assert run_precheck(model, manifest.health, timeout=60, memory_mb=2048, format="tflite").ok
    # A format without a runtime has no contract to make from samples.
    other = run_fleetctl(
        "push", "--model", "linear", "--version", "2.0", "--artifact", f"rpi5={model}", "--format", "other",
        "--sample-inputs", str(samples), env=fleet_env,
    )  # fmt: skip
    assert other.returncode == 2 and "--format other has none" in other.stderr, other.stderr


@pytest.mark.django_db(transaction=True)
def test_it_says_what_to_install_when_the_runtime_is_missing(fleet_env, silero_file, tmp_path):
    samples = tmp_path / "silero.npz"
    np.savez(samples, **speech_like_samples(512))
    shadow = tmp_path / "shadow" / "onnxruntime"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'onnxruntime'\")\n")

    result = run_fleetctl(
        "push", "--model", "vad", "--version", "1.0", "--create-model", "--artifact", f"rpi5={silero_file}",
        "--sample-inputs", str(samples), env={**fleet_env, "PYTHONPATH": str(shadow.parent)},
    )  # fmt: skip

    assert result.returncode == 2, result.stderr
    assert "pip install 'modelfleet[runtime]'" in result.stderr
    assert nothing_on_the_server()


@pytest.mark.django_db(transaction=True)
def test_it_refuses_samples_that_do_not_match_the_model_inputs_before_writing(fleet_env, silero_file, tmp_path):
    wrong_names = tmp_path / "wrong.npz"
    arrays = speech_like_samples(512)
    np.savez(wrong_names, audio=arrays["input"], state=arrays["state"], sr=arrays["sr"])
    wrong_dtype = tmp_path / "float64.npz"
    np.savez(wrong_dtype, **{**arrays, "input": arrays["input"].astype(np.float64)})

    names = run_fleetctl(
        "push", "--model", "vad", "--version", "1.0", "--create-model", "--artifact", f"rpi5={silero_file}",
        "--sample-inputs", str(wrong_names), env=fleet_env,
    )  # fmt: skip
    dtype = run_fleetctl(
        "push", "--model", "vad", "--version", "1.0", "--create-model", "--artifact", f"rpi5={silero_file}",
        "--sample-inputs", str(wrong_dtype), env=fleet_env,
    )  # fmt: skip

    assert names.returncode == 2, names.stderr
    assert "holds audio, sr, state" in names.stderr
    assert "input float32 [?, ?], state float32 [2, ?, 128], sr int64 []" in names.stderr
    assert "(missing: input)" in names.stderr and "(not inputs of the model: audio)" in names.stderr
    assert dtype.returncode == 2, dtype.stderr
    assert "'input' is float64" in dtype.stderr and "takes float32" in dtype.stderr
    assert nothing_on_the_server()


@pytest.mark.django_db(transaction=True)
def test_it_refuses_samples_whose_contract_would_not_fit_a_directive(fleet_env, tmp_path):
    model = write_linear_model(tmp_path / "linear.onnx")
    samples = tmp_path / "big.npz"
    np.savez(samples, x=np.random.default_rng(1).random((2000, 4), dtype=np.float32))

    result = run_fleetctl(
        "push", "--model", "linear", "--version", "1.0", "--create-model", "--artifact", f"rpi5={model}",
        "--sample-inputs", str(samples), "--release", env=fleet_env,
    )  # fmt: skip

    assert result.returncode == 2, result.stderr
    assert f"over the {CONTRACT_MAX_BYTES}-byte limit" in result.stderr
    assert "input 'x' [2000, 4]" in result.stderr and "output 'y' [2000, 4]" in result.stderr
    assert "Use smaller samples" in result.stderr
    assert nothing_on_the_server()


def test_it_imports_no_model_runtime_until_sample_inputs_are_given():
    probe = subprocess.run(
        [sys.executable, "-c", (
            "import sys, fleetctl.cli, fleetctl.samples; "
            "print(sorted(m for m in ('numpy', 'onnxruntime') if m in sys.modules))"
        )],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert probe.stdout.strip() == "[]"
