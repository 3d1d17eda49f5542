"""Enroll real devices through ota.devices (the same path the API takes) for tests."""

from __future__ import annotations


def hardware(hardware_id: str = "rpi4-arm64"):
    from registry.models import HardwareTarget

    return HardwareTarget.objects.get_or_create(id=hardware_id, defaults={"max_artifact_bytes": 500 * 1024 * 1024})[0]


def enroll_device(*, hardware_id: str = "rpi4-arm64", labels: dict | None = None, name: str = ""):
    """Returns ota.devices.Enrollment (device row + its MQTT password + its API token)."""
    from ota.devices import device_enroll, enrollment_token_create

    hardware(hardware_id)
    _token, secret = enrollment_token_create(max_uses=1, created_by="test")
    return device_enroll(token_secret=secret, hardware=hardware_id, labels=labels or {}, name=name)
