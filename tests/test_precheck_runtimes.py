"""A precheck for every format the registry accepts: runtimes picked by the artifact's `format`
(agent.runtimes: onnx in onnxruntime, tflite in ai-edge-litert), a device refusing a format it
has no runtime for (NO_PRECHECK_RUNTIME) unless the contract says `"precheck": "none"`, the
registry refusing such a release and a file that claims tflite but is not one; and, end to end,
a real TFLite model (built in the test, tests/support/tflite_models.py) released through the API
and committed on a real `fleet-agent run` over a real Mosquitto."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from hashlib import sha256

import pytest

from agent import signing
from agent.admission import Accept, Refuse, admit
from agent.precheck import run_precheck
from agent.protocol import ErrorCode, utcnow, verify_release
from agent.runtimes import FORMATS, RUNTIMES, installed_formats
from agent.signing import Keyring
from tests.support import directives
from tests.support.agent_harness import PROGRESS, Keys, journal, release_envelope
from tests.support.registry_api import (
    create_hardware,
    create_model,
    create_version,
    files_under,
    upload,
    version_url,
)
from tests.support.tflite_models import tflite_linear_contract, tflite_linear_model

MODEL = "detector"
HW = "test-hw"


@pytest.fixture
def tflite_file(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(tflite_linear_model(scale=3.0, bias=0.5))
    return path


def precheck(path, contract, **kwargs):
    return run_precheck(path, contract, timeout=30, memory_mb=2048, **kwargs)


# --- the agent's precheck ------------------------------------------------------------------------


def test_it_has_a_runtime_for_onnx_and_tflite_and_both_are_installed_here():
    assert FORMATS == ("onnx", "tflite") and set(RUNTIMES) == {"onnx", "tflite"}
    assert installed_formats() == {"onnx", "tflite"}


def test_it_prechecks_a_real_tflite_model_against_its_golden_contract(tflite_file):
    result = precheck(tflite_file, tflite_linear_contract(scale=3.0, bias=0.5), format="tflite")
    assert result.ok and result.detail == "golden outputs match", result.detail
    assert result.latency_ms is not None and result.latency_ms > 0


def test_it_fails_a_tflite_model_whose_outputs_differ_from_the_contract(tflite_file):
    result = precheck(tflite_file, tflite_linear_contract(scale=2.0, bias=1.0), format="tflite")
    assert not result.ok
    assert "output 'y' differs from the golden output" in result.detail, result.detail


def test_it_runs_a_tflite_model_on_generated_inputs_without_a_contract(tflite_file):
    result = precheck(tflite_file, None, format="tflite")
    assert result.ok and "generated inputs (x [1, 4] float32)" in result.detail, result.detail


def test_it_refuses_golden_inputs_the_tflite_model_does_not_take(tflite_file):
    wrong_dtype = {"inputs": {"x": {"dtype": "int64", "shape": [1, 4], "data": [1, 2, 3, 4]}}}
    result = precheck(tflite_file, wrong_dtype, format="tflite")
    assert not result.ok and "inference failed" in result.detail and "INT64" in result.detail, result.detail
    unknown = {"inputs": {"image": {"dtype": "float32", "shape": [1, 4], "data": [0.0] * 4}}}
    result = precheck(tflite_file, unknown, format="tflite")
    assert not result.ok and "contract input 'image' is not a model input (['x'])" in result.detail


def test_it_says_a_file_that_is_no_tflite_model_does_not_load(tmp_path):
    fake = tmp_path / "fake.tflite"
    fake.write_bytes(b"\x10\x00\x00\x00TFL3" + b"\x00" * 64)  # the identifier, then nothing sound
    result = precheck(fake, None, format="tflite")
    assert not result.ok and result.detail.startswith("model does not load"), result.detail


def test_it_says_what_to_install_when_the_tflite_runtime_is_missing(tflite_file, tmp_path, monkeypatch):
    shadow = tmp_path / "shadow" / "ai_edge_litert"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'ai_edge_litert'\")\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow.parent))
    result = precheck(tflite_file, None, format="tflite")
    assert not result.ok
    assert "model runtime missing" in result.detail and "modelfleet[runtime]" in result.detail, result.detail


def test_it_skips_the_precheck_when_the_contract_says_none_and_knows_no_other_format(tmp_path):
    blob = tmp_path / "model.engine"
    blob.write_bytes(os.urandom(256))
    skipped = precheck(blob, {"precheck": "none"}, format="tensorrt")
    assert skipped.ok and "skipped" in skipped.detail
    refused = precheck(blob, None, format="tensorrt")
    assert not refused.ok and "no precheck runtime for format 'tensorrt'" in refused.detail


# --- admission -----------------------------------------------------------------------------------


def decide(payload: bytes, **view):
    known = directives.Known()
    return admit(payload=payload, device=dataclasses.replace(known.view(), **view),
                 release_keys=Keyring.from_pems(directives.RELEASE_PEM),
                 rollout_keys=Keyring.from_pems(directives.ROLLOUT_PEM), now=utcnow())


def test_it_refuses_a_format_whose_runtime_this_box_lacks_unless_the_contract_skips_the_precheck():
    tflite = directives.directive(rel=directives.release(
        artifacts=[directives.entry(format="tflite", file_name="model.tflite")]))
    assert isinstance(decide(tflite), Accept)
    # A box installed without ai-edge-litert.
    refused = decide(tflite, precheck_formats={"onnx"})
    assert isinstance(refused, Refuse) and refused.code == ErrorCode.NO_PRECHECK_RUNTIME
    assert ErrorCode.NO_PRECHECK_RUNTIME == "NO_PRECHECK_RUNTIME"
    assert refused.record_seq and refused.seq == 6
    assert "format 'tflite'" in refused.message and "this device prechecks: onnx" in refused.message
    skipping = directives.release(artifacts=[directives.entry(format="tflite", file_name="model.tflite")],
                                  health={"precheck": "none"})
    assert isinstance(decide(directives.directive(rel=skipping), precheck_formats={"onnx"}), Accept)


def test_the_agent_refuses_a_tensorrt_release_and_leaves_the_running_model_alone(tmp_path):
    known = directives.Known()
    agent = directives.agent_for(tmp_path, known)
    before = json.loads((agent.state_dir / "journal.json").read_text())

    tensorrt = directives.release(artifacts=[directives.entry(format="tensorrt")])
    agent.handle_payload(directives.directive(rel=tensorrt))

    [event] = directives.events(agent)
    assert (event["state"], event["error_code"], event["seq"]) == ("rejected", "NO_PRECHECK_RUNTIME", 6)
    after = json.loads((agent.state_dir / "journal.json").read_text())
    assert after["models"] == before["models"] and after["update"] is None
    assert after["seqs"][directives.MODEL] == 6


# --- the registry --------------------------------------------------------------------------------


@pytest.fixture
def model(client, ci_token, db):
    create_hardware(client, ci_token, HW)
    create_model(client, ci_token, MODEL)
    return MODEL


def release(client, token, version: str):
    return client.post(f"{version_url(MODEL, version)}/release", **token.headers)


def test_it_refuses_a_file_that_claims_tflite_but_is_not_one(client, ci_token, model, isolated_storage):
    create_version(client, ci_token, MODEL, "1.0")
    response = upload(client, ci_token, MODEL, "1.0", hardware=HW, data=b"PK\x03\x04 a zip, not a model",
                      fmt="tflite", file_name="model.tflite")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid_tflite" and "TFLite file identifier" in error["message"], error
    assert files_under(isolated_storage) == []


def test_it_refuses_a_release_no_precheck_runtime_can_check(client, ci_token, model, read_token):
    create_version(client, ci_token, MODEL, "1.0")
    engine = os.urandom(2048)
    assert upload(client, ci_token, MODEL, "1.0", hardware=HW, data=engine, fmt="tensorrt",
                  file_name="model.engine").status_code == 201

    response = release(client, ci_token, "1.0")

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "no_precheck_runtime"
    assert (error["hardware"], error["format"], error["file_name"]) == (HW, "tensorrt", "model.engine")
    assert "'tensorrt'" in error["message"] and '{"precheck": "none"}' in error["message"]

    # The same model with a contract that leaves the decision to the trial is released.
    create_version(client, ci_token, MODEL, "1.1", health={"precheck": "none"})
    assert upload(client, ci_token, MODEL, "1.1", hardware=HW, data=engine, fmt="tensorrt",
                  file_name="model.engine").status_code == 201
    response = release(client, ci_token, "1.1")
    assert response.status_code == 200, response.content
    keys = client.get("/api/v1/keys/", **read_token.headers).json()
    pem = next(k["public_key_pem"] for k in keys if k["role"] == "release")
    manifest = verify_release(response.json(), Keyring.from_pems(pem))
    assert manifest.health == {"precheck": "none"} and manifest.artifacts[0].format == "tensorrt"


def test_it_refuses_a_tflite_upload_that_does_not_fit_the_contract_naming_both_sides(client, ci_token, model):
    contract = {"inputs": {"x": {"dtype": "int64", "shape": [1, 3], "data": [1, 2, 3]},
                           "image": {"dtype": "float32", "shape": [1], "data": [0.0]}}}
    create_version(client, ci_token, MODEL, "1.0", health=contract)

    response = upload(client, ci_token, MODEL, "1.0", hardware=HW, data=tflite_linear_model(), fmt="tflite",
                      file_name="model.tflite")

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "health_contract_mismatch", error
    problems = {m["tensor"]: m for m in error["mismatches"]}
    assert problems["inputs.x"]["model"] == "float32 [1, 4]"
    assert "dtype int64 against the model's float32" in [m["problem"] for m in error["mismatches"]]
    assert "is not an input of the model" in problems["inputs.image"]["problem"]


def test_it_refuses_a_truncated_tflite_upload(client, ci_token, model, isolated_storage):
    create_version(client, ci_token, MODEL, "1.0")
    response = upload(client, ci_token, MODEL, "1.0", hardware=HW, data=tflite_linear_model()[:200], fmt="tflite",
                      file_name="model.tflite")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid_tflite" and "200-byte file" in error["message"], error
    assert files_under(isolated_storage) == []


def test_it_runs_the_tflite_precheck_at_release(client, ci_token, model):
    # Well formed, fits its (absent) contract, yet no interpreter here has the operator it uses.
    create_version(client, ci_token, MODEL, "1.0")
    assert upload(client, ci_token, MODEL, "1.0", hardware=HW, data=tflite_linear_model(custom_op="NoSuchOp"),
                  fmt="tflite", file_name="model.tflite").status_code == 201

    response = release(client, ci_token, "1.0")

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "precheck_failed" and "unresolved custom op: NoSuchOp" in error["detail"], error


@pytest.mark.parametrize("health, phrase", [
    ({"precheck": "skip"}, 'health.precheck may only be "none"'),
    ({"precheck": "none", "latency_budget_ms": 50}, "latency_budget_ms would never be checked"),
])
def test_it_refuses_a_precheck_key_other_than_none_alone(client, ci_token, model, health, phrase):
    response = client.post(f"/api/v1/models/{MODEL}/versions/", {"version": "1.0", "health": health},
                           content_type="application/json", **ci_token.headers)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid_health" and phrase in error["message"], error


# --- end to end ----------------------------------------------------------------------------------


def _signed_payload(envelope: dict) -> dict:
    return json.loads(base64.b64decode(envelope["payload"]))


def _api_release(client, token, version: str, data: bytes, fmt: str, file_name: str, health: dict | None):
    create_version(client, token, MODEL, version, **({"health": health} if health is not None else {}))
    response = upload(client, token, MODEL, version, hardware=HW, data=data, fmt=fmt, file_name=file_name)
    assert response.status_code == 201, response.content
    response = release(client, token, version)
    assert response.status_code == 200, response.content
    return response.json()


def test_a_tflite_model_released_through_the_api_is_prechecked_and_committed_on_a_real_agent(
    client, ci_token, model, rig, signing_keys
):
    # The registry signs with its release key; the device trusts it (and the rig's rollout key).
    server_release_key = signing.load_private_key_pem((signing_keys / "release.pem").read_bytes())
    rig.keys = Keys(release=server_release_key, rollout=rig.keys.rollout)
    v1 = tflite_linear_model(scale=3.0, bias=0.5)
    rel1 = _api_release(client, ci_token, "1.0", v1, "tflite", "model.tflite",
                        tflite_linear_contract(scale=3.0, bias=0.5))
    [entry1] = _signed_payload(rel1)["artifacts"]
    assert entry1["format"] == "tflite" and entry1["file_name"] == "model.tflite"
    # Golden outputs are judged on the devices, so the registry releases a model that gives others.
    v2 = tflite_linear_model(scale=2.0, bias=1.0)
    rel2 = _api_release(client, ci_token, "2.0", v2, "tflite", "model.tflite",
                        tflite_linear_contract(scale=3.0, bias=0.5))
    [entry2] = _signed_payload(rel2)["artifacts"]

    state = rig.tmp / "dev-1" / "state"
    rig.config("dev-1")
    agent = rig.agent("dev-1").start()

    def send(seq: int, rel: dict, entry: dict, data: bytes) -> dict:
        url = rig.server.add(f"/artifacts/{entry['sha256']}", data)
        rig.publish_directive("dev-1", rig.directive("dev-1", seq, MODEL, rel, entry, url=url))
        return rig.subscriber.wait_outcome("dev-1", seq, agent=agent)

    first = send(1, rel1, entry1, v1)
    assert first["state"] == "committed" and first["active_sha256"] == entry1["sha256"], first
    assert [e["state"] for e in rig.subscriber.events_for("dev-1", 1)] == PROGRESS
    assert first["health"]["precheck_latency_ms"] is not None
    app_file = state / "models" / MODEL / "current" / "model.tflite"
    assert app_file.read_bytes() == v1

    second = send(2, rel2, entry2, v2)
    assert (second["state"], second["error_code"]) == ("failed", "PRECHECK_FAILED"), second
    assert "differs from the golden output" in second["detail"]
    assert app_file.read_bytes() == v1

    # A format no runtime here can load: refused before any download, v1 still running.
    engine = os.urandom(1024)
    trt = {"hardware": HW, "format": "tensorrt", "file_name": "model.engine", "length": len(engine),
           "sha256": sha256(engine).hexdigest()}
    rel3 = release_envelope(rig.keys, model=MODEL, version="3.0", counter=10, artifacts=[trt])
    downloads = len(rig.server.requests)
    third = send(3, rel3, trt, engine)
    assert (third["state"], third["error_code"]) == ("rejected", "NO_PRECHECK_RUNTIME"), third
    assert len(rig.server.requests) == downloads
    assert app_file.read_bytes() == v1 and journal(state)["models"][MODEL]["current"] == entry1["sha256"]

    # With "precheck": "none" (released through the API) the trial decides alone.
    rel4 = _api_release(client, ci_token, "4.0", engine, "tensorrt", "model.engine", {"precheck": "none"})
    [entry4] = _signed_payload(rel4)["artifacts"]
    fourth = send(4, rel4, entry4, engine)
    assert fourth["state"] == "committed" and fourth["active_sha256"] == entry4["sha256"], fourth
    assert [e["state"] for e in rig.subscriber.events_for("dev-1", 4)] == PROGRESS
    assert (state / "models" / MODEL / "current" / "model.engine").read_bytes() == engine

    # The interpreter ran in the precheck children only, never in the daemon.
    maps = open(f"/proc/{agent.pid}/maps").read()
    assert "litert" not in maps.lower() and "tensorflow" not in maps.lower()
    assert agent.stop() == 0

