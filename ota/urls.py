"""ota API routes under /api/v1/: devices and enrollment (transport half), rollouts (engine half)."""

from django.urls import path

urlpatterns: list = [
]

# Rollout engine routes (ota.views_rollouts).
from ota.views_rollouts import urlpatterns as _rollout_urlpatterns  # noqa: E402

urlpatterns += _rollout_urlpatterns()
