"""Django's admin autodiscovery imports <app>.admin: register each room's admin classes."""

from ota.fleet import admin as fleet_admin
from ota.rollouts import admin as rollouts_admin
from ota.transport import admin as transport_admin

__all__ = ["fleet_admin", "rollouts_admin", "transport_admin"]
