from django.urls import path

from web import views

app_name = "web"

urlpatterns = [
    path("login/", views.LoginView.as_view(), name="login"),
    path("logout/", views.logout_view, name="logout"),
    path("", views.overview, name="overview"),
    path("devices/", views.device_list, name="devices"),
    path("devices/<str:device_id>/", views.device_detail, name="device"),
    path("devices/<str:device_id>/revoke/", views.device_revoke, name="device_revoke"),
    path("registry/", views.model_list, name="models"),
    path("registry/<slug:name>/", views.model_detail, name="model"),
    path("registry/<slug:name>/aliases/", views.alias_move, name="alias_move"),
    path("registry/<slug:name>/versions/<str:version>/", views.version_detail, name="version"),
    path("registry/<slug:name>/versions/<str:version>/release/", views.version_release, name="version_release"),
    path("registry/<slug:name>/versions/<str:version>/deprecate/", views.version_deprecate, name="version_deprecate"),
    path("registry/<slug:name>/versions/<str:version>/revoke/", views.version_revoke, name="version_revoke"),
    path("registry/<slug:name>/versions/<str:version>/health.json", views.version_health, name="version_health"),
    path("rollouts/", views.rollout_list, name="rollouts"),
    path("rollouts/new/", views.rollout_new, name="rollout_new"),
    path("rollouts/new/preview/", views.rollout_preview, name="rollout_preview"),
    path("rollouts/<int:pk>/", views.rollout_detail, name="rollout"),
    path("rollouts/<int:pk>/live/", views.rollout_live, name="rollout_live"),
    path("rollouts/<int:pk>/<str:action>/", views.rollout_action, name="rollout_action"),
    path("audit/", views.audit_log, name="audit"),
    path("access/", views.access, name="access"),
]
