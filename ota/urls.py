"""ota API routes under /api/v1/: devices and enrollment, then rollouts."""

from ota.fleet.urls import urlpatterns as fleet_urlpatterns
from ota.rollouts.urls import urlpatterns as rollout_urlpatterns

urlpatterns = [*fleet_urlpatterns, *rollout_urlpatterns]
