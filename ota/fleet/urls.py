"""Device and enrollment routes under /api/v1/."""

from django.urls import path

from ota.fleet import api

urlpatterns = [
    path("enrollment-tokens/", api.EnrollmentTokenListCreate.as_view(), name="enrollment-token-list"),
    path("enrollment-tokens/<int:pk>/revoke", api.EnrollmentTokenRevoke.as_view(), name="enrollment-token-revoke"),
    path("enroll", api.Enroll.as_view(), name="enroll"),
    path("devices/", api.DeviceList.as_view(), name="device-list"),
    path("devices/<str:pk>/", api.DeviceDetail.as_view(), name="device-detail"),
    path("devices/<str:pk>/revoke", api.DeviceRevoke.as_view(), name="device-revoke"),
    path("keyring/", api.KeyringView.as_view(), name="keyring"),
]
