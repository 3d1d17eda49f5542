"""Device credentials for the API (artifact downloads). Devices arrive with the rollout issue."""

from __future__ import annotations


def authenticate_device_token(secret: str):
    """Return a TokenPrincipal for a live device token, else None."""
    return None
