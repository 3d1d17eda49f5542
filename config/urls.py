from django.contrib import admin
from django.core.exceptions import DisallowedHost
from django.http import JsonResponse
from django.urls import include, path
from django.views import defaults

from registry.apidocs import DocsView, SchemaView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/schema/", SchemaView.as_view(), name="schema"),
    path("api/docs/", DocsView.as_view(url_name="schema"), name="swagger-ui"),
    path("api/v1/", include("registry.urls")),
    path("api/v1/", include("ota.urls")),
    path("healthz", lambda request: JsonResponse({"ok": True}), name="healthz"),
    path("", include("web.urls")),
]


def handler400(request, exception=None):
    # Raised before any view runs (e.g. a Host header not in ALLOWED_HOSTS): still JSON under /api/.
    if request.path.startswith("/api/"):
        message = str(exception) if isinstance(exception, DisallowedHost) else "Bad request."
        return JsonResponse({"error": {"code": "bad_request", "message": message}}, status=400)
    return defaults.bad_request(request, exception)


def handler404(request, exception=None):
    if request.path.startswith("/api/"):
        return JsonResponse({"error": {"code": "not_found", "message": f"No such endpoint: {request.path}"}}, status=404)
    return defaults.page_not_found(request, exception)


def handler500(request):
    if request.path.startswith("/api/"):
        return JsonResponse({"error": {"code": "server_error", "message": "Internal server error."}}, status=500)
    return defaults.server_error(request)
