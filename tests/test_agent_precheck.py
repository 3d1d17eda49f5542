"""Precheck child: the model runtime is an optional extra; a box without it fails the precheck
with a reason that says what to install. Without golden inputs the model runs on inputs
generated from its declared ones, dynamic sizes included (a real model: silero-vad); when none
runs, the reason says to give golden inputs. (The full matrix of precheck failures runs in
tests/test_agent_refusals.py.)"""

from __future__ import annotations

import threading
import time

import pytest

from agent.precheck import generated_inputs, run_precheck
from tests.support.onnx_models import fixed_length_model, linear_model
from tests.support.silero import silero_vad_onnx


@pytest.fixture(scope="session")
def silero_model(request) -> bytes:
    return silero_vad_onnx(request.config)


def test_it_says_what_to_install_when_the_runtime_is_missing(tmp_path, monkeypatch):
    model = tmp_path / "model.onnx"
    model.write_bytes(linear_model())
    shadow = tmp_path / "shadow" / "onnxruntime"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'onnxruntime'\")\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow.parent))

    result = run_precheck(model, None, timeout=60, memory_mb=2048)

    assert not result.ok
    assert "model runtime missing" in result.detail and "modelfleet[runtime]" in result.detail, result.detail


def test_it_loads_and_runs_a_model_without_a_contract(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(linear_model())
    result = run_precheck(model, None, timeout=60, memory_mb=2048)
    assert result.ok, result.detail


def test_it_runs_silero_vad_on_generated_inputs_without_a_contract(tmp_path, silero_model):
    # Dynamic dims set to 1 (the old default) fail inside the model's STFT padding:
    # "Pad reflect requires axis length >= 2"; every canary reported PRECHECK_FAILED.
    model = tmp_path / "silero_vad.onnx"
    model.write_bytes(silero_model)

    result = run_precheck(model, None, timeout=60, memory_mb=2048)

    assert result.ok, result.detail
    assert "input [1, 512] float32" in result.detail and "state [2, 1, 128] float32" in result.detail
    assert "sr int64 = 16000" in result.detail
    assert result.latency_ms is not None


def test_it_says_to_give_golden_inputs_when_no_generated_input_runs(tmp_path):
    model = tmp_path / "fixed.onnx"
    model.write_bytes(fixed_length_model(length=100))

    result = run_precheck(model, None, timeout=60, memory_mb=2048)

    assert not result.ok
    assert "does not run on generated inputs" in result.detail, result.detail
    assert "fleetctl push --sample-inputs" in result.detail and "health contract" in result.detail


def test_it_gives_named_dims_one_size_and_batch_dims_one():
    declared = [
        ("input", "tensor(float)", ["batch", "sequence"]),
        ("state", "tensor(float)", [2, "batch", 128]),
        ("sr", "tensor(int64)", []),
    ]
    first, feeds = next(generated_inputs(declared))
    assert {name: list(array.shape) for name, array in feeds.items()} == {
        "input": [1, 512], "state": [2, 1, 128], "sr": [],
    }
    assert first == "input [1, 512] float32, state [2, 1, 128] float32, sr int64 = 1"
    tried = [description for description, _ in generated_inputs([("x", "tensor(float)", [None, 3, None, None])])]
    assert tried == [
        "x [1, 3, 1, 512] float32", "x [1, 3, 16, 16] float32", "x [1, 3, 224, 224] float32", "x [1, 3, 1, 1] float32",
    ]
    with pytest.raises(ValueError, match="tensor\\(string\\)"):
        list(generated_inputs([("text", "tensor(string)", [None])]))


def test_it_applies_a_latency_budget_that_comes_without_golden_inputs(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(linear_model())

    assert run_precheck(model, {"latency_budget_ms": 1000}, timeout=60, memory_mb=2048).ok
    over = run_precheck(model, {"latency_budget_ms": 0.000001}, timeout=60, memory_mb=2048)
    assert not over.ok and "over the budget" in over.detail, over.detail


def test_it_kills_the_child_when_told_to_stop(tmp_path):
    # A newer directive superseding the update (or the agent stopping) must not wait for a precheck
    # that may run for minutes: the child is killed, and the result is no verdict on the model.
    model = tmp_path / "model.onnx"
    model.write_bytes(linear_model())
    stop = threading.Event()
    threading.Timer(0.05, stop.set).start()
    started = time.monotonic()
    result = run_precheck(model, None, timeout=60, memory_mb=2048, stop=stop)
    assert result.interrupted and not result.ok, result
    assert time.monotonic() - started < 1.5
    # Not set: the precheck runs to its verdict as before.
    assert run_precheck(model, None, timeout=60, memory_mb=2048, stop=threading.Event()).ok
