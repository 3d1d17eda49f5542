"""Rollout and audit routes under /api/v1/."""

from django.urls import path, re_path

from ota.rollouts import api
from ota.rollouts.catalogue import ACTIONS

urlpatterns = [
    path("rollouts/", api.RolloutListCreate.as_view(), name="rollout-list"),
    path("rollouts/<int:pk>/", api.RolloutDetail.as_view(), name="rollout-detail"),
    path("rollouts/<int:pk>/devices/", api.RolloutDevices.as_view(), name="rollout-devices"),
    path("audit/", api.AuditList.as_view(), name="audit-list"),
    path("deltas/<int:pk>/download", api.DeltaDownload.as_view(), name="delta-download"),
] + [
    re_path(
        rf"^rollouts/(?P<pk>[0-9]+)/{action.name}/?$",
        api.RolloutAction.as_view(action_name=action.name),
        name=f"rollout-{action.name}",
    )
    for action in ACTIONS
]
