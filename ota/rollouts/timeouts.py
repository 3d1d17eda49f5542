"""Phase timeouts: a device that makes no progress past a phase in time counts as failed."""

from __future__ import annotations

from datetime import timedelta

from django.db.models import Q
from django.utils import timezone

from ota.models import Rollout, RolloutDevice, Wave
from registry.audit import SYSTEM, audit_record

RD = RolloutDevice.State


def timeouts_apply(rollout: Rollout, wave: Wave) -> None:
    timeouts = wave.gates["timeouts"]
    now = timezone.now()
    rules = (
        ("download", Q(state__in=(RD.RECEIVED, RD.DOWNLOADING)), "received_at", timeouts["download_seconds"]),
        ("activate", Q(state__in=(RD.VERIFYING, RD.PRECHECKING, RD.ACTIVATING)), "verify_started_at", timeouts["activate_seconds"]),
        ("trial", Q(state=RD.TRIAL), "trial_started_at", timeouts["trial_seconds"]),
    )
    expired_total = {}
    for phase, cond, since, seconds in rules:
        cutoff = now - timedelta(seconds=seconds)
        qs = RolloutDevice.objects.filter(cond, rollout=rollout, **{f"{since}__lt": cutoff})
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
