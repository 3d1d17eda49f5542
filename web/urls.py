from django.urls import path

from web import login
from web.access import views as access
from web.audit import views as audit
from web.devices import views as devices
from web.overview import views as overview
from web.registry import views as registry
from web.rollouts import views as rollouts
from web.rollouts import wizard

app_name = "web"

urlpatterns = [
    path("login/", login.LoginView.as_view(), name="login"),
    path("logout/", login.logout_view, name="logout"),
    path("", overview.overview, name="overview"),
    path("devices/", devices.device_list, name="devices"),
    path("devices/<str:device_id>/", devices.device_detail, name="device"),
    path("devices/<str:device_id>/revoke/", devices.device_revoke, name="device_revoke"),
    path("registry/", registry.model_list, name="models"),
    path("registry/<slug:name>/", registry.model_detail, name="model"),
    path("registry/<slug:name>/aliases/", registry.alias_move, name="alias_move"),
    path("registry/<slug:name>/versions/<str:version>/", registry.version_detail, name="version"),
    path("registry/<slug:name>/versions/<str:version>/release/", registry.version_release, name="version_release"),
    path("registry/<slug:name>/versions/<str:version>/deprecate/", registry.version_deprecate, name="version_deprecate"),
    path("registry/<slug:name>/versions/<str:version>/revoke/", registry.version_revoke, name="version_revoke"),
    path("registry/<slug:name>/versions/<str:version>/health.json", registry.version_health, name="version_health"),
    path("rollouts/", rollouts.rollout_list, name="rollouts"),
    path("rollouts/new/", wizard.rollout_new, name="rollout_new"),
    path("rollouts/new/preview/", wizard.rollout_preview, name="rollout_preview"),
    path("rollouts/<int:pk>/", rollouts.rollout_detail, name="rollout"),
    path("rollouts/<int:pk>/live/", rollouts.rollout_live, name="rollout_live"),
    path("rollouts/<int:pk>/<str:action>/", rollouts.rollout_action, name="rollout_action"),
    path("audit/", audit.audit_log, name="audit"),
    path("access/", access.access, name="access"),
]
