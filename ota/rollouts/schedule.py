"""Scheduled starts: a rollout started before its `start_at` waits in state `scheduled` (holding its
devices, so nothing else can take them meanwhile) until the beat tick starts it here.

When it is due the checks of a start are made again (approval, a release every agent would
still take, devices owned by no other rollout): if one fails, the rollout goes back to `created`
with the reason in its state reason and the audit log (action rollout.schedule_failed), for an
operator to fix and start, or abort. A scheduled rollout is cancelled with `unschedule` (back to
created) or `abort`.
"""

from __future__ import annotations

import logging

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from ota.models import Rollout
from ota.rollouts.transitions import rollout_require_startable, rollout_set_state
from ota.rollouts.wake import rollout_wake
from registry.audit import SYSTEM, audit_record, audit_values
from registry.errors import ApiError

logger = logging.getLogger(__name__)


def rollouts_scheduled_due(*, now=None) -> list[int]:
    now = now or timezone.now()
    return list(
        Rollout.objects.filter(state=Rollout.State.SCHEDULED, start_at__lte=now).order_by("start_at", "pk")
        .values_list("pk", flat=True)
    )


def rollout_start_scheduled(*, rollout_id: int, now=None) -> str:
    """Start one scheduled rollout whose start time has come. Returns its state afterwards:
    "running", "created" (a check of the start failed), or whatever it was if it was not due."""
    now = now or timezone.now()
    with transaction.atomic():
        rollout = Rollout.objects.select_for_update(skip_locked=True).filter(pk=rollout_id).first()
        if rollout is None:
            return "busy-or-missing"
        if rollout.state != Rollout.State.SCHEDULED or rollout.start_at is None or rollout.start_at > now:
            return rollout.state
        before = audit_values(rollout, ["state", "state_reason", "started_at"])
        scheduled_by = rollout.started_by or "an operator"
        try:
            with transaction.atomic():
                devices = rollout_require_startable(rollout)
        except (ApiError, ValidationError) as exc:
            if isinstance(exc, ApiError):
                message, code = str(exc.detail), exc.get_codes()
            else:
                message, code = "; ".join(exc.messages), "invalid"
            why = (f"The scheduled start at {rollout.start_at.isoformat()} failed: {message}. Back to created; "
                   "fix the cause and start it, or abort it.")
            rollout_set_state(rollout, Rollout.State.CREATED, why)
            audit_record(actor=SYSTEM, action="rollout.schedule_failed", obj=rollout, reason=why, before=before,
                         detail={"start_at": rollout.start_at.isoformat(), "code": code})
            logger.warning("rollout %s: scheduled start failed: %s", rollout.pk, message)
            return rollout.state
        rollout.started_at = now
        rollout_set_state(rollout, Rollout.State.RUNNING,
                          f"started at its scheduled time {rollout.start_at.isoformat()} (scheduled by {scheduled_by})")
        rollout.save(update_fields=["started_at"])
        audit_record(actor=SYSTEM, action="rollout.start", obj=rollout, before=before,
                     reason=f"Scheduled start at {rollout.start_at.isoformat()}, as {scheduled_by} asked.",
                     detail={"devices": devices, "start_at": rollout.start_at.isoformat(), "scheduled_by": scheduled_by})
        rollout_wake(rollout.pk)
        return rollout.state


def rollouts_start_due(*, now=None) -> list[int]:
    """Start every scheduled rollout that is due (the beat tick). Returns the ids started."""
    return [rid for rid in rollouts_scheduled_due(now=now) if rollout_start_scheduled(rollout_id=rid, now=now) == "running"]
