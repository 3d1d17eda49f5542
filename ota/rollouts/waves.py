"""When a wave starts and when it advances (passes, letting the next one start)."""

from __future__ import annotations

from django.utils import timezone

from ota.models import Rollout, RolloutDevice, Wave
from ota.rollouts.definition import devices_count, wave_describe
from registry.audit import SYSTEM, audit_record

RD = RolloutDevice.State


def wave_start(rollout: Rollout, wave: Wave) -> None:
    now = timezone.now()
    claimed = Wave.objects.filter(pk=wave.pk, state=Wave.State.PENDING).update(state=Wave.State.RUNNING, started_at=now)
    if not claimed:
        return
    wave.state, wave.started_at = Wave.State.RUNNING, now
    queued = RolloutDevice.objects.filter(wave=wave, state=RD.PLANNED).update(state=RD.QUEUED, queued_at=now, updated_at=now)
    audit_record(
        actor=SYSTEM, action="wave.start", obj=rollout,
        reason=f"Wave {wave.number} ({wave_describe(wave.spec)}) started with {devices_count(queued)}.",
        detail={"wave": wave.index, "devices": queued},
    )


def wave_pass(rollout: Rollout, wave: Wave, *, actor: str, reason: str, figures: dict) -> None:
    now = timezone.now()
    claimed = Wave.objects.filter(
        pk=wave.pk, state__in=(Wave.State.PENDING, Wave.State.RUNNING, Wave.State.SOAKING)
    ).update(state=Wave.State.PASSED, finished_at=now)
    if not claimed:
        return
    wave.state = Wave.State.PASSED
    # Devices of a forced wave that never got their directive stay queued: the next waves go on
    # and they go out with them (the engine dispatches every queued device of the rollout).
    Rollout.objects.filter(pk=rollout.pk, current_wave=wave.index).update(current_wave=wave.index + 1)
    rollout.current_wave = wave.index + 1
    audit_record(
        actor=actor, action="wave.pass", obj=rollout, reason=f"Wave {wave.number} passed: {reason}.",
        detail={"wave": wave.index, **figures},
    )
