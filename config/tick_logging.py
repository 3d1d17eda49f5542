"""Keeps the rollout engine's clock out of the INFO log.

Celery beat sends `ota.tasks.rollout_tick` every ROLLOUT_TICK_SECONDS (5 s), and a worker logs
its receipt and its result, plus one catch-up evaluation per running rollout: at INFO that was a
third of `make run`'s output with nothing happening. `RoutineTicks` logs those lines at DEBUG
(shown with `--loglevel DEBUG`, dropped otherwise):

- beat's "Sending due task rollout-tick";
- a worker's "received" for the tick and for every evaluation (its result line says what it did);
- "succeeded" of a tick that re-published nothing, and of an evaluation that changed nothing
  ('idle', or another worker held the rollout).

Everything else stays at INFO: a tick that re-published directives, an evaluation that dispatched,
advanced, completed or tripped a gate, the hand-over of device events (apply_device_events),
every failure and retry. A gate decision that changes no outcome word (a wave's success gate met,
its soak beginning) is written to the audit log; `log_engine_decisions` repeats each automatic
(actor "system") audit entry at INFO in the worker's log.
"""

from __future__ import annotations

import ast
import logging

TICK_TASK = "ota.tasks.rollout_tick"
EVALUATE_TASK = "ota.tasks.evaluate_rollout"
NOTHING_HAPPENED = ("'idle'", "'busy-or-missing'")

decisions_logger = logging.getLogger("modelfleet.engine")


def _tick_republished_nothing(return_value: str) -> bool:
    try:
        result = ast.literal_eval(return_value)
    except (ValueError, SyntaxError):  # truncated by saferepr: say it at INFO
        return False
    return isinstance(result, dict) and result.get("republished") == 0


def is_routine(record: logging.LogRecord) -> bool:
    message = record.msg if isinstance(record.msg, str) else ""
    args = record.args
    if record.name == "celery.beat":
        return (message.startswith("Scheduler: Sending due task") and isinstance(args, tuple)
                and TICK_TASK in args)
    if not isinstance(args, dict) or "name" not in args:
        return False
    name = args["name"]
    if message.startswith("Task %(name)s[%(id)s] received"):
        return name in (TICK_TASK, EVALUATE_TASK)
    if message.startswith("Task %(name)s[%(id)s] succeeded"):
        value = str(args.get("return_value", ""))
        if name == TICK_TASK:
            return _tick_republished_nothing(value)
        return name == EVALUATE_TASK and value in NOTHING_HAPPENED
    return False


class RoutineTicks(logging.Filter):
    """On the loggers of celery beat, the worker's task receipt and task results: a routine
    record goes on at DEBUG when the logger shows DEBUG, and is dropped otherwise."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not is_routine(record):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return True


ROUTINE_LOGGERS = ("celery.beat", "celery.worker.strategy", "celery.app.trace")


def quiet_routine_ticks() -> None:
    """Install RoutineTicks on the loggers that write tick lines (idempotent)."""
    for name in ROUTINE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RoutineTicks) for f in logger.filters):
            logger.addFilter(RoutineTicks())


def _log_decision(sender, instance, created, **_kwargs) -> None:
    from registry.audit import SYSTEM

    if created and instance.actor == SYSTEM:
        decisions_logger.info("%s %s: %s: %s", instance.object_type, instance.object_id, instance.action,
                              instance.reason)


def log_engine_decisions() -> None:
    """Log every automatic audit entry (the engine's decisions) at INFO in this process."""
    from django.db.models.signals import post_save

    post_save.connect(_log_decision, sender="registry.AuditEntry", weak=False,
                      dispatch_uid="config.tick_logging.log_engine_decisions")
