"""Phase timeouts: a device that makes no progress past a phase in time counts as failed; one
that never picks up its directive within the delivery timeout is unreachable (not failed: its
directive stays, and what it reports when it returns is recorded).

Maintenance windows: a device that reported `waiting_for_window` is neither failed nor stalled
while it waits. Its activate timeout counts from the later of its verify start and the opening
it last reported (window_opens_at): one waiting for a window that opens later is never timed
out, one whose opening passed activate_seconds ago without a word of activating is (a device
that missed its window while down reports its next opening when it returns, which moves
window_opens_at on)."""

from __future__ import annotations

from datetime import timedelta

from django.db.models import Q
from django.utils import timezone

from ota.models import Rollout, RolloutDevice, Wave
from ota.rollouts.definition import gates_with_defaults
from registry.audit import SYSTEM, audit_record

RD = RolloutDevice.State


def timeouts_apply(rollout: Rollout, wave: Wave) -> None:
    timeouts = gates_with_defaults(wave.gates)["timeouts"]
    now = timezone.now()
    _unreachable_mark(rollout, wave, timeouts["delivery_seconds"], now)
    activating = (RD.VERIFYING, RD.PRECHECKING, RD.WAITING_FOR_WINDOW, RD.ACTIVATING)
    rules = (
        ("download", Q(state__in=(RD.RECEIVED, RD.DOWNLOADING)), "received_at", timeouts["download_seconds"]),
        ("activate", Q(state__in=activating), "verify_started_at", timeouts["activate_seconds"]),
        ("trial", Q(state=RD.TRIAL), "trial_started_at", timeouts["trial_seconds"]),
    )
    expired_total = {}
    for phase, cond, since, seconds in rules:
        cutoff = now - timedelta(seconds=seconds)
        qs = RolloutDevice.objects.filter(cond, rollout=rollout, **{f"{since}__lt": cutoff})
        if phase == "activate":  # from the window's opening, if it reported one (module docstring)
            qs = qs.filter(Q(window_opens_at__isnull=True) | Q(window_opens_at__lt=cutoff))
        ids = list(qs.values_list("device_id", flat=True)[:1000])
        if not ids:
            continue
        qs.filter(device_id__in=ids).update(
            state=RD.TIMED_OUT, error_code=f"TIMEOUT_{phase.upper()}", finished_at=now, updated_at=now,
            detail=f"no progress past {phase} within {seconds}s",
        )
        expired_total[phase] = ids
    if expired_total:
        audit_record(
            actor=SYSTEM, action="devices.timeout", obj=rollout,
            reason="; ".join(f"{len(v)} devices exceeded the {k} timeout" for k, v in expired_total.items()).capitalize()
            + ".",
            detail={"wave": wave.index, **{k: v[:100] for k, v in expired_total.items()}},
        )


def _unreachable_mark(rollout: Rollout, wave: Wave, seconds: int, now) -> None:
    qs = RolloutDevice.objects.filter(
        rollout=rollout, state=RD.DIRECTED, directed_at__lt=now - timedelta(seconds=seconds)
    )
    ids = list(qs.values_list("device_id", flat=True)[:1000])
    if not ids:
        return
    qs.filter(device_id__in=ids).update(
        state=RD.UNREACHABLE, updated_at=now,
        detail=f"did not pick up its directive within {seconds}s; it stays, for when the device returns",
    )
    audit_record(
        actor=SYSTEM, action="devices.unreachable", obj=rollout,
        reason=f"{len(ids)} devices did not pick up their directive within the delivery timeout ({seconds} s); "
        "they count as unreachable, and converge when they return.",
        detail={"wave": wave.index, "devices": ids[:100]},
    )
