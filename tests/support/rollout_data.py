"""Real releases (real ONNX artifacts, signed by the registry) and devices for rollout tests."""

from __future__ import annotations

from tests.support.onnx_models import linear_model
from tests.support.registry_api import API, create_hardware, create_model, create_version, upload, version_url

GOLDEN_X = [1.0, 2.0, 3.0, 4.0]


def health_for(scale: float, bias: float) -> dict:
    """A health contract the agent's precheck checks: y = x * scale + bias on the golden input.

    Giving a model other (scale, bias) than the contract makes every device's precheck fail."""
    return {
        "inputs": {"x": {"dtype": "float32", "shape": [1, 4], "data": GOLDEN_X}},
        "outputs": {"y": {"dtype": "float32", "shape": [1, 4], "data": [v * scale + bias for v in GOLDEN_X]}},
        "atol": 1e-4,
        "latency_budget_ms": 5000,
    }


def ensure_hardware(client, token, hardware_id: str) -> None:
    from registry.models import HardwareTarget

    if not HardwareTarget.objects.filter(pk=hardware_id).exists():
        create_hardware(client, token, hardware_id)


def release(client, token, model: str, version: str, *, hardware=("rpi4",), scale: float = 2.0, bias: float = 1.0,
            health: dict | None = None, released: bool = True) -> dict:
    """Create `model@version` with one real ONNX artifact per hardware id and (by default) release it."""
    from registry.models import Model

    for hw in hardware:
        ensure_hardware(client, token, hw)
    if not Model.objects.filter(name=model).exists():
        create_model(client, token, model)
    create_version(client, token, model, version, **({"health": health} if health is not None else {}))
    data = linear_model(scale=scale, bias=bias)
    for hw in hardware:
        response = upload(client, token, model, version, hardware=hw, data=data)
        assert response.status_code == 201, response.content
    if released:
        response = client.post(f"{version_url(model, version)}/release", {}, content_type="application/json", **token.headers)
        assert response.status_code == 200, response.content
    return {"model": model, "version": version}


def make_devices(count: int, *, hardware: str = "rpi4", labels: dict | None = None, prefix: str = "dev") -> list[str]:
    """Device rows as enrollment would leave them (no broker credentials needed for engine-only tests)."""
    from ota.models import Device

    ids = [f"{prefix}-{i:04d}" for i in range(count)]
    Device.objects.bulk_create(
        [Device(id=i, hardware_id=hardware, labels=dict(labels or {}), mqtt_username=i) for i in ids]
    )
    return ids


def create_rollout(client, token, **body):
    return client.post(f"{API}/rollouts/", body, content_type="application/json", **token.headers)


def act(client, token, rollout_id: int, action: str, **body):
    return client.post(f"{API}/rollouts/{rollout_id}/{action}", body, content_type="application/json", **token.headers)
