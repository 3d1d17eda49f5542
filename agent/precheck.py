"""Precheck: prove a staged model loads and answers correctly before `current` is touched.

The model runtime is picked by the artifact's `format` (agent.runtimes: onnxruntime for onnx,
ai-edge-litert for tflite) and loaded only in a child process (`python -m agent.precheck`),
never in the daemon: the daemon stays small, and a model that crashes, hangs or eats memory
takes down only the child. The child caps its own address space and CPU time with
resource.setrlimit before importing the runtime; the parent enforces the wall-clock timeout.
The registry runs the same function at release time (registry.release_check), so a model this
precheck cannot run is refused there instead of failing on every canary.

Health contract (signed in the release manifest; README.md "Health contracts"):
  {"inputs": {NAME: {"dtype": "float32", "shape": [..], "data": [flat list]}},
   "outputs": {NAME: {...}}, "atol": float, "rtol": float, "latency_budget_ms": number,
   "precheck": "none"}
With `"precheck": "none"` nothing runs and the result is ok: the release's trial decides alone
(for a format no runtime here can load; admission refuses such a release otherwise).
With golden inputs the model runs on them and, when the contract has outputs, must reproduce
them within atol + rtol * |expected| (defaults 1e-5, 1e-4). Without golden inputs (no contract,
or one with only a latency budget) the model runs on generated inputs: zeros of the declared
shapes with dynamic dimensions filled in by a few size plans (`generated_inputs`), the first
that runs wins; when none runs, the detail says to give the release golden inputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.journal import child_env
from agent.runtimes import RUNTIMES, precheck_skipped

# The contract rides in the signed release manifest, which travels base64-encoded inside every
# device's directive, itself capped at 64 KiB (agent.protocol.MAX_PAYLOAD_BYTES): two rounds of
# base64 leave about 36 KiB of manifest, of which the contract may take this much (compact JSON).
CONTRACT_MAX_BYTES = 24 * 1024
CONTRACT_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")

# What to tell someone whose model cannot be prechecked without golden inputs.
GOLDEN_INPUTS_HINT = (
    "give the release golden inputs: `fleetctl push --sample-inputs FILE.npz` (one array per model "
    "input) or a health contract with `inputs` (`health` in POST /api/v1/models/{name}/versions/)"
)


@dataclass(frozen=True)
class PrecheckResult:
    ok: bool
    detail: str
    latency_ms: float | None = None
    interrupted: bool = False  # `stop` was set: the child was killed, no verdict on the model


def run_precheck(model_path: Path, contract: dict | None, *, timeout: float, memory_mb: int,
                 stop=None, format: str | None = "onnx") -> PrecheckResult:
    """Run the precheck child on `model_path` with the runtime for `format` (None, from a journal
    written before formats were recorded: onnx, the only one then); `stop` (anything with
    is_set()), once set, kills the child within a fraction of a second (the agent stopping, or a
    newer directive superseding the update) and the result says `interrupted`."""
    format = format or "onnx"
    if precheck_skipped(contract):
        return PrecheckResult(True, "precheck skipped: the health contract says \"precheck\": \"none\"")
    if format not in RUNTIMES:
        return PrecheckResult(False, f"no precheck runtime for format {format!r} (known: {', '.join(RUNTIMES)})")
    answer = child_answer("agent.precheck", {
        "model": str(model_path),
        "format": format,
        "contract": contract,
        "memory_mb": memory_mb,
        "cpu_seconds": int(timeout) + 1,
        # Generated inputs stop being tried after this, so the answer beats the timeout.
        "search_seconds": timeout / 2,
    }, timeout=timeout, memory_mb=memory_mb, stop=stop, what="precheck")
    if isinstance(answer, PrecheckResult):
        return answer
    return PrecheckResult(bool(answer.get("ok")), str(answer.get("detail", "")), answer.get("latency_ms"))


def child_answer(module: str, request: dict, *, timeout: float, memory_mb: int, stop=None,
                 what: str) -> dict | PrecheckResult:
    """Run `python -m module` with `request` as JSON on stdin and return the JSON object it prints
    last; or a failed PrecheckResult saying why there is none (it could not start, timed out, ran
    out of memory, died), `interrupted` when `stop` was set meanwhile. The precheck and the shadow
    evaluation (agent.shadow) both load models only in such a child."""
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(OMP_NUM_THREADS="1"),
            close_fds=True,
        )
    except OSError as exc:
        return PrecheckResult(False, f"{what} child could not start: {exc}")
    deadline = time.monotonic() + timeout
    pending: bytes | None = json.dumps(request).encode()
    while True:
        try:
            out, err = proc.communicate(pending, timeout=max(0.0, min(0.1, deadline - time.monotonic())))
            break
        except subprocess.TimeoutExpired:
            pending = None  # sent with the first call; communicate() keeps what was read so far
            interrupted = stop is not None and stop.is_set()
            if interrupted or time.monotonic() >= deadline:
                proc.kill()
                proc.communicate()
                if interrupted:
                    return PrecheckResult(False, f"{what} interrupted", interrupted=True)
                return PrecheckResult(False, f"{what} timed out after {timeout:g}s")
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    lines = proc.stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        tail = proc.stderr.decode("utf-8", "replace").strip()[-500:]
        if any(marker in tail for marker in ("MemoryError", "Memory allocation", "bad_alloc", "Cannot allocate")):
            return PrecheckResult(False, f"{what} child exceeded its {memory_mb} MB memory limit: {tail[-300:]}")
        if proc.returncode < 0:
            return PrecheckResult(False, f"{what} child killed by signal {-proc.returncode} (limits?) {tail}")
        return PrecheckResult(False, f"{what} child failed (exit {proc.returncode}): {tail}")
    return answer


# --- generated inputs -------------------------------------------------------------------------

ORT_DTYPES = {
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

# Sizes for dynamic dimensions, tried in order: (the last dimension, any other). One size never
# suits every model: 512 is an audio chunk or a token sequence next to a state of batch 1
# (silero-vad: input [1, 512], state [2, 1, 128]), 16 a short sequence or a small feature map,
# 224 an image's height and width, 1 the smallest anything accepts.
SIZE_PLANS = ((512, 1), (16, 16), (224, 224), (1, 1))
# Values for integer scalar inputs (a count, a sample rate, an index), tried with every plan.
INT_SCALARS = (1, 16000, 0)


def _batch_like(name: str) -> bool:
    lowered = name.lower()
    return "batch" in lowered or lowered in ("n", "b", "bs")


def _shape(dims: list, plan: tuple[int, int], named: dict[str, int]) -> list[int]:
    last, other = plan
    shape = []
    for index, dim in enumerate(dims):
        if isinstance(dim, int) and dim > 0:
            shape.append(dim)
            continue
        name = dim if isinstance(dim, str) and dim else None
        if name is not None and name in named:
            shape.append(named[name])
            continue
        if (name is not None and _batch_like(name)) or (index == 0 and len(dims) > 1):
            size = 1  # the leading dimension of a tensor of rank >= 2 is its batch
        elif index == len(dims) - 1:
            size = last
        else:
            size = other
        if name is not None:
            named[name] = size
        shape.append(size)
    return shape


def generated_inputs(declared: list[tuple[str, str, list]]) -> Iterator[tuple[str, dict]]:
    """Feeds to try, in order, for inputs declared as (name, onnxruntime type, shape).

    Zeros of the declared shapes; dynamic dimensions filled in by SIZE_PLANS (a dimension named
    like a batch, or the leading one of a tensor of rank >= 2, is 1; equally named dimensions
    get one size), integer scalars set to each of INT_SCALARS. Raises ValueError for an input
    no zeros can stand in for (strings, sequences, maps).
    """
    import numpy as np

    for name, type_, _ in declared:
        if type_ not in ORT_DTYPES:
            raise ValueError(f"input {name!r} is {type_}, which generated inputs cannot stand in for")
    int_scalars = [name for name, type_, dims in declared if not dims and type_.startswith("tensor(int")]
    seen = set()
    for plan in SIZE_PLANS:
        named: dict[str, int] = {}
        shapes = {name: _shape(dims, plan, named) for name, _, dims in declared}
        for scalar in INT_SCALARS if int_scalars else (None,):
            signature = (tuple(tuple(s) for s in shapes.values()), scalar)
            if signature in seen:
                continue
            seen.add(signature)
            feeds, parts = {}, []
            for name, type_, _ in declared:
                dtype = ORT_DTYPES[type_]
                if name in int_scalars:
                    feeds[name] = np.array(scalar, dtype=dtype)
                    parts.append(f"{name} {dtype} = {scalar}")
                else:
                    feeds[name] = np.zeros(shapes[name], dtype=dtype)
                    parts.append(f"{name} {shapes[name]} {dtype}")
            yield ", ".join(parts), feeds


# --- child ------------------------------------------------------------------------------------


def limit_resources(memory_mb: int, cpu_seconds: int) -> None:
    import resource

    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))


def _run_generated(session, search_seconds: float):
    """(feeds, outputs, description) of the first generated inputs the model runs on, or a reason.
    `session`: an agent.runtimes Session."""
    import time

    declared = session.inputs()
    started = time.monotonic()
    first_error, tried = None, []
    try:
        for description, feeds in generated_inputs(declared):
            if tried and time.monotonic() - started > search_seconds:
                break
            tried.append(description)
            try:
                return feeds, session.run(feeds, quiet=True), description
            except Exception as exc:  # the runtimes raise several unrelated types
                first_error = first_error or str(exc).strip()
    except ValueError as exc:
        return f"the model cannot be run without golden inputs: {exc}; {GOLDEN_INPUTS_HINT}"
    if len(first_error or "") > 300:
        first_error = first_error[:300] + "..."
    return (
        f"the model does not run on generated inputs (zeros of the declared shapes; {len(tried)} tries, "
        f"first {tried[0] if tried else 'none'}; first error: {first_error}); {GOLDEN_INPUTS_HINT}"
    )


def _check(model: str, contract: dict | None, search_seconds: float = 30.0, format: str = "onnx") -> dict:
    import time

    import numpy as np

    runtime = RUNTIMES.get(format)
    if runtime is None:
        return {"ok": False, "detail": f"no precheck runtime for format {format!r} (known: {', '.join(RUNTIMES)})"}
    try:
        session = runtime.load(model)
    except ImportError:
        raise
    except Exception as exc:  # the runtimes raise several unrelated types for unloadable files
        return {"ok": False, "detail": f"model does not load: {str(exc)[:400]}"}
    declared = {name: type_ for name, type_, _ in session.inputs()}
    output_names = session.output_names()
    contract = contract or {}
    if contract.get("inputs"):
        feeds = {}
        for name, spec in contract["inputs"].items():
            if name not in declared:
                return {"ok": False, "detail": f"contract input {name!r} is not a model input ({sorted(declared)})"}
            try:
                feeds[name] = np.asarray(spec["data"], dtype=spec.get("dtype", "float32")).reshape(spec["shape"])
            except (KeyError, TypeError, ValueError) as exc:
                return {"ok": False, "detail": f"contract input {name!r} is unusable: {exc}"}
        missing = sorted(set(declared) - set(feeds))
        if missing:
            return {"ok": False, "detail": f"contract gives no data for model inputs {missing}"}
        ran_on = "the contract's inputs"
        try:
            outputs = session.run(feeds)
        except Exception as exc:
            return {"ok": False, "detail": f"inference failed: {str(exc)[:400]}"}
    elif contract.get("outputs"):
        return {"ok": False, "detail": "the contract has golden outputs but no inputs to produce them"}
    else:
        found = _run_generated(session, search_seconds)
        if isinstance(found, str):
            return {"ok": False, "detail": found}
        feeds, outputs, description = found
        ran_on = f"generated inputs ({description})"
    try:
        timings = []
        for _ in range(5):
            t0 = time.perf_counter()
            session.run(feeds)
            timings.append((time.perf_counter() - t0) * 1000)
    except Exception as exc:
        return {"ok": False, "detail": f"inference failed: {str(exc)[:400]}"}
    latency = sorted(timings)[len(timings) // 2]
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
            "detail": f"median latency {latency:.3f} ms on {ran_on} is over the budget of {budget} ms",
            "latency_ms": latency,
        }
    if contract.get("outputs"):
        return {"ok": True, "detail": "golden outputs match", "latency_ms": latency}
    return {"ok": True, "detail": f"model loads and runs on {ran_on}", "latency_ms": latency}


def child_main() -> int:
    request = json.loads(sys.stdin.read())
    limit_resources(int(request["memory_mb"]), int(request["cpu_seconds"]))
    try:
        answer = _check(request["model"], request.get("contract"), float(request.get("search_seconds", 30)),
                        request.get("format") or "onnx")
    except ImportError as exc:  # the bare install: the runtime is an optional extra
        answer = {"ok": False, "detail": f"model runtime missing ({exc}): install modelfleet[runtime] on this box"}
    except MemoryError:
        answer = {"ok": False, "detail": f"model exceeded the {request['memory_mb']} MB memory limit"}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
