"""ota API routes under /api/v1/: devices and enrollment (transport half), rollouts (engine half)."""

from django.urls import path

urlpatterns: list = [
]
