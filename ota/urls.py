"""ota API routes under /api/v1/: devices and enrollment (transport half), rollouts (engine half)."""

from django.urls import path

from ota import views_devices as dv

urlpatterns: list = [
    path("enrollment-tokens/", dv.EnrollmentTokenListCreate.as_view(), name="enrollment-token-list"),
    path("enrollment-tokens/<int:pk>/revoke", dv.EnrollmentTokenRevoke.as_view(), name="enrollment-token-revoke"),
    path("enroll", dv.Enroll.as_view(), name="enroll"),
    path("devices/", dv.DeviceList.as_view(), name="device-list"),
    path("devices/<str:pk>/", dv.DeviceDetail.as_view(), name="device-detail"),
    path("devices/<str:pk>/revoke", dv.DeviceRevoke.as_view(), name="device-revoke"),
]

# Rollout engine routes (ota.views_rollouts).
from ota.views_rollouts import urlpatterns as _rollout_urlpatterns  # noqa: E402

urlpatterns += _rollout_urlpatterns()
