"""Aliases ("prod", "canary"): moving one to a released version, each move kept as history, and
reading them as they stand now or as they stood at an instant."""

from __future__ import annotations

import re
from datetime import datetime
from datetime import timezone as dt_timezone

from django.db import transaction
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from registry.audit import audit_record, audit_values
from registry.errors import ApiError, Conflict, not_found
from registry.limits import instant_check
from registry.models import Alias, AliasMove, Model, ModelVersion

SLUG_RE = re.compile(r"^[-a-zA-Z0-9_]{1,64}$")


def alias_set(*, model: Model, name: str, version_name: str, actor: str) -> Alias:
    if not SLUG_RE.match(name or ""):
        raise ApiError("Alias names use 1-64 letters, digits, '-' or '_'.", code="invalid_alias")
    try:
        target = model.versions.get(version=version_name)
    except ModelVersion.DoesNotExist:
        raise not_found(
            f"Model '{model.name}' has no version '{version_name}'.", "version_not_found"
        ) from None
    if target.state not in (ModelVersion.State.RELEASED, ModelVersion.State.DEPRECATED):
        raise Conflict(
            f"{target} is {target.state}; an alias may only point at a released (or deprecated) version.",
            code="version_not_released",
            state=target.state,
        )
    with transaction.atomic():
        alias = Alias.objects.select_for_update().filter(model=model, name=name).first()
        now = timezone.now()
        if alias is None:
            alias = Alias.objects.create(
                model=model, name=name, version=target, updated_at=now, updated_by=actor
            )
            previous = None
        elif alias.version_id == target.pk:
            return alias  # already there: not a move, nothing to record
        else:
            previous = alias.version
        before = audit_values(alias, ["version", "updated_at", "updated_by"]) if previous else {
            "version": None, "updated_at": None, "updated_by": None}
        if previous:
            alias.version, alias.updated_at, alias.updated_by = target, now, actor
            alias.save()
        AliasMove.objects.create(
            alias=alias, from_version=previous, to_version=target, moved_by=actor, moved_at=now
        )
        audit_record(
            actor=actor,
            action="alias.move",
            obj=alias,
            detail={
                "alias": str(alias),
                "from": previous.version if previous else None,
                "to": target.version,
            },
            before=before,
        )
    return alias


def parse_instant(value: str) -> datetime:
    """ISO 8601 date-time; naive means UTC; a bare date means 00:00 UTC that day. Within
    registry.limits.MIN_INSTANT..MAX_INSTANT (400 invalid_at otherwise): year 0, or a date the
    conversion to UTC would carry past year 9999, is a refusal, not an overflow."""
    value = (value or "").strip().replace(" ", "+")  # '+' arrives as a space from unencoded query strings
    try:
        parsed = parse_datetime(value) if value else None
        if parsed is None and value:
            day = parse_date(value) if len(value) == 10 else None
            parsed = datetime(day.year, day.month, day.day) if day else None
    except ValueError:  # well formed but no such date: month 13, day 0, year 0
        parsed = None
    if parsed is None:
        raise ApiError(
            f"'at' must be an ISO 8601 date-time such as 2026-01-31T12:00:00Z; got {value!r}.",
            code="invalid_at",
        )
    if timezone.is_naive(parsed):
        parsed = parsed.replace(tzinfo=dt_timezone.utc)
    try:
        return instant_check(parsed)
    except ValueError as exc:
        raise ApiError(f"'at': {exc}.", code="invalid_at") from None


def aliases_list(*, model: Model, at: datetime | None = None) -> list[dict]:
    """Each alias with its history; with `at`, the alias as it stood at that instant."""
    result = []
    for alias in model.aliases.all():
        moves = alias.moves.select_related("from_version", "to_version")
        if at is not None:
            moves = moves.filter(moved_at__lte=at)
        moves = list(moves)  # newest first
        if at is not None and not moves:
            continue  # the alias did not exist yet
        current = moves[0] if at is not None else None
        result.append(
            {
                "name": alias.name,
                "version": current.to_version.version if current else alias.version.version,
                "updated_at": current.moved_at if current else alias.updated_at,
                "updated_by": current.moved_by if current else alias.updated_by,
                "history": [
                    {
                        "from_version": m.from_version.version if m.from_version else None,
                        "to_version": m.to_version.version,
                        "moved_by": m.moved_by,
                        "moved_at": m.moved_at,
                    }
                    for m in moves
                ],
            }
        )
    return result
