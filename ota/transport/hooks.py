"""The seam between ingest and whatever reacts to device events.

Ingest knows nothing about rollouts: after it has stored a batch of device events it calls
`on_device_events`, and every registered handler runs with the new event ids once the batch
has committed. OtaConfig.ready() registers the rollout engine's handler
(ota.rollouts.tasks.on_device_events), so ingest never imports the engine and runs the same
with no handler at all (the engine's beat tick then catches up on stored events).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.db import transaction

logger = logging.getLogger(__name__)

_handlers: list[Callable[[list[int]], None]] = []


def device_events_handler_register(handler: Callable[[list[int]], None]) -> None:
    if handler not in _handlers:
        _handlers.append(handler)


def on_device_events(event_ids: list[int]) -> None:
    """Hand newly stored DeviceEvent ids to every registered handler, once the batch has committed."""
    if not event_ids:
        return
    ids = list(event_ids)
    for handler in list(_handlers):
        transaction.on_commit(lambda handler=handler: handler(ids))
