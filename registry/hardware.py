"""Hardware targets: the boards artifacts are built for, each with its artifact size budget."""

from __future__ import annotations

from django.db import IntegrityError, transaction

from registry.audit import audit_record
from registry.errors import Conflict
from registry.models import HardwareTarget


def hardware_create(*, id: str, description: str, max_artifact_bytes: int, actor: str) -> HardwareTarget:
    if HardwareTarget.objects.filter(pk=id).exists():
        raise Conflict(f"Hardware target '{id}' already exists.", code="hardware_exists")
    try:
        with transaction.atomic():
            hardware = HardwareTarget.objects.create(
                id=id, description=description, max_artifact_bytes=max_artifact_bytes
            )
            audit_record(
                actor=actor,
                action="hardware.create",
                obj=hardware,
                detail={"max_artifact_bytes": max_artifact_bytes},
            )
    except IntegrityError:
        raise Conflict(f"Hardware target '{id}' already exists.", code="hardware_exists") from None
    return hardware
