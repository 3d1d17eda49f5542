"""Registry and fleet rows for the web admin tests, made through the real functions
(registry.versions, registry.artifacts, registry.releases: real manifests signed over real ONNX
artifacts) or, for bulk fleets, with bulk_create."""

from __future__ import annotations

from django.core.files.uploadedfile import TemporaryUploadedFile

from registry.artifacts import artifact_upload
from registry.models import HardwareTarget, Model, ModelVersion
from registry.releases import version_release
from registry.versions import model_create, version_create
from tests.support.onnx_models import linear_model

ACTOR = "user:test-setup"


def hardware(*ids: str) -> list[HardwareTarget]:
    return [
        HardwareTarget.objects.get_or_create(id=hw, defaults={"max_artifact_bytes": 50 * 1024 * 1024})[0]
        for hw in ids
    ]


def onnx_upload(scale: float = 2.0) -> TemporaryUploadedFile:
    data = linear_model(scale=scale)
    upload = TemporaryUploadedFile("model.onnx", "application/octet-stream", len(data), None)
    upload.write(data)
    upload.seek(0)
    return upload


def draft(model_name: str, version: str, *, hardware_ids=("jetson-orin",), scale: float = 2.0) -> ModelVersion:
    hardware(*hardware_ids)
    model = Model.objects.filter(name=model_name).first() or model_create(
        name=model_name, description=f"{model_name} for the tests", actor=ACTOR
    )
    mv = version_create(
        model=model,
        version=version,
        actor=ACTOR,
        provenance={"git_sha": "0123456789abcdef0123456789abcdef01234567", "ci_run_url": "https://ci.example/run/7"},
        health={"latency_budget_ms": 50},
    )
    for hw in hardware_ids:
        # Closed here as Django closes request files: the store has moved the spooled file away.
        with onnx_upload(scale) as upload:
            artifact_upload(
                version=mv, hardware_id=hw, format="onnx", upload=upload, expected_sha256=None, actor=ACTOR
            )
    return mv


def released(model_name: str, version: str, **kwargs) -> ModelVersion:
    mv = draft(model_name, version, **kwargs)
    version_release(version=mv, actor=ACTOR)
    mv.refresh_from_db()
    return mv


