"""The OpenAPI schema (/api/schema/) and the Swagger UI (/api/docs/), open to anyone or, with
API_DOCS_REQUIRE_LOGIN, only to a signed-in user or a bearer token of any scope.

The Swagger UI is drf-spectacular's split view: its init script is a separate response rather than
inline, and its page (registry/templates/registry/swagger_ui.html) links a stylesheet instead of
an inline <style>, so the page runs under the Content-Security-Policy without 'unsafe-inline'."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView
from rest_framework import exceptions, permissions
from rest_framework.renderers import JSONRenderer


class DocsAccess(permissions.BasePermission):
    """Everyone, unless API_DOCS_REQUIRE_LOGIN: then any authenticated caller, whatever its scope."""

    def has_permission(self, request, view) -> bool:
        if not settings.API_DOCS_REQUIRE_LOGIN:
            return True
        if request.user is None or not getattr(request.user, "is_authenticated", False):
            raise exceptions.NotAuthenticated(
                "The API schema and docs need a login: sign in, or send 'Authorization: Bearer <token>'."
            )
        return True


class SchemaView(SpectacularAPIView):
    permission_classes = [DocsAccess]

    def handle_exception(self, exc):
        # Errors as the API's JSON, not as an OpenAPI document's YAML.
        response = super().handle_exception(exc)
        self.request.accepted_renderer, self.request.accepted_media_type = JSONRenderer(), "application/json"
        return response


class DocsView(SpectacularSwaggerSplitView):
    permission_classes = [DocsAccess]
    template_name = "registry/swagger_ui.html"

    def handle_exception(self, exc):
        # A browser without a session goes to the login page and comes back, not to a JSON 401.
        if isinstance(exc, exceptions.NotAuthenticated) and self.request.GET.get("script") is None:
            return redirect_to_login(self.request.get_full_path())
        return super().handle_exception(exc)
