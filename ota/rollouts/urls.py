"""Rollout and audit routes under /api/v1/."""

from django.urls import path, re_path

from ota.rollouts import api

urlpatterns = [
    path("rollouts/", api.RolloutListCreate.as_view(), name="rollout-list"),
    path("rollouts/<int:pk>/", api.RolloutDetail.as_view(), name="rollout-detail"),
    path("rollouts/<int:pk>/devices/", api.RolloutDevices.as_view(), name="rollout-devices"),
    path("audit/", api.AuditList.as_view(), name="audit-list"),
] + [
    re_path(rf"^rollouts/(?P<pk>[0-9]+)/{name}/?$", api.RolloutAction.as_view(action_name=name), name=f"rollout-{name}")
    for name in api.ACTIONS
]
