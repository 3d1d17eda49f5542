"""Enroll real devices through ota.fleet.enrollment (the same path the API takes) for tests."""

from __future__ import annotations


def hardware(hardware_id: str = "rpi4-arm64"):
    from registry.models import HardwareTarget

    return HardwareTarget.objects.get_or_create(id=hardware_id, defaults={"max_artifact_bytes": 500 * 1024 * 1024})[0]


def enroll_device(*, hardware_id: str = "rpi4-arm64", labels: dict | None = None, name: str = ""):
    """Returns ota.fleet.enrollment.Enrollment (device row + its MQTT password + its API token)."""
    from ota.fleet.enrollment import device_enroll, enrollment_token_create

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


def signed_release(version_row, artifacts) -> dict:
    """A release envelope signed with the test release key, over the given Artifact rows."""
    from datetime import timedelta

    from django.utils import timezone

    from agent.protocol import build_release_payload
    from agent.signing import RELEASE_PAYLOAD_TYPE, sign_envelope
    from registry.keys import load_release_key

    payload = build_release_payload(
        model=version_row.model.name, version=version_row.version, counter=version_row.counter,
        rollback_floor=0, created=timezone.now(), expires=timezone.now() + timedelta(days=30),
        artifacts=[{"hardware": a.hardware_id, "format": a.format, "file_name": a.file_name, "length": a.length,
                    "sha256": a.sha256, "runtime": {}} for a in artifacts],
        health=None, provenance={},
    )
    return sign_envelope(payload, RELEASE_PAYLOAD_TYPE, load_release_key())


def signed_directive(*, device_id: str, seq: int, release: dict, artifact, rollout_id: str | None = "r-test",
                     key=None) -> bytes:
    """A directive envelope (JSON bytes, as published) signed with the rollout key or `key`."""
    import json
    from datetime import timedelta

    from django.utils import timezone

    from agent.protocol import build_directive_payload
    from agent.signing import DIRECTIVE_PAYLOAD_TYPE, sign_envelope
    from registry.keys import load_rollout_key

    payload = build_directive_payload(
        device_id=device_id, seq=seq, issued=timezone.now(), expires=timezone.now() + timedelta(hours=1),
        rollout_id=rollout_id, model=artifact.version.model.name, release_envelope=release,
        artifact={"hardware": artifact.hardware_id, "sha256": artifact.sha256, "length": artifact.length,
                  "url": f"http://127.0.0.1:9/artifacts/{artifact.sha256}"},
    )
    return json.dumps(sign_envelope(payload, DIRECTIVE_PAYLOAD_TYPE, key or load_rollout_key())).encode()


def record_directive(*, device, version, seq: int = 1):
    """The server-side record of a directive to `device` naming `version` (what lets its token
    download that release's artifact), without a rollout around it."""
    from ota.models import Directive

    return Directive.objects.create(
        device=device, seq=seq, version=version, payload_sha256="0" * 64, envelope={"test": True}
    )
