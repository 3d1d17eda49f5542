"""Seams between the transport half of ota (ingest) and the rollout engine.

Ingest knows nothing about rollouts: after it has stored a batch of device events it calls
`on_device_events`, and the rollout engine (ota.tasks) decides what to evaluate. Kept as a
plain function so ingest works before, and without, the engine.
"""

from __future__ import annotations

import logging

from django.db import transaction

logger = logging.getLogger(__name__)


def on_device_events(event_ids: list[int]) -> None:
    """Wake the wave engine for newly stored DeviceEvent ids, once the batch has committed."""
    if not event_ids:
        return
    try:
        from ota.rollouts import tasks
    except ImportError:
        return
    handler = getattr(tasks, "on_device_events", None)
    if handler is None:
        return
    ids = list(event_ids)
    transaction.on_commit(lambda: handler(ids))
