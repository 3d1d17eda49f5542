"""Reconciling desired and reported state, run by the beat tick, so that after a broker crash, an
ingest outage or a lost message every device converges with nobody acting. What a device
reports comes from its retained presence (per model: the last directive seq it handled, the
release it runs and whether it is committed, the update in flight), stored by ingest on
DeviceModelState.

- `directives_republish_unacknowledged`: the newest directive of a (device, model) that an
  online device has neither acknowledged (no event with its seq) nor reported handling goes out
  again (retained, same bytes, same seq: an agent that has it ignores the copy). Mosquitto
  persists retained messages only at its autosave interval; after a crash it may serve an older
  directive, or none. A device whose presence, newer than the directive, still reports an older
  seq gets it after REPORT_GRACE; any other after REPUBLISH_AFTER. Offline devices wait: their
  copy is republished once they are back.
- `assignments_reconcile_reported`: a device that reports it handled its rollout directive and
  nothing for it is in flight, while the assignment still waits for its outcome (the events
  were lost: a broker crash took them, say), gets its outcome recorded from what it runs.
- `reverts_retry`: a revert that failed on a device is tried again with backoff, a few times;
  after that the device stays `revert_failed`, listed with the reason.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.db import transaction
from django.db.models import Exists, F, OuterRef, Q
from django.utils import timezone

from ota.db import bulk_set
from ota.models import Device, DeviceEvent, DeviceModelState, Directive, Rollout, RolloutDevice
from ota.rollouts.directives import DirectiveRequest, directives_issue, directives_publish
from ota.rollouts.events import assignment_move
from registry.audit import SYSTEM, audit_record

logger = logging.getLogger(__name__)
RD = RolloutDevice.State
# A directive an online device has not acknowledged this long after it (last) went out is
# published again.
REPUBLISH_AFTER = timedelta(minutes=2)
# How long a presence must stand (with no report overtaking it) before the reconciler acts on it:
# the device publishes its events and its presence together; the events get the first word.
REPORT_GRACE = timedelta(seconds=15)
REVERT_ATTEMPTS = 5
REVERT_BACKOFF = timedelta(minutes=1)  # doubled after each failed attempt


def directives_republish_unacknowledged(*, now=None, limit: int = 5000) -> int:
    """Publish again every newest, not withdrawn directive that its active, online device has
    neither acknowledged nor reported handling, and that went out more than REPUBLISH_AFTER ago
    (REPORT_GRACE ago if the device's presence since says it lacks it). Returns how many went out."""
    now = now or timezone.now()
    newer = Directive.objects.filter(device_id=OuterRef("device_id"), version__model_id=OuterRef("version__model_id"),
                                     seq__gt=OuterRef("seq"))
    acknowledged = DeviceEvent.objects.filter(device_id=OuterRef("device_id"), seq=OuterRef("seq"))
    handled = DeviceModelState.objects.filter(device_id=OuterRef("device_id"), model_id=OuterRef("version__model_id"),
                                              reported_seq__gte=OuterRef("seq"))
    # A presence newer than the directive that does not report it handled (an older seq, or
    # the model not there at all), standing for REPORT_GRACE: the device has not got it.
    lacks_it = Q(device__reported_at__gt=F("published_at"), device__reported_at__lt=now - REPORT_GRACE)
    ids = list(
        Directive.objects.filter(published_at__isnull=False, withdrawn_at__isnull=True,
                                 device__state=Device.State.ACTIVE, device__online=True)
        .filter(Q(published_at__lt=now - REPUBLISH_AFTER) | lacks_it)
        .exclude(Exists(newer))
        .exclude(Exists(acknowledged))
        .exclude(Exists(handled))
        .order_by("published_at")
        .values_list("pk", flat=True)[:limit]
    )
    if not ids:
        return 0
    Directive.objects.filter(pk__in=ids).update(published_at=None)
    return directives_publish(directive_ids=ids)


def assignments_reconcile_reported(*, now=None, limit: int = 2000) -> set[int]:
    """Record the outcome of assignments still waiting on a device that, by its presence (older
    than REPORT_GRACE), handled their directive and has nothing in flight for it: committed if
    it runs the rollout's release committed (judged by the health gate like any commit), failed
    with OUTCOME_LOST if it runs something else. Returns the rollout ids touched."""
    now = now or timezone.now()
    waiting = (
        RolloutDevice.objects.filter(state__in=(*RolloutDevice.IN_FLIGHT, RD.UNREACHABLE), seq__isnull=False)
        .filter(Exists(DeviceModelState.objects.filter(
            device_id=OuterRef("device_id"), model_id=OuterRef("rollout__model_id"),
            reported_seq__gte=OuterRef("seq"), reported_at__lt=now - REPORT_GRACE,
        ).exclude(reported_update_seq=OuterRef("seq"))))
    )
    moved: list[RolloutDevice] = []
    with transaction.atomic():
        rollout_ids = sorted(set(waiting.values_list("rollout_id", flat=True)[:limit]))
        if not rollout_ids:
            return set()
        # The lock order of rollout_apply_events: rollouts first, then their assignments.
        list(Rollout.objects.select_for_update().filter(pk__in=rollout_ids).order_by("pk").values_list("pk", flat=True))
        assignments = list(waiting.filter(rollout_id__in=rollout_ids).select_for_update(of=("self",))
                           .select_related("wave", "rollout__release").order_by("pk")[:limit])
        states = {
            (s.device_id, s.model_id): s
            for s in DeviceModelState.objects.filter(device_id__in={a.device_id for a in assignments})
        }
        for a in assignments:
            state = states[(a.device_id, a.rollout.model_id)]
            if state.active_version_id == a.rollout.release_id and state.reported_committed:
                assignment_move(a, RD.COMMITTED, at=state.reported_at,
                                detail="recorded from the device's presence: its reports were lost")
            elif state.reported_seq == a.seq:
                running = state.active_sha256[:12] or "nothing"
                assignment_move(a, RD.FAILED, at=state.reported_at, error_code="OUTCOME_LOST",
                                detail=f"the device handled the directive but runs {running}, not this release; "
                                       "its reports were lost")
            else:
                continue  # a newer directive for the model took over; its own reports decide
            a.updated_at = now
            moved.append(a)
        bulk_set(moved, ["state", "received_at", "download_started_at", "verify_started_at", "activate_started_at",
                  "trial_started_at", "finished_at", "error_code", "detail", "updated_at"])
    touched = {a.rollout_id for a in moved}
    if moved:
        logger.info("reconcile: recorded %d outcomes from presence in rollouts %s", len(moved), sorted(touched))
    return touched


def reverts_retry(*, now=None) -> int:
    """Issue a new revert directive (new seq) to devices whose revert failed and whose retry is
    due; the wait doubles after each attempt. Returns how many were sent."""
    now = now or timezone.now()
    with transaction.atomic():
        due = list(
            RolloutDevice.objects.select_for_update(skip_locked=True)
            .filter(state=RD.REVERT_FAILED, revert_attempts__lt=REVERT_ATTEMPTS, previous_version__isnull=False)
            .exclude(revert_retry_at__gt=now)
            .select_related("device", "previous_version__model", "rollout")[:500]
        )
        due = [a for a in due if a.device.state == Device.State.ACTIVE]
        if not due:
            return 0
        by_rollout: dict[int, list[RolloutDevice]] = {}
        for a in due:
            by_rollout.setdefault(a.rollout_id, []).append(a)
        sent = 0
        for rollout_id, assignments in by_rollout.items():
            requests = [DirectiveRequest(device_id=a.device_id, hardware=a.device.hardware_id, version=a.previous_version)
                        for a in assignments]
            issued = directives_issue(requests=requests, rollout_id=rollout_id, kind=Directive.Kind.REVERT)
            for a in assignments:
                directive = issued.get(a.device_id)
                a.revert_attempts += 1
                a.revert_retry_at = now + REVERT_BACKOFF * (2 ** a.revert_attempts)
                a.updated_at = now
                if directive is not None:
                    a.state, a.revert_seq, a.revert_directed_at = RD.REVERTING, directive.seq, now
            bulk_set(assignments, ["state", "revert_seq", "revert_directed_at", "revert_attempts", "revert_retry_at",
                                   "updated_at"])
            sent += len(issued)
            audit_record(
                actor=SYSTEM, action="devices.revert_retry", obj=assignments[0].rollout,
                reason=f"{len(issued)} failed reverts tried again.",
                detail={"devices": [a.device_id for a in assignments][:100]},
            )
        return sent
