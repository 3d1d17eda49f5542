"""The health contract a version may carry: golden inputs and outputs, tolerances, a latency
budget and shadow-evaluation settings, checked here as the agent's precheck will read them (health_contract_validate), and
against an ONNX or TFLite model's declared inputs and outputs (health_contract_check_model). The format is
documented in README.md, "Health contracts"."""

from __future__ import annotations

import math
from collections.abc import Sequence

from agent import precheck, protocol, shadow
from registry.errors import ApiError

# The release manifest travels inside each device's directive, which the agent caps at 64 KiB
# (agent.protocol.MAX_PAYLOAD_BYTES, after base64): golden I/O has to stay small. The limit and
# the dtypes are the agent's (fleetctl push --sample-inputs checks the same limit).
HEALTH_MAX_BYTES = precheck.CONTRACT_MAX_BYTES
HEALTH_DTYPES = precheck.CONTRACT_DTYPES
HEALTH_KEYS = ("inputs", "outputs", "atol", "rtol", "latency_budget_ms", "precheck", "shadow")


def _health_tensors(value, where: str) -> None:
    if not isinstance(value, dict) or not value:
        raise ApiError(f"{where} must be a non-empty object of tensors by name.", code="invalid_health")
    for name, tensor in value.items():
        w = f"{where}.{name}"
        if not isinstance(tensor, dict):
            raise ApiError(f"{w} must be an object with dtype, shape and data.", code="invalid_health")
        unknown = set(tensor) - {"dtype", "shape", "data"}
        if unknown:
            raise ApiError(f"{w} has unknown keys: {', '.join(sorted(unknown))}.", code="invalid_health")
        dtype = tensor.get("dtype")
        if dtype not in HEALTH_DTYPES:
            raise ApiError(
                f"{w}.dtype must be one of {', '.join(HEALTH_DTYPES)}; got {dtype!r}.", code="invalid_health"
            )
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ApiError(f"{w}.shape must be a list of non-negative integers.", code="invalid_health")
        data = tensor.get("data")
        if not isinstance(data, list):
            raise ApiError(f"{w}.data must be a flat list of numbers.", code="invalid_health")
        expected = math.prod(shape)
        if len(data) != expected:
            raise ApiError(
                f"{w}.data has {len(data)} values; shape {shape} needs {expected}.", code="invalid_health"
            )
        number = bool if dtype == "bool" else (int, float)
        if not all(isinstance(x, number) and (dtype == "bool" or not isinstance(x, bool)) for x in data):
            raise ApiError(
                f"{w}.data must hold only {'booleans' if dtype == 'bool' else 'numbers'}.",
                code="invalid_health",
            )


