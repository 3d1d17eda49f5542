import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("modelfleet")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# The rollout engine's clock: soak times and phase timeouts advance on this tick even when no
# device reports anything; events wake the engine in between.
from config.env import env_int  # noqa: E402

app.conf.beat_schedule = {
    "rollout-tick": {
        "task": "ota.tasks.rollout_tick",
        "schedule": float(env_int("ROLLOUT_TICK_SECONDS", 5, min_value=1, max_value=3600)),
    },
}
