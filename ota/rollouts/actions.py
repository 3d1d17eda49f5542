"""Operator actions on a rollout: approve, start (or schedule), unschedule, pause, resume, advance,
retry, abort, roll back.
Each locks the rollout row, checks its state against the catalogue (ota.rollouts.catalogue),
changes it and audits who did it and why. Entry points run them by name through `rollout_act`."""

from __future__ import annotations

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from agent.protocol import ErrorCode
from ota.models import Directive, Rollout, RolloutDevice, Wave
from ota.rollouts.catalogue import BY_NAME
from ota.rollouts.directives import directives_publish
from ota.rollouts.gates import wave_figures
from ota.rollouts.transitions import (
    rollout_halt,
    rollout_locked,
    rollout_require_startable,
    rollout_require_state,
    rollout_revert_devices,
    rollout_set_state,
)
from ota.rollouts.wake import rollout_wake
from ota.rollouts.waves import wave_pass
from registry.audit import audit_record, audit_values
from registry.errors import ApiError, Conflict

RD = RolloutDevice.State
# What a rollout action changes, for the before and after of its audit entry.
STATE_FIELDS = ["state", "state_reason"]


def rollout_approve(*, rollout_id: int, actor: str, reason: str = "") -> Rollout:
    with transaction.atomic():
        rollout = rollout_locked(rollout_id)
        rollout_require_state(rollout, BY_NAME["approve"])
        if rollout.approved_at:
            raise Conflict(f"rollout {rollout.pk} was already approved by {rollout.approved_by}", code="already_approved")
        before = audit_values(rollout, ["approved_at", "approved_by"])
        rollout.approved_at, rollout.approved_by = timezone.now(), actor
        rollout.save(update_fields=["approved_at", "approved_by"])
        audit_record(actor=actor, action="rollout.approve", obj=rollout, reason=reason, before=before)
    return rollout


def rollout_start(*, rollout_id: int, actor: str, reason: str = "") -> Rollout:
    """Start a created rollout; one whose start_at is still ahead is scheduled instead (state
    `scheduled`: it holds its devices, and the engine's tick starts it when due, checking again,
    ota.rollouts.schedule). Either way the checks of a start are made now."""
    with transaction.atomic():
        rollout = rollout_locked(rollout_id)
        rollout_require_state(rollout, BY_NAME["start"])
        devices = rollout_require_startable(rollout)
        now = timezone.now()
        if rollout.start_at and rollout.start_at > now:
            before = audit_values(rollout, STATE_FIELDS + ["started_by"])
            rollout.started_by = actor
            rollout_set_state(rollout, Rollout.State.SCHEDULED, f"scheduled by {actor} to start at "
                              f"{rollout.start_at.isoformat()}")
            rollout.save(update_fields=["started_by"])
            audit_record(actor=actor, action="rollout.schedule", obj=rollout, reason=reason,
                         detail={"devices": devices, "start_at": rollout.start_at.isoformat()}, before=before)
            return rollout
        before = audit_values(rollout, STATE_FIELDS + ["started_at", "started_by"])
        rollout.state = Rollout.State.RUNNING
        rollout.started_at, rollout.started_by = now, actor
        rollout.save(update_fields=["state", "started_at", "started_by"])
        audit_record(actor=actor, action="rollout.start", obj=rollout, reason=reason, detail={"devices": devices},
                     before=before)
        rollout_wake(rollout.pk)
    return rollout


def rollout_unschedule(*, rollout_id: int, actor: str, reason: str = "") -> Rollout:
    """Cancel a scheduled start: back to created, its start time cleared (a start then starts it
    at once; to schedule it again, create it anew with another start_at)."""
    with transaction.atomic():
        rollout = rollout_locked(rollout_id)
        rollout_require_state(rollout, BY_NAME["unschedule"])
        before = audit_values(rollout, STATE_FIELDS + ["start_at", "started_by"])
        rollout.start_at, rollout.started_by = None, ""
        rollout_set_state(rollout, Rollout.State.CREATED, reason or f"scheduled start cancelled by {actor}")
        rollout.save(update_fields=["start_at", "started_by"])
        audit_record(actor=actor, action="rollout.unschedule", obj=rollout, reason=reason, before=before)
    return rollout


def rollout_pause(*, rollout_id: int, actor: str, reason: str = "") -> Rollout:
    with transaction.atomic():
        rollout = rollout_locked(rollout_id)
        rollout_require_state(rollout, BY_NAME["pause"])
        before = audit_values(rollout, STATE_FIELDS)
        rollout_set_state(rollout, Rollout.State.PAUSED, reason or f"paused by {actor}")
        audit_record(actor=actor, action="rollout.pause", obj=rollout, reason=reason, before=before)
    return rollout


def rollout_resume(*, rollout_id: int, actor: str, reason: str = "") -> Rollout:
    with transaction.atomic():
        rollout = rollout_locked(rollout_id)
        rollout_require_state(rollout, BY_NAME["resume"])
        before = audit_values(rollout, STATE_FIELDS)
        rollout_set_state(rollout, Rollout.State.RUNNING, reason or f"resumed by {actor}")
        audit_record(actor=actor, action="rollout.resume", obj=rollout, reason=reason, before=before)
        rollout_wake(rollout.pk)
    return rollout


