"""ota models live in five modules: deltas (delta artifacts), devices (fleet, enrollment, transport state), rollouts
(rollouts, waves, per-device assignments), ingest (the dead-letter table) and metrics (what the
apps report about their models, per hour). Import them all so Django sees every model."""

from ota.models.deltas import *  # noqa: F401,F403
from ota.models.devices import *  # noqa: F401,F403
from ota.models.ingest import *  # noqa: F401,F403
from ota.models.metrics import *  # noqa: F401,F403
from ota.models.rollouts import *  # noqa: F401,F403
