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


def audit_record(*, actor: str, action: str, obj, reason: str = "", detail: dict | None = None,
                 before: dict | None = None) -> AuditEntry:
    """One entry. `before`: the values of the fields the action changed, read before it changed
    them; their values now are read from `obj` and both go into the detail as "before" and
    "after" (only the fields that did change), as the admin's entries carry them."""
    detail = dict(detail or {})
    if before is not None:
        after = audit_values(obj, list(before))
        changed = [k for k in before if before[k] != after[k]]
        detail["before"] = {k: before[k] for k in changed}
        detail["after"] = {k: after[k] for k in changed}
    return AuditEntry.objects.create(
        actor=actor,
        action=action,
        object_type=object_type_of(obj),
        object_id=str(obj.pk),
        reason=reason,
        detail=detail,
    )


def audit_values(obj, fields: list[str]) -> dict:
    """`obj`'s values of `fields` as the audit log stores them (JSON: dates as ISO text, related
    objects by primary key)."""
    out = {}
    for name in fields:
        value = getattr(obj, name)
        if hasattr(value, "isoformat"):
            value = value.isoformat()
        elif hasattr(value, "pk"):
            value = value.pk
        out[name] = value
    return out


def audit_entries_for(obj) -> QuerySet:
    """This object's audit entries, newest first."""
    return AuditEntry.objects.filter(object_type=object_type_of(obj), object_id=str(obj.pk)).order_by(
        "-created_at", "-id"
    )
