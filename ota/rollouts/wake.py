"""Who wakes the engine: an operator action (or anything else that changes a rollout) calls
`rollout_wake`, and once its transaction commits the registered waker runs. OtaConfig.ready()
registers ota.rollouts.tasks.enqueue_evaluation, so the rollout logic never imports its Celery
tasks (tasks call the logic, never the reverse). With no waker registered, or when the waker
fails, nothing is lost: the beat tick evaluates every running rollout anyway."""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.db import transaction

logger = logging.getLogger(__name__)

_waker: Callable[[int], None] | None = None


def waker_register(waker: Callable[[int], None]) -> None:
    global _waker
    _waker = waker


def rollout_wake(rollout_id: int) -> None:
    """Have the engine evaluate the rollout once the current transaction commits."""
    waker = _waker
    if waker is None:
        logger.warning("no engine waker registered; rollout %s waits for the beat tick", rollout_id)
        return

    def wake():
        try:
            waker(rollout_id)
        except Exception:  # the change is committed; the beat tick evaluates it anyway
            logger.exception("could not wake the engine for rollout %s; the beat tick will", rollout_id)

    transaction.on_commit(wake)
