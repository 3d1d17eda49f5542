import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("modelfleet")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# The rollout engine's clock: soak times and phase timeouts advance on this tick even when no
# device reports anything; events wake the engine in between.
from config.env import env_int  # noqa: E402
from config.tick_logging import log_engine_decisions, quiet_routine_ticks  # noqa: E402

app.conf.beat_schedule = {
    "rollout-tick": {
        "task": "ota.tasks.rollout_tick",
        "schedule": float(env_int("ROLLOUT_TICK_SECONDS", 5, min_value=1, max_value=3600)),
    },
    # Re-signs each device's short-lived timestamp (ota/fleet/timestamps.py) well before it expires.
    "timestamps-refresh": {
        "task": "ota.tasks.timestamps_refresh",
        "schedule": float(env_int("TIMESTAMP_REFRESH_SECONDS", 900, min_value=10, max_value=86400)),
    },
    # Prunes old device events and superseded directives (ota/housekeeping.py).
    "housekeeping": {
        "task": "ota.tasks.housekeeping",
        "schedule": float(env_int("HOUSEKEEPING_INTERVAL_SECONDS", 3600, min_value=60, max_value=7 * 86400)),
    },
}

# Routine ticks log at DEBUG; what the engine decided stays at INFO (config/tick_logging.py).
quiet_routine_ticks()


@signals.after_setup_logger.connect
def _quiet_after_logging_setup(**_kwargs):
    quiet_routine_ticks()


@signals.worker_init.connect
def _log_decisions_in_worker(**_kwargs):
    log_engine_decisions()
