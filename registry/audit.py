"""The audit log's one writer and reader.

Every entry names its object by `object_type` and `object_id`; both sides go through
`object_type_of`, so the page that lists an object's history reads exactly what the action that
changed it wrote. A model may set `AUDIT_OBJECT_TYPE` to keep a stable name (enrollment tokens
have always been "enrollment_token"); otherwise it is the model's name ("rollout", "device",
"modelversion").
"""

from __future__ import annotations

from django.db.models import QuerySet

from registry.models import AuditEntry

SYSTEM = "system"  # the actor of automatic decisions (the rollout engine)


def object_type_of(obj) -> str:
    return getattr(type(obj), "AUDIT_OBJECT_TYPE", None) or obj._meta.model_name


def audit_record(*, actor: str, action: str, obj, reason: str = "", detail: dict | None = None) -> AuditEntry:
    return AuditEntry.objects.create(
        actor=actor,
        action=action,
        object_type=object_type_of(obj),
        object_id=str(obj.pk),
        reason=reason,
        detail=detail or {},
    )


def audit_entries_for(obj) -> QuerySet:
    """This object's audit entries, newest first."""
    return AuditEntry.objects.filter(object_type=object_type_of(obj), object_id=str(obj.pk)).order_by(
        "-created_at", "-id"
    )
