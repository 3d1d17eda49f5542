"""Precheck child: the model runtime is an optional extra; a box without it fails the precheck
with a reason that says what to install (the full matrix of precheck failures runs in
tests/test_agent_refusals.py)."""

from __future__ import annotations

from agent.precheck import run_precheck
from tests.support.onnx_models import linear_model


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
