"""The health contract a version may carry: golden inputs and outputs, tolerances and a latency
budget, checked here as the agent's precheck will read them."""

from __future__ import annotations

import math

from agent import protocol
from registry.errors import ApiError

# The release manifest travels inside each device's directive, which the agent caps at 64 KiB
# (agent.protocol.MAX_PAYLOAD_BYTES, after base64): golden I/O has to stay small.
HEALTH_MAX_BYTES = 24 * 1024
HEALTH_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
HEALTH_KEYS = ("inputs", "outputs", "atol", "rtol", "latency_budget_ms")


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
    """The contract the agent's precheck runs: golden inputs/outputs, tolerances, latency budget."""
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
    size = len(protocol.encode_json(health))
    if size > HEALTH_MAX_BYTES:
        raise ApiError(
            f"health is {size} bytes of JSON, over the {HEALTH_MAX_BYTES}-byte limit "
            "(the signed manifest rides inside every device directive); use fewer golden values.",
            code="invalid_health",
        )
