"""Late joiners: devices that start matching a rollout's target after it was planned (enrolled,
relabelled, back from revocation by a new enrollment) are taken in: into the wave in progress,
or a catch-up wave after the last. A rollout created with `follow_target` keeps doing so after
it completed (continuous deployment of a release to a label): a joiner reopens it with a
catch-up wave, and it completes again when that wave passes. Each join is in the audit log.

The engine's beat tick calls `rollout_take_in_joiners` for running and following rollouts; the
target is resolved again at most every JOIN_CHECK_SECONDS per rollout.
"""

from __future__ import annotations

from datetime import timedelta

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Max, Q
from django.utils import timezone

from ota.models import Rollout, RolloutDevice, Wave
from ota.rollouts.definition import wave_describe
from ota.rollouts.planning import conflicts_find, target_resolve
from ota.rollouts.wake import rollout_wake
from registry.audit import SYSTEM, audit_record

RD = RolloutDevice.State
JOIN_CHECK_SECONDS = 30


def rollouts_taking_joiners() -> list[int]:
    # One filter, not a UNION: SQLite refuses the default ordering inside a compound statement.
    return list(
        Rollout.objects.filter(Q(state=Rollout.State.RUNNING) | Q(state=Rollout.State.COMPLETED, follow_target=True))
        .order_by("pk").values_list("pk", flat=True)
    )


def rollout_take_in_joiners(*, rollout_id: int, now=None) -> int:
    """Add the devices that match the target now and are in no wave of this rollout yet.
    Returns how many joined. Devices busy in another running rollout of the model wait."""
    now = now or timezone.now()
    with transaction.atomic():
        rollout = Rollout.objects.select_for_update(skip_locked=True).filter(pk=rollout_id).first()
        if rollout is None:
            return 0
        following = rollout.state == Rollout.State.COMPLETED and rollout.follow_target
        if rollout.state != Rollout.State.RUNNING and not following:
            return 0
        if rollout.target_checked_at and now - rollout.target_checked_at < timedelta(seconds=JOIN_CHECK_SECONDS):
            return 0
        return _take_in(rollout, now=now, following=following)


def rollout_take_in_joiners_before_completing(rollout: Rollout, *, now=None) -> int:
    """The engine calls this with the rollout locked, once its last wave passed: devices that
    started matching since the last check join a catch-up wave instead of being left out by a
    rollout that completes between two checks. Returns how many joined."""
    return _take_in(rollout, now=now or timezone.now(), following=False)


def _take_in(rollout: Rollout, *, now, following: bool) -> int:
    rollout.target_checked_at = now
    rollout.save(update_fields=["target_checked_at"])
    try:
        plan = target_resolve(target=rollout.target, release=rollout.release)
    except ValidationError:
        return 0  # nothing matches (any more): nobody to take in
    assigned = set(rollout.assignments.values_list("device_id", flat=True))
    new = [d for d in plan.compatible if d not in assigned]
    busy = {d for devices in conflicts_find(model_id=rollout.model_id, device_ids=new,
                                           exclude_rollout=rollout.pk).values() for d in devices}
    joining = [d for d in new if d not in busy]
    if not joining:
        return 0
    wave = _wave_for_joiners(rollout, count=len(joining), now=now)
    rank = (rollout.assignments.aggregate(top=Max("rank"))["top"] or 0) + 1
    started = wave.state != Wave.State.PENDING
    RolloutDevice.objects.bulk_create(
        [
            RolloutDevice(rollout=rollout, wave=wave, device_id=device_id, rank=rank + i,
                          state=RD.QUEUED if started else RD.PLANNED, queued_at=now if started else None)
            for i, device_id in enumerate(joining)
        ],
        batch_size=2000,
    )
    Wave.objects.filter(pk=wave.pk).update(size=wave.size + len(joining))
    if following:
        rollout.state, rollout.state_reason, rollout.finished_at = Rollout.State.RUNNING, "", None
        rollout.save(update_fields=["state", "state_reason", "finished_at"])
    audit_record(
        actor=SYSTEM, action="rollout.join", obj=rollout,
        reason=f"{len(joining)} devices started matching the target and joined wave {wave.number}"
        + (" (the rollout follows its target)." if following else "."),
        detail={"wave": wave.index, "devices": joining[:100], "waiting_busy": sorted(busy)[:100]},
    )
    rollout_wake(rollout.pk)
    return len(joining)


def _wave_for_joiners(rollout: Rollout, *, count: int, now) -> Wave:
    """The wave in progress, or a catch-up wave after the last one (started when the engine
    reaches it; the current wave index points at it when every other wave has passed)."""
    current = rollout.waves.filter(index=rollout.current_wave).first()
    if current is not None and current.state in (Wave.State.PENDING, Wave.State.RUNNING, Wave.State.SOAKING):
        return current
    last = rollout.waves.order_by("-index").first()
    spec = {"name": "catch-up", "count": count}
    gates = last.gates if last is not None else rollout.gates
    wave = Wave.objects.create(rollout=rollout, index=(last.index + 1) if last else 0, spec=spec, gates=gates, size=0)
    if rollout.current_wave > wave.index:  # cannot happen: the index only moves past passed waves
        raise AssertionError(f"rollout {rollout.pk} is past its last wave")
    audit_record(
        actor=SYSTEM, action="wave.add", obj=rollout,
        reason=f"Wave {wave.number} ({wave_describe(spec)}) added for devices that joined after the plan.",
        detail={"wave": wave.index, "devices": count},
    )
    return wave