def rollout_advance(*, rollout_id: int, actor: str, reason: str = "") -> Rollout:
    """Pass the current wave now, whatever its gates say, and start the next one."""
    with transaction.atomic():
        rollout = rollout_locked(rollout_id)
        rollout_require_state(rollout, BY_NAME["advance"])
        wave = rollout.waves.filter(index=rollout.current_wave).first()
        if wave is None or wave.state not in (Wave.State.RUNNING, Wave.State.SOAKING, Wave.State.PENDING):
            raise Conflict(f"rollout {rollout.pk} has no wave in progress to advance", code="invalid_state")
        figures = wave_figures(wave)
        wave_pass(rollout, wave, actor=actor, reason=reason or f"advanced by {actor} before its gates", figures=figures)
        rollout_wake(rollout.pk)
    return rollout


def rollout_retry_failed(*, rollout_id: int, actor: str, reason: str = "") -> int:
    """Queue every failed device of the started waves again (a fresh directive, new seq; one
    that rolled back or refused a deny-listed artifact gets it with the deny-list entry lifted,
    signed in the directive), and send devices stuck before `received` (directed, unreachable)
    the same directive again (same seq), restarting their delivery timeout. Returns how many."""
    with transaction.atomic():
        rollout = rollout_locked(rollout_id)
        rollout_require_state(rollout, BY_NAME["retry"])
        now = timezone.now()
        failed = RolloutDevice.objects.filter(rollout=rollout, state__in=RolloutDevice.FAILURES)
        failed.filter(Q(state=RD.ROLLED_BACK) | Q(error_code=ErrorCode.DENYLISTED)).update(lift_denylist=True)
        requeued = failed.update(state=RD.QUEUED, queued_at=now, error_code="", detail="", updated_at=now)
        resent = _resend_not_picked_up(rollout, now=now)
        count = requeued + resent
        if count:
            # A tripped gate would trip again at once on the old failures; start the count afresh.
            Wave.objects.filter(rollout=rollout, index=rollout.current_wave, state=Wave.State.HALTED).update(
                state=Wave.State.RUNNING
            )
        audit_record(
            actor=actor, action="rollout.retry", obj=rollout,
            reason=f"{requeued} failed devices queued again, {resent} not yet reached sent again"
            + (f": {reason}" if reason else "."),
            detail={"devices": count, "requeued": requeued, "resent": resent},
        )
        rollout_wake(rollout.pk)
    return count


def _resend_not_picked_up(rollout: Rollout, *, now) -> int:
    stuck = RolloutDevice.objects.filter(rollout=rollout, state__in=RolloutDevice.NOT_PICKED_UP, seq__isnull=False)
    pairs = list(stuck.values_list("device_id", "seq"))
    if not pairs:
        return 0
    ids = [pk for pk, device_id, seq in Directive.objects.filter(
        rollout=rollout, device_id__in=[d for d, _ in pairs]).values_list("pk", "device_id", "seq")
        if (device_id, seq) in set(pairs)]
    Directive.objects.filter(pk__in=ids).update(published_at=None)
    stuck.update(state=RD.DIRECTED, directed_at=now, detail="", updated_at=now)
    transaction.on_commit(lambda: directives_publish(directive_ids=ids))
    return len(pairs)


def rollout_abort(*, rollout_id: int, actor: str, reason: str = "") -> Rollout:
    with transaction.atomic():
        rollout = rollout_locked(rollout_id)
        rollout_require_state(rollout, BY_NAME["abort"])
        before = audit_values(rollout, STATE_FIELDS + ["finished_at"])
        cancelled = rollout_halt(rollout, reason=reason or f"aborted by {actor}")
        audit_record(actor=actor, action="rollout.abort", obj=rollout, reason=reason, before=before,
                     detail={"waiting_for_window_cancelled": cancelled["revert_directives"]}
                     if cancelled["revert_directives"] else None)
    return rollout


def rollout_rollback(*, rollout_id: int, actor: str, reason: str = "") -> Rollout:
    """Send every device this rollout updated (or may have) back to its previous release."""
    with transaction.atomic():
        rollout = rollout_locked(rollout_id)
        before = audit_values(rollout, STATE_FIELDS + ["finished_at"])
        rollout_require_state(rollout, BY_NAME["rollback"])
        if rollout.state in Rollout.ACTIVE_STATES:
            rollout_halt(rollout, reason=reason or f"rolled back by {actor}")
        figures = rollout_revert_devices(rollout)
        rollout_set_state(rollout, Rollout.State.ROLLED_BACK, reason or f"rolled back by {actor}")
        audit_record(actor=actor, action="rollout.rollback", obj=rollout, reason=reason, detail=figures, before=before)
    return rollout


def rollout_act(*, action: str, rollout_id: int, actor: str, reason: str = "") -> Rollout | int:
    """Run the catalogue action `action` (a name such as "pause") with an optional reason for the
    audit log. Who may run it is the entry point's check (catalogue scopes)."""
    entry = BY_NAME.get(action)
    if entry is None:
        raise ApiError(f"no rollout action {action!r}; use one of {', '.join(BY_NAME)}", code="not_found", status_code=404)
    return _FUNCTIONS[entry.name](rollout_id=rollout_id, actor=actor, reason=reason)


_FUNCTIONS = {name: globals()[entry.function] for name, entry in BY_NAME.items()}
