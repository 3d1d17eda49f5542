"""Device reports folded into rollout assignments: each device's state, phase times and outcome."""

from __future__ import annotations

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from ota.db import bulk_set
from ota.models import DeviceEvent, Rollout, RolloutDevice
from ota.rollouts.gates import health_gate_broken

RD = RolloutDevice.State


_PHASE_FIELD = {
    RD.RECEIVED: "received_at",
    RD.DOWNLOADING: "download_started_at",
    RD.VERIFYING: "verify_started_at",
    RD.PRECHECKING: "verify_started_at",
    RD.ACTIVATING: "activate_started_at",
    RD.TRIAL: "trial_started_at",
}


_REVERT_OUTCOME = {"committed": RD.REVERTED, "failed": RD.REVERT_FAILED, "rolled_back": RD.REVERT_FAILED, "rejected": RD.REVERT_FAILED}


def assignment_move(a: RolloutDevice, new_state: str, *, at, error_code: str = "", detail: str = "",
                    health: dict | None = None) -> None:
    """Move an assignment (locked by the caller) to the state a device reported: a commit is
    judged by the wave's health gate, the phase's time is stamped once, an outcome is final."""
    if new_state == RD.COMMITTED:
        broken = health_gate_broken(a.wave.gates, health)
        if broken:
            new_state, error_code, detail = RD.UNHEALTHY, "HEALTH_GATE", broken
    a.state = new_state
    stamp = _PHASE_FIELD.get(new_state)
    if stamp and getattr(a, stamp) is None:
        setattr(a, stamp, at)
    if new_state in RolloutDevice.FINISHED:
        a.finished_at = at
        a.error_code, a.detail = error_code or "", (detail or "")[:2000]


def rollout_apply_events(*, event_ids: list[int]) -> set[int]:
    """Fold stored device events into rollout assignments. Returns the rollout ids touched.

    Idempotent: an event whose number is not above the assignment's last one changes nothing.
    """
    events = list(
        DeviceEvent.objects.filter(pk__in=event_ids)
        .exclude(seq=0)
        .order_by("event_no")
        .values("device_id", "seq", "event_no", "state", "error_code", "detail", "received_at", "health",
                "delivery", "bytes_downloaded", "next_opening")
    )
    if not events:
        return set()
    keys = {(e["device_id"], e["seq"]) for e in events}
    device_ids = {d for d, _ in keys}
    seqs = {s for _, s in keys}
    touched: set[int] = set()
    with transaction.atomic():
        candidates = RolloutDevice.objects.filter(device_id__in=device_ids).filter(Q(seq__in=seqs) | Q(revert_seq__in=seqs))
        rollout_ids = sorted(set(candidates.values_list("rollout_id", flat=True)))
        # Lock the rollouts (in id order, so no deadlock) before their assignments: the engine
        # evaluates under the same lock and must not see half a batch.
        list(Rollout.objects.select_for_update().filter(pk__in=rollout_ids).order_by("pk").values_list("pk", flat=True))
        by_update = {}
        by_revert = {}
        for a in candidates.select_for_update(of=("self",)).select_related("wave").order_by("pk"):
            if a.seq is not None:
                by_update[(a.device_id, a.seq)] = a
            if a.revert_seq is not None:
                by_revert[(a.device_id, a.revert_seq)] = a
        changed: dict[int, RolloutDevice] = {}
        for e in events:
            key = (e["device_id"], e["seq"])
            if key in by_revert:
                a = by_revert[key]
                if a.state != RD.REVERTING or e["event_no"] <= a.last_event_no:
                    continue
                outcome = _REVERT_OUTCOME.get(e["state"])
                a.last_event_no = e["event_no"]
                if outcome:
                    a.state = outcome
                    a.reverted_at = e["received_at"]
                    if outcome == RD.REVERT_FAILED:
                        a.error_code, a.detail = e["error_code"], e["detail"][:2000]
                changed[a.pk] = a
                continue
            a = by_update.get(key)
            if a is None or e["event_no"] <= a.last_event_no:
                continue
            a.last_event_no = e["event_no"]
            changed[a.pk] = a
            if e["delivery"]:
                a.delivery, a.bytes_downloaded = e["delivery"], e["bytes_downloaded"]
            new_state = RolloutDevice.FROM_EVENT.get(e["state"])
            if new_state is None or a.state in RolloutDevice.FINISHED or a.state == RD.REVERTING:
                # Late news about a device already decided (timed out, reverted) is kept as
                # detail but never flips the outcome the gates already counted.
                continue
            if new_state == RD.WAITING_FOR_WINDOW and e["next_opening"] is not None:
                # Reported again with a later opening when the device missed a window (it was
                # down): the activate timeout counts from the opening it means to use.
                a.window_opens_at = e["next_opening"]
            assignment_move(a, new_state, at=e["received_at"], error_code=e["error_code"], detail=e["detail"],
                            health=e["health"])
        now = timezone.now()
        for a in changed.values():
            a.updated_at = now
            touched.add(a.rollout_id)
        bulk_set(
            list(changed.values()),
            [
                "state", "last_event_no", "received_at", "download_started_at", "verify_started_at",
                "activate_started_at", "trial_started_at", "finished_at", "reverted_at", "error_code",
                "detail", "delivery", "bytes_downloaded", "window_opens_at", "updated_at",
            ],
        )
    return touched


def events_concern_rollouts(*, event_ids: list[int]) -> bool:
    """Whether any of these events' devices has an update or revert in progress (one query)."""
    devices = DeviceEvent.objects.filter(pk__in=event_ids).exclude(seq=0).values("device_id")
    return RolloutDevice.objects.filter(
        device_id__in=devices, state__in=RolloutDevice.EXPECTING_REPORTS
    ).exists()


def rollout_catch_up_events(*, rollout_id: int) -> set[int]:
    """Apply stored events the event-driven path missed (Redis down when ingest enqueued,
    a task lost): every device report reaches the gates, if only on the next tick."""
    waiting = list(
        RolloutDevice.objects.filter(rollout_id=rollout_id)
        .filter(Q(state__in=(*RolloutDevice.IN_FLIGHT, RD.UNREACHABLE), seq__isnull=False) | Q(state=RD.REVERTING))
        .values_list("device_id", "seq", "revert_seq", "last_event_no")
    )
    if not waiting:
        return set()
    wanted = {}
    for device_id, seq, revert_seq, last in waiting:
        for s in (seq, revert_seq):
            if s is not None:
                wanted[(device_id, s)] = last
    candidates = DeviceEvent.objects.filter(
        device_id__in={d for d, _ in wanted}, seq__in={s for _, s in wanted}
    ).values_list("pk", "device_id", "seq", "event_no")
    ids = [pk for pk, d, s, n in candidates if (d, s) in wanted and n > wanted[(d, s)]]
    return rollout_apply_events(event_ids=ids) if ids else set()
