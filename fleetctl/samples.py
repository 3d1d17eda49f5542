"""`fleetctl push --sample-inputs FILE.npz`: a health contract made from sample inputs.

Runs every artifact of the push locally with the device precheck's runtime for its format
(agent.runtimes: onnxruntime for onnx, ai-edge-litert for tflite) on the arrays of FILE.npz (one
per model input, named as the input), records the outputs as the golden outputs (every artifact
must give the same within the tolerances: a contract holds for all of a version's artifacts) and
a latency budget, and returns the contract that push signs into the release (README.md, "Health
contracts"). The runtime and numpy are imported only here, when the option is used: the rest of
fleetctl runs on the standard library.
"""

from __future__ import annotations

import importlib
import json
import math
import time
from pathlib import Path

from agent.runtimes import RUNTIMES, Runtime
from fleetctl.common import UsageError, eprint

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
# The latency budget when --health gives none: this many times the median measured here (a CI
# machine is usually faster than an edge box), and never below the floor.
BUDGET_FACTOR = 10
BUDGET_FLOOR_MS = 50
# What a --health file may add to a contract made from samples.
TUNABLE = ("atol", "rtol", "latency_budget_ms")


def _runtime(format: str):
    runtime = RUNTIMES.get(format)
    if runtime is None:
        raise UsageError(f"--sample-inputs runs the artifacts with the device precheck's runtime, and --format "
                         f"{format} has none (runtimes: {', '.join(RUNTIMES)})")
    try:
        import numpy

        importlib.import_module(runtime.package)
    except ImportError as exc:
        raise UsageError(
            f"--sample-inputs runs the model here with {runtime.package} and numpy, which this install lacks "
            f"({exc}); install them with: pip install 'modelfleet[runtime]'"
        ) from None
    return numpy, runtime


def _session(runtime: Runtime, path: Path):
    # As the device's precheck runs it (agent.runtimes): CPU, one thread.
    try:
        return runtime.load(str(path))
    except Exception as exc:  # the runtimes raise several unrelated types for unloadable files
        raise UsageError(f"--sample-inputs: {runtime.package} cannot load {path}: {str(exc)[:400]}") from None


def _load_samples(np, path: str) -> dict:
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"--sample-inputs {path}: no such file") from None
    except (OSError, ValueError, EOFError) as exc:
        raise UsageError(f"--sample-inputs {path}: not a usable .npz file: {exc}") from None
    if not hasattr(archive, "files"):  # a .npy file: one bare array
        raise UsageError(f"--sample-inputs {path}: a single array; save one array per model input name "
                         "with numpy.savez(FILE, NAME=array, ...)")
    try:
        with archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:  # e.g. object arrays, which would need pickle
        raise UsageError(f"--sample-inputs {path}: not a usable .npz file: {exc}") from None


def _compact(np, array) -> list:
    """The values as a flat JSON list, floats in the shortest decimal that reads back to the same
    number in the array's own dtype (float32 0.1 is `0.1`, not `0.10000000149011612`)."""
    flat = array.ravel()
    if array.dtype.kind != "f":
        return flat.tolist()
    values = [float(str(v)) for v in flat]
    back = np.asarray(values, dtype=array.dtype)
    for index in np.nonzero(back != flat)[0]:  # a decimal that rounds twice differently: exact
        values[index] = float(flat[index])
    return values


def _tensor(np, kind: str, name: str, array, dtypes) -> dict:
    if array.dtype.name not in dtypes:
        raise UsageError(f"--sample-inputs: {kind} {name!r} is {array.dtype.name}; a health contract holds "
                         f"only {', '.join(dtypes)}")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise UsageError(f"--sample-inputs: {kind} {name!r} holds NaN or infinity, which a health contract "
                         "(JSON) cannot carry; use samples on which the model gives finite values")
    return {"dtype": array.dtype.name, "shape": [int(d) for d in array.shape], "data": _compact(np, array)}


def _run(np, session, feeds: dict, label: str) -> tuple[dict, float]:
    names = session.output_names()
    try:
        outputs = session.run(feeds, quiet=True)  # quiet: a failure is reported below, once
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            session.run(feeds, quiet=True)
            timings.append((time.perf_counter() - started) * 1000)
    except Exception as exc:  # the runtimes raise several unrelated types
        raise UsageError(f"--sample-inputs: {label} does not run on the sample inputs: {str(exc)[:400]}") from None
    return dict(zip(names, (np.asarray(o) for o in outputs))), sorted(timings)[len(timings) // 2]


def _dims(shape) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else (d or "?") for d in shape) + "]"


