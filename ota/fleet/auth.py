"""Device credentials for the API (artifact downloads): `mfd_` bearer tokens issued at enrollment.

DeviceTokenAuthentication is listed in settings before registry's BearerTokenAuthentication,
so the registry app never needs to know devices exist: it only asks the principal whether it
may download an artifact (TokenPrincipal's documented `may_download`).
"""

from __future__ import annotations

from dataclasses import dataclass

from rest_framework import authentication, exceptions

from ota.models import Device, Directive, hash_secret
from registry.auth import SCOPE_GRANTS, TokenPrincipal, bearer_secret


@dataclass
class DevicePrincipal(TokenPrincipal):
    def may_download(self, *, version_id: int, hardware_id: str | None = None) -> bool:
        return device_may_download(device_id=self.device_id, version_id=version_id, hardware_id=hardware_id)


def authenticate_device_token(secret: str) -> DevicePrincipal | None:
    """The principal of a live (enrolled, not revoked) device token, else None."""
    if not secret.startswith(Device.API_TOKEN_PREFIX):
        return None
    device = (
        Device.objects.filter(api_token_hash=hash_secret(secret), state=Device.State.ACTIVE)
        .only("id", "name")
        .first()
    )
    if device is None:
        return None
    return DevicePrincipal(name=device.id, scope="device", device_id=device.id, scopes=SCOPE_GRANTS["device"])


def device_may_download(*, device_id: str, version_id: int, hardware_id: str | None = None) -> bool:
    """A device fetches only what it was directed to install: the signed manifest of a release
    that some directive to it named (hardware_id None) and its own hardware's artifact of it. A
    leaked device token then exposes no other model, not even its manifest."""
    directed = Directive.objects.filter(device_id=device_id, version_id=version_id)
    if hardware_id is not None:
        directed = directed.filter(device__hardware_id=hardware_id)
    return directed.exists()


class DeviceTokenAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer mfd_...`; any other bearer token is left to the next class."""

    def authenticate(self, request):
        secret = bearer_secret(request)
        if secret is None or not secret.startswith(Device.API_TOKEN_PREFIX):
            return None
        principal = authenticate_device_token(secret)
        if principal is None:
            raise exceptions.AuthenticationFailed("Invalid or revoked token.")
        return principal, None

    def authenticate_header(self, request):
        return "Bearer"
