"""Housekeeping: prunes the tables that otherwise grow forever, in bounded batches.

Celery beat runs it (`ota.tasks.housekeeping`, every HOUSEKEEPING_INTERVAL_SECONDS, default an
hour). What goes, once older than its retention (0 days: kept forever):

- device events (`DeviceEvent`) received more than EVENT_RETENTION_DAYS ago, except
  - every event of a device with an update or revert in flight in a running or paused rollout,
  - every event that names a running or paused rollout (its health figures, its catch-up),
  - the newest event (highest `event_no`) of each device and model: the report that explains the
    state the device is in now;
- directives (`Directive`) created more than DIRECTIVE_RETENTION_DAYS ago that are published and
  superseded: a newer published directive (higher `seq`) to the same device for the same model
  exists. So the newest directive of each device and model is never pruned (a re-publish sends
  it), nor the newest published one (what the broker retains until a newer one goes out), nor an
  unpublished one, nor any of a running or paused rollout.

- model metrics (`ModelMetricsHour`, what the apps reported per device, release and hour) of
  hours that began more than METRICS_RETENTION_DAYS ago: the control-group gates read only the
  hours since a wave started.

Never pruned: the release history (`ActiveRelease`: which release ran where, when), the audit
log (`registry.AuditEntry`), devices and their telemetry (`Device.last_telemetry` is one value
per device, overwritten by each report: there is no telemetry table to prune).

Each table is walked in primary-key order: one SELECT finds the next HOUSEKEEPING_BATCH_SIZE
prunable ids, one DELETE removes them (its own transaction, re-checking every condition, so a
device that went in flight in between keeps its events). A run stops when a table is done or its
share of HOUSEKEEPING_TIME_BUDGET_SECONDS is spent; the next run goes on from the start of
what is left. Running it again deletes nothing more than is due (idempotent).

Several workers at once: on PostgreSQL a run first takes a session advisory lock
(`pg_try_advisory_lock`); a run that does not get it returns at once, pruning nothing. SQLite
has no such lock and needs none: it runs one writer at a time, and a DELETE of rows another run
already removed removes nothing and counts nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection
from django.db.models import CharField, Exists, Max, Model, OuterRef, Q
from django.db.models.functions import Cast
from django.utils import timezone

from ota.models import DeviceEvent, Directive, ModelMetricsHour, Rollout, RolloutDevice

logger = logging.getLogger(__name__)

# The PostgreSQL advisory lock every housekeeping run of this database tries to take (a signed
# 64-bit key derived from a fixed name, so it does not collide with another feature's lock).
LOCK_KEY = int.from_bytes(hashlib.sha256(b"modelfleet.housekeeping").digest()[:8], "big", signed=True)


@dataclass
class HousekeepingResult:
    claimed: bool = True  # False: another run held the lock, this one did nothing
    events: int = 0  # device events deleted
    directives: int = 0  # directives deleted
    metrics_hours: int = 0  # hourly model-metrics rows deleted
    finished: bool = True  # False: the time budget ran out with prunable rows left for the next run
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def _active_rollouts():
    return Rollout.objects.filter(state__in=Rollout.ACTIVE_STATES)


def prunable_events(cutoff: datetime) -> Q:
    """Device events received before `cutoff` that no running or paused rollout needs and that
    are not the newest of their device and model."""
    in_flight = RolloutDevice.objects.filter(
        rollout__state__in=Rollout.ACTIVE_STATES, state__in=RolloutDevice.EXPECTING_REPORTS
    ).values("device_id")
    # DeviceEvent.rollout_id is the id as the device echoes it: a string.
    active_ids = _active_rollouts().annotate(key=Cast("pk", CharField())).values("key")
    newer = DeviceEvent.objects.filter(
        device_id=OuterRef("device_id"), model=OuterRef("model"), event_no__gt=OuterRef("event_no")
    )
    return (
        Q(received_at__lt=cutoff)
        & Q(Exists(newer))
        & ~Q(device_id__in=in_flight)
        & ~Q(rollout_id__in=active_ids)
    )


def prunable_directives(cutoff: datetime) -> Q:
    """Published directives created before `cutoff`, superseded by a newer published one to the
    same device for the same model, and not of a running or paused rollout."""
    newer = Directive.objects.filter(
        device_id=OuterRef("device_id"), version__model_id=OuterRef("version__model_id"),
        seq__gt=OuterRef("seq"), published_at__isnull=False,
    )
    return (
        Q(created_at__lt=cutoff, published_at__isnull=False)
        & Q(Exists(newer))
        & ~Q(rollout_id__in=_active_rollouts().values("pk"))
    )


def prune(model: type[Model], prunable: Q, *, older: Q, batch_size: int, deadline: float) -> tuple[int, bool]:
    """Delete `model` rows matching `prunable`, at most `batch_size` per DELETE, walking the
    primary key upwards from the lowest id, up to the highest id of a row matching `older`.
    Returns (rows deleted, whether the walk reached its end before `deadline`)."""
    rows = model._base_manager
    last = rows.filter(older).aggregate(last=Max("pk"))["last"]
    if last is None:
        return 0, True
    deleted = 0
    after = None
    while True:
        window = rows.filter(prunable, pk__lte=last)
        if after is not None:
            window = window.filter(pk__gt=after)
        ids = list(window.order_by("pk").values_list("pk", flat=True)[:batch_size])
        if ids:
            count, _ = rows.filter(prunable, pk__in=ids).delete()
            deleted += count
        if len(ids) < batch_size:
            return deleted, True
        after = ids[-1]
        if time.monotonic() >= deadline:
            return deleted, False


@contextmanager
def _claimed() -> Iterator[bool]:
    """True while this run holds the housekeeping lock (always on databases without one)."""
    if connection.vendor != "postgresql":
        yield True
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [LOCK_KEY])
        got = cursor.fetchone()[0]
    if not got:
        yield False
        return
    try:
        yield True
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [LOCK_KEY])


def housekeeping_run(
    *,
    now: datetime | None = None,
    event_retention_days: int | None = None,
    directive_retention_days: int | None = None,
    metrics_retention_days: int | None = None,
    batch_size: int | None = None,
    time_budget: float | None = None,
) -> HousekeepingResult:
    """One housekeeping run; arguments left out come from settings (EVENT_RETENTION_DAYS,
    DIRECTIVE_RETENTION_DAYS, METRICS_RETENTION_DAYS, HOUSEKEEPING_BATCH_SIZE,
    HOUSEKEEPING_TIME_BUDGET_SECONDS)."""
    now = now or timezone.now()
    event_days = settings.EVENT_RETENTION_DAYS if event_retention_days is None else event_retention_days
    directive_days = (
        settings.DIRECTIVE_RETENTION_DAYS if directive_retention_days is None else directive_retention_days
    )
    metrics_days = settings.METRICS_RETENTION_DAYS if metrics_retention_days is None else metrics_retention_days
    batch_size = batch_size or settings.HOUSEKEEPING_BATCH_SIZE
    budget = settings.HOUSEKEEPING_TIME_BUDGET_SECONDS if time_budget is None else time_budget
    started = time.monotonic()
    deadline = started + budget
    # (what, model, prunable, the time condition bounding the walk). Directives first, and each
    # table gets at least its share of the budget, so a backlog of events cannot starve them.
    tables = []
    if directive_days:
        cutoff = now - timedelta(days=directive_days)
        tables.append(("directives", Directive, prunable_directives(cutoff), Q(created_at__lt=cutoff)))
    if event_days:
        cutoff = now - timedelta(days=event_days)
        tables.append(("events", DeviceEvent, prunable_events(cutoff), Q(received_at__lt=cutoff)))
    if metrics_days:
        cutoff = now - timedelta(days=metrics_days)
        tables.append(("metrics_hours", ModelMetricsHour, Q(hour__lt=cutoff), Q(hour__lt=cutoff)))
    result = HousekeepingResult()
    with _claimed() as claimed:
        if not claimed:
            logger.debug("housekeeping: another run holds the lock; nothing to do here")
            return HousekeepingResult(claimed=False)
        for index, (what, model, prunable, older) in enumerate(tables):
            share = (deadline - time.monotonic()) / (len(tables) - index)
            count, done = prune(model, prunable, older=older, batch_size=batch_size,
                                deadline=time.monotonic() + max(share, 0))
            setattr(result, what, count)
            result.finished = result.finished and done
    result.seconds = round(time.monotonic() - started, 3)
    pruned = [f"{n} {what} older than {days} days" for n, what, days in (
        (result.events, "device events", event_days),
        (result.directives, "superseded directives", directive_days),
        (result.metrics_hours, "hours of model metrics", metrics_days),
    ) if n]
    if pruned:
        logger.info("housekeeping: pruned %s in %.1f s%s", " and ".join(pruned), result.seconds,
                    "" if result.finished else " (time budget spent: the next run goes on)")
    else:
        logger.debug("housekeeping: nothing to prune (%.3f s)", result.seconds)
    return result
