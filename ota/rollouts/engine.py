"""The wave engine: one idempotent evaluation step per rollout, run by the Celery tasks on
events and on the beat tick. Starts waves, applies timeouts, dispatches, checks the gates, and
pauses, aborts or reverts by the rollout's policy when the failure gate trips."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.db import OperationalError, transaction
from django.utils import timezone

from ota.models import Rollout, RolloutDevice, Wave
from ota.rollouts.control_group import wave_control_check
from ota.rollouts.dispatch import wave_dispatch
from ota.rollouts.gates import failure_gate_tripped, success_gate_met, too_few_reachable, wave_figures
from ota.rollouts.joiners import rollout_take_in_joiners_before_completing
from ota.rollouts.timeouts import timeouts_apply
from ota.rollouts.transitions import (
    rollout_halt,
    rollout_revert_devices,
    rollout_set_state,
)
from ota.rollouts.waves import wave_pass, wave_start
from registry.audit import SYSTEM, audit_record

logger = logging.getLogger(__name__)


def rollout_evaluate(*, rollout_id: int) -> str:
    """One engine step for one rollout. Safe to run any number of times, on any worker.

    Returns a short word on what happened (for logs and tests). A step that raises (a stored
    definition no entry accepts today, a bug) rolls back and pauses the rollout with the error in
    its audit log (rollout_pause_on_engine_error): "engine-error". A database that cannot be
    reached (OperationalError) is raised for the task to retry: not a fault of the rollout.
    """
    return rollout_step_guarded(_rollout_step, rollout_id=rollout_id, step="evaluation", on_error="engine-error")


def rollout_pause_on_engine_error(*, rollout_id: int, exc: BaseException, step: str) -> bool:
    """Pause a running rollout whose engine `step` raised `exc`, with the exception's class and
    message in the state reason and the audit log (actor system, action rollout.engine_error),
    so it never stays "running" with every tick failing. True when it paused it (False: it was
    not running, or is gone)."""
    logger.error("rollout %s: engine %s failed; pausing it", rollout_id, step, exc_info=exc)
    message = str(exc)[:500]
    why = f"The engine's {step} raised {type(exc).__name__}: {message}. Paused; fix the cause, then resume or abort."
    with transaction.atomic():
        rollout = Rollout.objects.select_for_update().filter(pk=rollout_id).first()
        if rollout is None or rollout.state != Rollout.State.RUNNING:
            return False
        rollout_set_state(rollout, Rollout.State.PAUSED, why)
        audit_record(
            actor=SYSTEM, action="rollout.engine_error", obj=rollout, reason=why,
            detail={"step": step, "error": type(exc).__name__, "message": message, "wave": rollout.current_wave},
        )
    return True


def rollout_step_guarded(step_fn, *, rollout_id: int, step: str, on_error=None):
    """`step_fn(rollout_id=...)`'s result; if it raises (but for OperationalError, which the
    task retries), the rollout is paused as rollout_evaluate does and `on_error` returned."""
    try:
        return step_fn(rollout_id=rollout_id)
    except OperationalError:
        raise
    except Exception as exc:
        rollout_pause_on_engine_error(rollout_id=rollout_id, exc=exc, step=step)
        return on_error


def _rollout_step(*, rollout_id: int) -> str:
    with transaction.atomic():
        rollout = Rollout.objects.select_for_update(skip_locked=True).filter(pk=rollout_id).first()
        if rollout is None:
            return "busy-or-missing"  # another worker holds it and will leave it evaluated
        if rollout.state != Rollout.State.RUNNING:
            return rollout.state
        outcome = "idle"
        for _ in range(64):  # bounded: each pass either stops or moves to the next wave
            wave = rollout.waves.filter(index=rollout.current_wave).first()
            if wave is None:
                if rollout_take_in_joiners_before_completing(rollout):
                    continue  # they are in a catch-up wave, which the next pass starts
                rollout_set_state(rollout, Rollout.State.COMPLETED, "Every wave passed its gates.")
                audit_record(actor=SYSTEM, action="rollout.complete", obj=rollout, reason="Every wave passed its gates.")
                outcome = "completed"
                break
            if wave.state == Wave.State.PENDING:
                wave_start(rollout, wave)
            timeouts_apply(rollout, wave)
            sent = wave_dispatch(rollout, wave)
            if sent:
                outcome = "dispatched"
            figures = wave_figures(wave)
            tripped = failure_gate_tripped(wave.gates, figures)
            if tripped:
                _gate_trip(rollout, wave, tripped, figures)
                outcome = "gate-tripped"
                break
            unreachable = too_few_reachable(wave.gates, figures)
            if unreachable and wave.state == Wave.State.RUNNING:
                # Not a failure of the release: an operator decides (advance, or resume once the
                # boxes are back; what they report meanwhile is recorded).
                why = f"Wave {wave.number} cannot pass: {unreachable}."
                rollout_set_state(rollout, Rollout.State.PAUSED, why)
                audit_record(actor=SYSTEM, action="rollout.auto_pause", obj=rollout, reason=why,
                             detail={"wave": wave.index, **figures})
                outcome = "paused-unreachable"
                break
            if wave.state == Wave.State.RUNNING and success_gate_met(wave.gates, figures):
                wave.state, wave.gate_met_at = Wave.State.SOAKING, timezone.now()
                wave.save(update_fields=["state", "gate_met_at"])
                audit_record(
                    actor=SYSTEM, action="wave.gate_met", obj=rollout,
                    reason=f"Wave {wave.number} met its success gate: {figures['healthy_percent']} % of the "
                    f"{figures['reachable']} reachable devices healthy, {wave.gates['success']['min_healthy_percent']} % "
                    f"needed; soaking {wave.gates['soak_seconds']} s.",
                    detail={"wave": wave.index, **figures},
                )
            elif wave.state == Wave.State.SOAKING and not success_gate_met(wave.gates, figures):
                wave.state, wave.gate_met_at = Wave.State.RUNNING, None
                wave.save(update_fields=["state", "gate_met_at"])
            if wave.state == Wave.State.SOAKING and timezone.now() >= wave.gate_met_at + timedelta(
                seconds=wave.gates["soak_seconds"]
            ):
                control, why, control_figures = wave_control_check(rollout, wave)
                if control == "fail":
                    _gate_trip(rollout, wave, why, {**figures, **control_figures}, gate="")
                    outcome = "gate-tripped"
                    break
                if control == "wait":
                    outcome = "waiting-for-figures"
                    break
                wave_pass(rollout, wave, actor=SYSTEM, figures={**figures, "control_gate": why},
                          reason=f"its success gate held through the soak time (control-group gate: {why})")
                outcome = "advanced"
                continue
            break
        rollout.evaluated_at = timezone.now()
        rollout.save(update_fields=["evaluated_at"])
        return outcome


def _gate_trip(rollout: Rollout, wave: Wave, reason: str, figures: dict, *, gate: str = "its failure gate: ") -> None:
    policy = rollout.abort_policy
    detail = {"wave": wave.index, "policy": policy, **figures}
    why = f"Wave {wave.number} tripped {gate}{reason}."
    if policy == Rollout.AbortPolicy.PAUSE:
        rollout_set_state(rollout, Rollout.State.PAUSED, why)
        audit_record(actor=SYSTEM, action="rollout.auto_pause", obj=rollout, reason=why, detail=detail)
        return
    cancelled = rollout_halt(rollout, reason=why)
    if cancelled["revert_directives"]:
        detail["waiting_for_window_cancelled"] = cancelled["revert_directives"]
    if policy == Rollout.AbortPolicy.REVERT:
        detail.update(rollout_revert_devices(rollout))
    audit_record(
        actor=SYSTEM, action="rollout.auto_abort" if policy == Rollout.AbortPolicy.ABORT else "rollout.auto_revert",
        obj=rollout, reason=why, detail=detail,
    )


def rollouts_due() -> list[int]:
    return list(Rollout.objects.filter(state=Rollout.State.RUNNING).values_list("pk", flat=True))


def rollouts_awaiting_late_reports() -> list[int]:
    """Rollouts no longer running with unreachable devices: what those report when they return
    is still recorded (the engine does not evaluate them; their outcomes only fill in)."""
    return list(
        RolloutDevice.objects.filter(state=RolloutDevice.State.UNREACHABLE)
        .exclude(rollout__state=Rollout.State.RUNNING)
        .values_list("rollout_id", flat=True)
        .distinct()
    )
