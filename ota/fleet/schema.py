"""OpenAPI description of the device-token scheme (imported from OtaConfig.ready)."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class DeviceTokenScheme(OpenApiAuthenticationExtension):
    target_class = "ota.fleet.auth.DeviceTokenAuthentication"
    name = "deviceToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "`Authorization: Bearer mfd_...`: a device's API token, issued at enrollment; "
            "it may fetch only the artifacts and manifests its directives name.",
        }
