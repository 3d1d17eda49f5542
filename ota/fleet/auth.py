"""Device credentials for the API (artifact downloads): `mfd_` bearer tokens issued at enrollment."""

from __future__ import annotations

DEVICE_SCOPES = frozenset({"device"})


def authenticate_device_token(secret: str):
    """Return a TokenPrincipal for a live (enrolled, not revoked) device token, else None."""
    from ota.models import Device, hash_secret
    from registry.auth import TokenPrincipal

    if not secret.startswith(Device.API_TOKEN_PREFIX):
        return None
    device = (
        Device.objects.filter(api_token_hash=hash_secret(secret), state=Device.State.ACTIVE)
        .only("id", "name")
        .first()
    )
    if device is None:
        return None
    return TokenPrincipal(name=device.id, scope="device", device_id=device.id, scopes=DEVICE_SCOPES)


def device_may_download(*, device_id: str, version_id: int, hardware_id: str) -> bool:
    """A device fetches only what it was directed to install: its own hardware's artifact of a
    release that some directive to it named. A leaked device token then exposes no other model."""
    from ota.models import Directive

    return Directive.objects.filter(
        device_id=device_id, version_id=version_id, device__hardware_id=hardware_id
    ).exists()
