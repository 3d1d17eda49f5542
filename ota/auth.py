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
