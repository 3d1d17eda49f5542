"""Finding a model, a version or an artifact by name, or refusing with a 404 whose `code` names
what is missing (model_not_found, version_not_found, artifact_not_found)."""

from __future__ import annotations

from registry.errors import not_found
from registry.models import Artifact, Model, ModelVersion


def model_get(*, name: str) -> Model:
    try:
        return Model.objects.get(name=name)
    except Model.DoesNotExist:
        raise not_found(f"No model named '{name}'.", "model_not_found") from None


def version_get(*, model_name: str, version: str) -> ModelVersion:
    model = model_get(name=model_name)
    try:
        return ModelVersion.objects.select_related("model").get(model=model, version=version)
    except ModelVersion.DoesNotExist:
        raise not_found(f"Model '{model_name}' has no version '{version}'.", "version_not_found") from None


def artifact_get(*, version: ModelVersion, hardware_id: str) -> Artifact:
    try:
        return version.artifacts.select_related("hardware").get(hardware_id=hardware_id)
    except Artifact.DoesNotExist:
        raise not_found(
            f"{version} has no artifact for hardware '{hardware_id}'.", "artifact_not_found"
        ) from None