def health_contract_validate(health) -> None:
    """The contract the agent's precheck runs: golden inputs/outputs, tolerances, latency budget,
    or `"precheck": "none"` to skip it."""
    if health is None:
        return
    if not isinstance(health, dict):
        raise ApiError("health must be an object.", code="invalid_health")
    unknown = set(health) - set(HEALTH_KEYS)
    if unknown:
        raise ApiError(
            f"health has unknown keys: {', '.join(sorted(unknown))} (allowed: {', '.join(HEALTH_KEYS)}).",
            code="invalid_health",
        )
    if "inputs" in health:
        _health_tensors(health["inputs"], "health.inputs")
    if "outputs" in health:
        if "inputs" not in health:
            raise ApiError("health.outputs needs health.inputs to compare against.", code="invalid_health")
        _health_tensors(health["outputs"], "health.outputs")
    for name in ("atol", "rtol"):
        if name in health:
            value = health[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ApiError(f"health.{name} must be a non-negative number.", code="invalid_health")
    if "latency_budget_ms" in health:
        value = health["latency_budget_ms"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ApiError("health.latency_budget_ms must be a positive number.", code="invalid_health")
    if "precheck" in health:
        if health["precheck"] != "none":
            raise ApiError(
                'health.precheck may only be "none" (skip the precheck: the trial decides alone); '
                f"got {health['precheck']!r}.",
                code="invalid_health",
            )
        # What only the precheck reads would be signed yet never checked (shadow evaluation
        # needs the runtime a skipped precheck stands in for).
        unread = sorted({"inputs", "outputs", "atol", "rtol", "latency_budget_ms", "shadow"} & set(health))
        if unread:
            raise ApiError(
                f'health.precheck "none" skips the precheck, so {", ".join(unread)} would never be checked; '
                "drop them or the precheck key.",
                code="invalid_health",
            )
    try:
        shadow.shadow_settings(health)
    except ValueError as exc:
        raise ApiError(f"{exc}.", code="invalid_health") from None
    size = len(protocol.encode_json(health))
    if size > HEALTH_MAX_BYTES:
        raise ApiError(
            f"health is {size} bytes of JSON, over the {HEALTH_MAX_BYTES}-byte limit "
            "(the signed manifest rides inside every device directive); use fewer golden values.",
            code="invalid_health",
        )


def _describe(tensor: dict) -> str:
    return f"{tensor.get('dtype')} {list(tensor.get('shape') or [])}"


def _shape_fits(shape: list[int], dims: tuple | None) -> str | None:
    """Why a contract shape does not fit the model's declared dims, or None when it does."""
    if dims is None:
        return None
    if len(shape) != len(dims):
        return f"rank {len(shape)} against the model's rank {len(dims)}"
    for index, (size, dim) in enumerate(zip(shape, dims)):
        if isinstance(dim, int) and size != dim:
            return f"dimension {index} is {size}, the model fixes it at {dim}"
    return None


def health_contract_check_model(health: dict | None, inputs: Sequence, outputs: Sequence, *, where: str) -> None:
    """Refuse a contract whose tensors do not fit the model's declared inputs and outputs.

    `inputs`/`outputs` are registry.onnx_check.TensorSpec (name, dtype, dims, optional), as
    onnx_io() or registry.tflite_check.tflite_validate() read them from the uploaded file. Checks names (every required model input has
    golden data; every contract tensor exists in the model), dtypes, ranks and fixed dimensions,
    and that a named dynamic dimension gets one size across the inputs. Raises ApiError
    `health_contract_mismatch` listing every mismatch with both sides; `where` names the artifact.
    """
    if not health:
        return
    mismatches: list[dict] = []

    def mismatch(tensor: str, contract: str, model: str, why: str) -> None:
        mismatches.append({"tensor": tensor, "contract": contract, "model": model, "problem": why})

    def compare(kind: str, given: dict, declared: Sequence) -> None:
        by_name = {t.name: t for t in declared}
        listing = ", ".join(f"{t.name} {t.describe()}" for t in declared) or "none"
        named_sizes: dict[str, tuple[str, int]] = {}
        for name, tensor in given.items():
            spec = by_name.get(name)
            where_ = f"{kind}.{name}"
            if spec is None:
                mismatch(where_, _describe(tensor), f"{kind}: {listing}",
                         f"the contract's {kind[:-1]} {name!r} is not an {kind[:-1]} of the model")
                continue
            if tensor.get("dtype") != spec.dtype:
                mismatch(where_, _describe(tensor), spec.describe(),
                         f"dtype {tensor.get('dtype')} against the model's {spec.dtype}")
            why = _shape_fits(list(tensor.get("shape") or []), spec.dims)
            if why:
                mismatch(where_, _describe(tensor), spec.describe(), f"shape: {why}")
            elif kind == "inputs" and spec.dims:
                for size, dim in zip(tensor["shape"], spec.dims):
                    if isinstance(dim, str):
                        first = named_sizes.setdefault(dim, (name, size))
                        if first[1] != size:
                            mismatch(where_, _describe(tensor), spec.describe(),
                                     f"dimension {dim!r} is {size} here and {first[1]} in input {first[0]!r}")
        if kind == "inputs":
            for spec in declared:
                if spec.name not in given and not spec.optional:
                    mismatch(f"inputs.{spec.name}", "missing", spec.describe(),
                             f"the model input {spec.name!r} has no golden data in the contract")

    if health.get("inputs"):
        compare("inputs", health["inputs"], inputs)
    if health.get("outputs"):
        compare("outputs", health["outputs"], outputs)
    if mismatches:
        lines = "; ".join(
            f"{m['tensor']}: {m['problem']} (contract: {m['contract']}; model: {m['model']})" for m in mismatches
        )
        raise ApiError(
            f"The health contract does not match the model {where}: {lines}.",
            code="health_contract_mismatch",
            mismatches=mismatches,
        )
