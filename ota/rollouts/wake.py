"""Waking the wave engine after a change commits."""

from __future__ import annotations

import logging

from django.db import transaction

logger = logging.getLogger(__name__)


def rollout_wake(rollout_id: int) -> None:
    from ota.rollouts import tasks

    def enqueue():
        try:
            tasks.evaluate_rollout.delay(rollout_id)
        except Exception:  # the change is committed; the beat tick evaluates it anyway
            logger.exception("could not enqueue evaluation of rollout %s; the beat tick will", rollout_id)

    transaction.on_commit(enqueue)