def _check_names(np, session, samples: dict, label: str, path: str, ort_dtypes: dict) -> dict:
    declared = {name: (type_, dims) for name, type_, dims in session.inputs()}
    missing = [n for n in declared if n not in samples]
    extra = [n for n in samples if n not in declared]
    if missing or extra:
        wanted = ", ".join(f"{name} {ort_dtypes.get(type_, type_)} {_dims(dims)}"
                           for name, (type_, dims) in declared.items())
        raise UsageError(
            f"--sample-inputs {path} holds {', '.join(sorted(samples)) or 'no arrays'}; {label} has the inputs "
            f"{wanted}" + (f" (missing: {', '.join(missing)})" if missing else "")
            + (f" (not inputs of the model: {', '.join(extra)})" if extra else "")
        )
    for name, (type_, _) in declared.items():
        wanted = ort_dtypes.get(type_, type_)
        if samples[name].dtype.name != wanted:
            raise UsageError(
                f"--sample-inputs: {name!r} is {samples[name].dtype.name} in {path}, {label} takes {wanted} "
                f"(save it with .astype({wanted!r}))"
            )
    return {name: samples[name] for name in declared}


def health_from_samples(path: str, artifacts: list[tuple[str, Path]], format: str, base: dict | None) -> dict:
    """The health contract for `artifacts` [(hardware, file)] made from the arrays in `path`.

    `base` (a --health file) may set atol, rtol and latency_budget_ms; the samples give inputs
    and outputs. Raises UsageError (exit 2) for anything that keeps the contract from working.
    """
    np, runtime = _runtime(format)
    # agent.precheck is the contract's reader: its limit and dtypes (imports nothing heavy).
    from agent.precheck import CONTRACT_DTYPES, CONTRACT_MAX_BYTES, ORT_DTYPES

    base = dict(base or {})
    unknown = sorted(set(base) - set(TUNABLE))
    if unknown:
        raise UsageError(f"--health with --sample-inputs may set only {', '.join(TUNABLE)} (the samples give the "
                         f"inputs and outputs); the file also has {', '.join(unknown)}")
    atol = float(base.get("atol", DEFAULT_ATOL))
    rtol = float(base.get("rtol", DEFAULT_RTOL))
    samples = _load_samples(np, path)

    golden, golden_label, medians = None, "", []
    for hardware, file_path in artifacts:
        label = f"the model {file_path} ({hardware})"
        session = _session(runtime, file_path)
        feeds = _check_names(np, session, samples, label, path, ORT_DTYPES)
        outputs, median = _run(np, session, feeds, label)
        medians.append(median)
        if golden is None:
            golden, golden_label = outputs, label
            continue
        for name, expected in golden.items():
            actual = outputs.get(name)
            if actual is None or actual.shape != expected.shape or not np.allclose(actual, expected, atol=atol, rtol=rtol):
                worst = "" if actual is None or actual.shape != expected.shape else (
                    f" (max abs difference {float(np.max(np.abs(actual.astype('float64') - expected))):.6g})")
                raise UsageError(
                    f"--sample-inputs: output {name!r} of {label} differs from {golden_label}{worst}, beyond "
                    f"atol {atol}, rtol {rtol}; one health contract holds for every artifact of a version: push "
                    "them as separate versions, or loosen atol/rtol in a --health file"
                )

    median = max(medians)
    budget = base.get("latency_budget_ms") or max(BUDGET_FLOOR_MS, math.ceil(median * BUDGET_FACTOR))
    contract = {
        "inputs": {name: _tensor(np, "input", name, array, CONTRACT_DTYPES) for name, array in feeds.items()},
        "outputs": {name: _tensor(np, "output", name, array, CONTRACT_DTYPES) for name, array in golden.items()},
        "atol": atol,
        "rtol": rtol,
        "latency_budget_ms": budget,
    }
    size = len(json.dumps(contract, separators=(",", ":"), sort_keys=True).encode())
    if size > CONTRACT_MAX_BYTES:
        sizes = sorted(
            ((len(json.dumps(t["data"], separators=(",", ":"))), f"{kind[:-1]} {name!r} {t['shape']}")
             for kind in ("inputs", "outputs") for name, t in contract[kind].items()),
            reverse=True,
        )
        biggest = ", ".join(f"{what}: {n} bytes" for n, what in sizes[:3])
        raise UsageError(
            f"--sample-inputs {path}: the health contract would be {size} bytes of JSON, over the "
            f"{CONTRACT_MAX_BYTES}-byte limit (it is signed into the release, which rides inside every device's "
            f"directive); largest: {biggest}. Use smaller samples (one short audio chunk, one small image)"
        )
    described = "; ".join(
        f"{kind} " + ", ".join(f"{name} {t['dtype']} {t['shape']}" for name, t in contract[kind].items())
        for kind in ("inputs", "outputs")
    )
    eprint(f"health contract from {path}: {described}; latency budget {budget} ms (median here {median:.2f} ms); "
           f"{size} of {CONTRACT_MAX_BYTES} bytes")
    return contract
