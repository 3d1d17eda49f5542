"""ota models live in two modules: devices (fleet, enrollment, transport state) and rollouts
(rollouts, waves, per-device assignments). Import both so Django sees every model."""

from ota.models.devices import *  # noqa: F401,F403
from ota.models.rollouts import *  # noqa: F401,F403
