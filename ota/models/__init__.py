"""ota models live in three modules: devices (fleet, enrollment, transport state), rollouts
(rollouts, waves, per-device assignments) and ingest (the dead-letter table). Import them all so
Django sees every model."""

from ota.models.devices import *  # noqa: F401,F403
from ota.models.ingest import *  # noqa: F401,F403
from ota.models.rollouts import *  # noqa: F401,F403
