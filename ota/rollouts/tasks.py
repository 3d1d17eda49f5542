"""Celery tasks for the wave engine. Thin: each takes ids and calls ota.rollouts.engine or .events.

All of them are idempotent (the engine locks the rollout row and changes state with
conditional UPDATEs), so a redelivery after a worker died (acks_late) does no harm. The task
names (ota.tasks.*) are wire names kept from before the code moved here: queued tasks of a
running installation stay valid across an upgrade.

OtaConfig.ready() plugs two functions of this module into the seams of the lower layers:
`enqueue_evaluation` wakes the engine after an operator action (ota.rollouts.wake), and
`on_device_events` after ingest stored device events (ota.transport.hooks).
"""

from __future__ import annotations

import logging

from celery import shared_task
from django.db import OperationalError

from ota.fleet import timestamps as fleet_timestamps
from ota.housekeeping import housekeeping_run
from ota.rollouts.directives import directives_publish_stale
from ota.rollouts.engine import (
    rollout_evaluate,
    rollout_step_guarded,
    rollouts_awaiting_late_reports,
    rollouts_due,
)
from ota.rollouts.events import events_concern_rollouts, rollout_apply_events, rollout_catch_up_events
from ota.rollouts.joiners import rollout_take_in_joiners, rollouts_taking_joiners
from ota.rollouts.reconcile import assignments_reconcile_reported, directives_republish_unacknowledged, reverts_retry
from ota.rollouts.schedule import rollouts_start_due

logger = logging.getLogger(__name__)


@shared_task(name="ota.tasks.build_delta", autoretry_for=(OperationalError,), retry_backoff=1, max_retries=5)
def build_delta(delta_id: int) -> None:
    from ota.rollouts.deltas import delta_compute

    delta_compute(delta_id=delta_id)


@shared_task(name="ota.tasks.evaluate_rollout", autoretry_for=(OperationalError,), retry_backoff=1, max_retries=5)
def evaluate_rollout(rollout_id: int, catch_up: bool = False) -> str:
    if catch_up and rollout_step_guarded(rollout_catch_up_events, rollout_id=rollout_id, step="event catch-up") is None:
        return "engine-error"
    return rollout_evaluate(rollout_id=rollout_id)


@shared_task(name="ota.tasks.apply_device_events", autoretry_for=(OperationalError,), retry_backoff=1, max_retries=5)
def apply_device_events(event_ids: list[int]) -> list[int]:
    touched = sorted(rollout_apply_events(event_ids=event_ids))
    for rollout_id in touched:
        evaluate_rollout.delay(rollout_id)
    return touched


@shared_task(name="ota.tasks.rollout_tick")
def rollout_tick() -> dict:
    """The beat: re-publish directives a dead worker left unpublished or the broker lost, retry
    failed reverts, record outcomes devices report in their presence but whose events were lost
    (ota/rollouts/reconcile.py), start scheduled rollouts that are due (ota/rollouts/schedule.py),
    take in late joiners, then evaluate every running rollout (soak timers and phase timeouts need a clock, not only
    events). Finished rollouts with devices still expected to report (unreachable ones that may
    come back) get their stored events caught up too."""
    republished = directives_publish_stale() + directives_republish_unacknowledged()
    reverts = reverts_retry()
    recorded = assignments_reconcile_reported()
    started = rollouts_start_due()
    # A rollout whose stored definition makes a step raise is paused (rollout_step_guarded); the
    # others are still taken care of in this tick.
    joined = {
        rid: n for rid in rollouts_taking_joiners()
        if (n := rollout_step_guarded(rollout_take_in_joiners, rollout_id=rid, step="late-joiner check", on_error=0))
    }
    due = sorted(set(rollouts_due()) | recorded)
    for rollout_id in due:
        evaluate_rollout.delay(rollout_id, catch_up=True)
    for rollout_id in rollouts_awaiting_late_reports():
        catch_up_events.delay(rollout_id)
    return {"republished": republished, "evaluated": due, "joined": joined, "reverts_retried": reverts,
            "outcomes_from_presence": sorted(recorded), "scheduled_started": started}


@shared_task(name="ota.tasks.catch_up_events", autoretry_for=(OperationalError,), retry_backoff=1, max_retries=5)
def catch_up_events(rollout_id: int) -> int:
    """Fold stored events of a finished rollout's late devices into their assignments."""
    return len(rollout_catch_up_events(rollout_id=rollout_id))


@shared_task(name="ota.tasks.housekeeping")
def housekeeping() -> dict:
    """Beat, hourly by default: prune old device events and superseded directives in bounded
    batches (ota/housekeeping.py). No retry: the next run picks up whatever this one left."""
    return housekeeping_run().as_dict()


def enqueue_evaluation(rollout_id: int) -> None:
    """The engine's waker (ota.rollouts.wake): evaluate this rollout on a worker."""
    evaluate_rollout.delay(rollout_id)


def on_device_events(event_ids: list[int]) -> None:
    """Called through ota.transport.hooks after ingest committed a batch of events: hand them to a worker."""
    if not event_ids or not events_concern_rollouts(event_ids=event_ids):
        return  # no device of this batch is waiting on an update: nothing to wake
    try:
        apply_device_events.delay(list(event_ids))
    except Exception:  # the events are stored; the beat tick's catch-up applies them
        logger.exception("could not enqueue %d device events; the rollout tick will catch up", len(event_ids))


@shared_task(name="ota.tasks.timestamps_refresh")
def timestamps_refresh() -> int:
    """Re-sign and retain every device's freshness timestamp (ota.fleet.timestamps)."""
    return fleet_timestamps.timestamps_refresh()
