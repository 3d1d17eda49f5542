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


def release_rows(*, model: str = "detector", version: str = "1.0", counter: int = 1, hardware_id: str = "rpi4-arm64",
                 content: bytes | None = None):
    """A model version with one stored artifact, made directly (for device-side tests that only
    need rows and bytes, not the registry's release flow). Returns (ModelVersion, Artifact)."""
    import hashlib

    from django.core.files.base import ContentFile
    from django.core.files.storage import storages

    from registry.models import Artifact, Model, ModelVersion

    content = content if content is not None else f"{model}-{version}-weights".encode() * 64
    hw = hardware(hardware_id)
    model_row = Model.objects.get_or_create(name=model)[0]
    version_row = ModelVersion.objects.create(model=model_row, version=version, counter=counter)
    sha = hashlib.sha256(content).hexdigest()
    key = storages["artifacts"].save(f"{model}/{version}/{hardware_id}/model.onnx", ContentFile(content))
    artifact = Artifact.objects.create(
        version=version_row, hardware=hw, format="onnx", file_name="model.onnx", length=len(content), sha256=sha,
        storage_key=key,
    )
    return version_row, artifact
