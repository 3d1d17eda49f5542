"""Models and their versions: creating them (a version's counter is assigned here) and the rule
that only a draft may change. Releasing, deprecating, revoking and deleting a draft are in
registry.releases."""

from __future__ import annotations

from django.db import IntegrityError, transaction
from django.db.models import Max

from registry.audit import audit_record
from registry.errors import ApiError, Conflict
from registry.health import health_contract_validate
from registry.models import Model, ModelVersion


def model_create(*, name: str, description: str = "", tags: list | None = None, actor: str) -> Model:
    if Model.objects.filter(name=name).exists():
        raise Conflict(f"Model '{name}' already exists.", code="model_exists")
    try:
        with transaction.atomic():
            model = Model.objects.create(name=name, description=description, tags=list(tags or []))
            audit_record(actor=actor, action="model.create", obj=model)
    except IntegrityError:
        raise Conflict(f"Model '{name}' already exists.", code="model_exists") from None
    return model


def version_create(
    *,
    model: Model,
    version: str,
    actor: str,
    metadata: dict | None = None,
    metrics: dict | None = None,
    provenance: dict | None = None,
    health: dict | None = None,
    rollback_floor: int = 0,
) -> ModelVersion:
    health_contract_validate(health)
    provenance = provenance or {}
    try:
        with transaction.atomic():
            # The Model row lock serialises concurrent creates, so max+1 is race-free.
            locked = Model.objects.select_for_update().get(pk=model.pk)
            if locked.versions.filter(version=version).exists():
                raise Conflict(
                    f"Model '{model.name}' already has version '{version}'.", code="version_exists"
                )
            counter = (locked.versions.aggregate(top=Max("counter"))["top"] or 0) + 1
            if rollback_floor > counter:
                raise ApiError(
                    f"rollback_floor {rollback_floor} is above this version's counter {counter}.",
                    code="invalid_rollback_floor",
                )
            created = ModelVersion.objects.create(
                model=locked,
                version=version,
                counter=counter,
                rollback_floor=rollback_floor,
                metadata=metadata or {},
                metrics=metrics or {},
                health=health,
                git_sha=provenance.get("git_sha", ""),
                ci_run_url=provenance.get("ci_run_url", ""),
                training_run_id=provenance.get("training_run_id", ""),
                created_by=actor,
            )
            audit_record(
                actor=actor,
                action="version.create",
                obj=created,
                detail={"counter": counter, "version": version},
            )
    except IntegrityError:
        raise Conflict(
            f"Model '{model.name}' already has version '{version}'.", code="version_exists"
        ) from None
    return created


def require_draft(version: ModelVersion) -> None:
    if version.state != ModelVersion.State.DRAFT:
        raise Conflict(
            f"{version} is {version.state}; released versions are immutable and never deleted: create a new "
            "version instead (deprecate or revoke this one if it must not be used).",
            code="version_immutable",
            state=version.state,
        )
