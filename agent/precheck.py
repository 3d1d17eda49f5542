"""Precheck: prove a staged model loads and answers correctly before `current` is touched.

The model runtime (onnxruntime) is loaded only in a child process (`python -m agent.precheck`),
never in the daemon: the daemon stays small, and a model that crashes, hangs or eats memory
takes down only the child. The child caps its own address space and CPU time with
resource.setrlimit before importing the runtime; the parent enforces the wall-clock timeout.

Health contract (signed in the release manifest):
  {"inputs": {NAME: {"dtype": "float32", "shape": [..], "data": [flat list]}},
   "outputs": {NAME: {...}}, "atol": float, "rtol": float, "latency_budget_ms": number}
Without a contract the model must load and run one inference on zeros of the declared input
shapes (dynamic dimensions set to 1).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from agent.journal import child_env


@dataclass(frozen=True)
class PrecheckResult:
    ok: bool
    detail: str
    latency_ms: float | None = None


def run_precheck(model_path: Path, contract: dict | None, *, timeout: float, memory_mb: int) -> PrecheckResult:
    request = json.dumps(
        {"model": str(model_path), "contract": contract, "memory_mb": memory_mb, "cpu_seconds": int(timeout) + 1}
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "agent.precheck"],
            input=request.encode(),
            capture_output=True,
            timeout=timeout,
            env=child_env(OMP_NUM_THREADS="1"),
            close_fds=True,
        )
    except subprocess.TimeoutExpired:
        return PrecheckResult(False, f"precheck timed out after {timeout:g}s")
    except OSError as exc:
        return PrecheckResult(False, f"precheck child could not start: {exc}")
    lines = proc.stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        tail = proc.stderr.decode("utf-8", "replace").strip()[-500:]
        if any(marker in tail for marker in ("MemoryError", "Memory allocation", "bad_alloc", "Cannot allocate")):
            return PrecheckResult(False, f"precheck child exceeded its {memory_mb} MB memory limit: {tail[-300:]}")
        if proc.returncode < 0:
            return PrecheckResult(False, f"precheck child killed by signal {-proc.returncode} (limits?) {tail}")
        return PrecheckResult(False, f"precheck child failed (exit {proc.returncode}): {tail}")
    return PrecheckResult(bool(answer.get("ok")), str(answer.get("detail", "")), answer.get("latency_ms"))


# --- child ------------------------------------------------------------------------------------

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def _limit(memory_mb: int, cpu_seconds: int) -> None:
    import resource

    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))


def _check(model: str, contract: dict | None) -> dict:
    import time

    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types for unloadable files
        return {"ok": False, "detail": f"model does not load: {str(exc)[:400]}"}
    declared = {i.name: i for i in session.get_inputs()}
    if contract:
        feeds = {}
        for name, spec in (contract.get("inputs") or {}).items():
            if name not in declared:
                return {"ok": False, "detail": f"contract input {name!r} is not a model input ({sorted(declared)})"}
            try:
                feeds[name] = np.asarray(spec["data"], dtype=spec.get("dtype", "float32")).reshape(spec["shape"])
            except (KeyError, TypeError, ValueError) as exc:
                return {"ok": False, "detail": f"contract input {name!r} is unusable: {exc}"}
        missing = sorted(set(declared) - set(feeds))
        if missing:
            return {"ok": False, "detail": f"contract gives no data for model inputs {missing}"}
    else:
        feeds = {}
        for name, inp in declared.items():
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
            dtype = _ORT_TYPES.get(inp.type)
            if dtype is None:
                return {"ok": False, "detail": f"input {name!r} has unsupported type {inp.type}"}
            feeds[name] = np.zeros(shape, dtype=dtype)
    output_names = [o.name for o in session.get_outputs()]
    try:
        outputs = session.run(output_names, feeds)
        timings = []
        for _ in range(5):
            t0 = time.perf_counter()
            session.run(output_names, feeds)
            timings.append((time.perf_counter() - t0) * 1000)
    except Exception as exc:
        return {"ok": False, "detail": f"inference failed: {str(exc)[:400]}"}
    latency = sorted(timings)[len(timings) // 2]
    if not contract:
        return {"ok": True, "detail": "model loads and runs on zero inputs", "latency_ms": latency}
    got = dict(zip(output_names, outputs))
    atol = float(contract.get("atol", 1e-5))
    rtol = float(contract.get("rtol", 1e-4))
    for name, spec in (contract.get("outputs") or {}).items():
        if name not in got:
            return {"ok": False, "detail": f"model has no output {name!r}", "latency_ms": latency}
        expected = np.asarray(spec["data"], dtype=spec.get("dtype", "float32")).reshape(spec["shape"])
        actual = np.asarray(got[name])
        if actual.shape != expected.shape:
            return {
                "ok": False,
                "detail": f"output {name!r} has shape {list(actual.shape)}, contract says {list(expected.shape)}",
                "latency_ms": latency,
            }
        if not np.allclose(actual, expected, atol=atol, rtol=rtol):
            worst = float(np.max(np.abs(actual.astype("float64") - expected.astype("float64"))))
            return {
                "ok": False,
                "detail": f"output {name!r} differs from the golden output (max abs error {worst:.6g}, "
                f"atol {atol}, rtol {rtol})",
                "latency_ms": latency,
            }
    budget = contract.get("latency_budget_ms")
    if budget is not None and latency > float(budget):
        return {
            "ok": False,
            "detail": f"median latency {latency:.3f} ms is over the budget of {budget} ms",
            "latency_ms": latency,
        }
    return {"ok": True, "detail": "golden outputs match", "latency_ms": latency}


def child_main() -> int:
    request = json.loads(sys.stdin.read())
    _limit(int(request["memory_mb"]), int(request["cpu_seconds"]))
    try:
        answer = _check(request["model"], request.get("contract"))
    except ImportError as exc:  # the bare install: the runtime is an optional extra
        answer = {"ok": False, "detail": f"model runtime missing ({exc}): install modelfleet[runtime] on this box"}
    except MemoryError:
        answer = {"ok": False, "detail": f"model exceeded the {request['memory_mb']} MB memory limit"}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
