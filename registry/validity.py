"""Whether a release can still be installed: the one rule rollout create, start and revert (and
the version page's expiry warning) share, so the server never directs a device to a release
every agent would refuse (agent.admission: a revoked release is withdrawn, a manifest past its
`expires` is RELEASE_EXPIRED).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.utils import timezone

from registry.errors import Conflict
from registry.models import ModelVersion

EXPIRY_WARNING = timedelta(days=30)  # the version page warns this long before a release expires


def release_refusal(version: ModelVersion, *, now: datetime | None = None) -> tuple[str, str] | None:
    """(code, message) when `version` may not be sent to devices now (revoked or expired), else None.
    Drafts are left to the callers' own "only a released version" check."""
    now = now or timezone.now()
    if version.state == ModelVersion.State.REVOKED:
        return "release_revoked", f"{version} is revoked; no device may be sent to it"
    if version.expires_at is not None and version.expires_at <= now:
        return (
            "release_expired",
            f"{version}'s signed manifest expired at {version.expires_at:%Y-%m-%d %H:%M:%S}Z; "
            "every agent would refuse it (RELEASE_EXPIRED): release a new version instead",
        )
    return None


def release_require_installable(version: ModelVersion, *, now: datetime | None = None) -> None:
    """Refuse (409 release_revoked / release_expired) a release no agent would install."""
    refused = release_refusal(version, now=now)
    if refused is not None:
        code, message = refused
        raise Conflict(message, code=code, release=str(version))


def expires_soon(version: ModelVersion, *, now: datetime | None = None) -> bool:
    """True for a release that is still valid but expires within EXPIRY_WARNING."""
    now = now or timezone.now()
    return version.expires_at is not None and now < version.expires_at <= now + EXPIRY_WARNING
