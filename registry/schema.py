"""OpenAPI description of the bearer-token scheme (imported from RegistryConfig.ready)."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class BearerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "registry.auth.BearerTokenAuthentication"
    name = "bearerToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "`Authorization: Bearer <token>`; create one with `manage.py tokens create`. "
            "Scopes: read, ci, operator, admin (devices: device).",
        }
