"""A health contract against the model it is for: its tensors' names, dtypes and shapes checked
against the uploaded ONNX model's declared inputs and outputs (at upload, and again at release
for a model that came first), and every release run through the device's own precheck before it
is signed, so a release no device can precheck is refused here instead of on every canary.
The model is a real one with dynamic input sizes: silero-vad from its PyPI wheel."""

from __future__ import annotations

import pytest

from agent.precheck import run_precheck
from agent.protocol import verify_release
from agent.signing import Keyring
from registry.models import Artifact, ModelVersion
from tests.support.onnx_models import fixed_length_model
from tests.support.registry_api import create_hardware, create_model, create_version, upload, version_url
from tests.support.silero import silero_vad_onnx, speech_like_samples

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="session")
def silero_model(request) -> bytes:
    return silero_vad_onnx(request.config)


def contract(**tensors) -> dict:
    """A contract for silero-vad with the given input tensors replaced (no outputs)."""
    samples = speech_like_samples()
    inputs = {
        name: {"dtype": array.dtype.name, "shape": list(array.shape), "data": array.ravel().tolist()}
        for name, array in samples.items()
    }
    inputs.update(tensors)
    return {"inputs": {k: v for k, v in inputs.items() if v is not None}, "latency_budget_ms": 1000}


@pytest.fixture
def vad(client, ci_token):
    create_hardware(client, ci_token, "rpi5")
    create_model(client, ci_token, "vad")
    return "vad"


def release(client, token, version: str):
    return client.post(f"{version_url('vad', version)}/release", **token.headers)


def test_it_refuses_an_upload_whose_model_does_not_fit_the_contract_naming_both_sides(
    client, ci_token, vad, silero_model, isolated_storage
):
    bad = contract(
        input=None,  # the model's input is called "input": this contract calls it "audio"
        audio={"dtype": "float32", "shape": [1, 4], "data": [0.0, 0.1, 0.2, 0.3]},
        state={"dtype": "float32", "shape": [2, 1, 2], "data": [0.0] * 4},
        sr={"dtype": "int32", "shape": [], "data": [16000]},
    )
    create_version(client, ci_token, "vad", "1.0", health=bad)

    response = upload(client, ci_token, "vad", "1.0", hardware="rpi5", data=silero_model, file_name="silero_vad.onnx")

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "health_contract_mismatch"
    message = error["message"]
    assert "uploaded for hardware 'rpi5'" in message
    assert "the contract's input 'audio' is not an input of the model" in message
    assert "input float32 [?, ?], state float32 [2, ?, 128], sr int64 []" in message  # the model's side
    assert "dimension 2 is 2, the model fixes it at 128 (contract: float32 [2, 1, 2]; model: float32 [2, ?, 128])" in message
    assert "dtype int32 against the model's int64 (contract: int32 []; model: int64 [])" in message
    assert "the model input 'input' has no golden data in the contract" in message
    assert {m["tensor"] for m in error["mismatches"]} == {"inputs.audio", "inputs.state", "inputs.sr", "inputs.input"}
    assert not Artifact.objects.exists()
    assert not [p for p in isolated_storage.rglob("*") if p.is_file()]


def test_it_refuses_golden_outputs_the_model_does_not_have(client, ci_token, vad, silero_model):
    health = contract()
    health["outputs"] = {
        "prob": {"dtype": "float32", "shape": [1, 1], "data": [0.5]},
        "stateN": {"dtype": "float32", "shape": [2, 1, 128, 1], "data": [0.0] * 256},
    }
    create_version(client, ci_token, "vad", "1.0", health=health)

    response = upload(client, ci_token, "vad", "1.0", hardware="rpi5", data=silero_model)

    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "the contract's output 'prob' is not an output of the model" in message
    assert "outputs: output float32 [?, 1], stateN float32 [?, ?, ?]" in message
    assert "outputs.stateN: shape: rank 4 against the model's rank 3" in message


def test_it_checks_the_contract_at_release_when_the_model_came_first(client, ci_token, vad, silero_model):
    # A draft whose artifact was stored before its contract was checked against it (an older
    # server, the database edited by hand): the release is where the check happens.
    create_version(client, ci_token, "vad", "1.0")
    assert upload(client, ci_token, "vad", "1.0", hardware="rpi5", data=silero_model).status_code == 201
    ModelVersion.objects.filter(version="1.0").update(
        health=contract(sr={"dtype": "float32", "shape": [], "data": [16000.0]})
    )

    response = release(client, ci_token, "1.0")

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "health_contract_mismatch"
    assert "for hardware 'rpi5' (model.onnx)" in error["message"]
    assert "dtype float32 against the model's int64" in error["message"]
    assert ModelVersion.objects.get(version="1.0").state == "draft"


def test_it_refuses_at_release_a_model_the_default_precheck_cannot_run(client, ci_token, vad):
    create_version(client, ci_token, "vad", "1.0")
    assert upload(client, ci_token, "vad", "1.0", hardware="rpi5", data=fixed_length_model(length=100)).status_code == 201

    response = release(client, ci_token, "1.0")

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "precheck_failed" and error["hardware"] == "rpi5"
    message = error["message"]
    assert "it would fail on every device" in message
    assert "does not run on generated inputs" in message
    assert "fleetctl push --sample-inputs FILE.npz" in message and "health contract" in message
    assert ModelVersion.objects.get(version="1.0").state == "draft"


def test_it_refuses_at_release_golden_inputs_the_model_cannot_run(client, ci_token, vad, silero_model):
    # Names, dtypes and ranks fit the declared inputs, but silero-vad takes 512 samples at 16 kHz.
    short = {"dtype": "float32", "shape": [1, 100], "data": [0.0] * 100}
    create_version(client, ci_token, "vad", "1.0", health=contract(input=short))
    assert upload(client, ci_token, "vad", "1.0", hardware="rpi5", data=silero_model).status_code == 201

    response = release(client, ci_token, "1.0")

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "precheck_failed"
    assert "on the health contract's golden inputs" in error["message"] and "inference failed" in error["message"]


def test_it_releases_silero_vad_without_a_contract_and_the_device_precheck_passes(
    client, ci_token, read_token, vad, silero_model, isolated_storage
):
    create_version(client, ci_token, "vad", "1.0")
    assert upload(client, ci_token, "vad", "1.0", hardware="rpi5", data=silero_model).status_code == 201

    response = release(client, ci_token, "1.0")

    assert response.status_code == 200, response.content
    keys = client.get("/api/v1/keys/", **read_token.headers).json()
    manifest = verify_release(response.json(), Keyring.from_pems(next(k["public_key_pem"] for k in keys if k["role"] == "release")))
    assert manifest.health is None
    stored = isolated_storage / Artifact.objects.get().storage_key
    # What a canary runs on this release: the precheck without a contract.
    result = run_precheck(stored, manifest.health, timeout=60, memory_mb=2048)
    assert result.ok, result.detail
