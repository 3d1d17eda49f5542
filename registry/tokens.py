"""API tokens: creating one (only a hash of its secret is stored, with an optional expiry),
recording its use, and revoking them."""

from __future__ import annotations

from datetime import timedelta

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from registry.audit import audit_record, audit_values
from registry.errors import ApiError, Conflict, not_found
from registry.limits import MAX_DURATION
from registry.models import ApiToken

# A token's last use is written at most this often: authentication reads the token on every
# request but writes only when the stored time is older than this.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def token_create(
    *, name: str, scope: str, actor: str, expires_in: timedelta | None = None
) -> tuple[ApiToken, str]:
    """Returns the token row and its secret; only a hash of the secret is stored. `expires_in`
    (from registry.limits.parse_duration at every entry): the token stops working that long from
    now; None: never."""
    if expires_in is not None and not timedelta(0) < expires_in <= MAX_DURATION:
        raise ApiError(
            f"expires_in must be positive and at most {MAX_DURATION.days} days.", code="invalid_expires_in"
        )
    scopes = [choice.value for choice in ApiToken.Scope]
    if scope not in scopes:
        raise ApiError(f"scope must be one of {', '.join(scopes)}; got {scope!r}.", code="invalid_scope")
    if not name or len(name) > 100:
        raise ApiError("A token needs a name of 1-100 characters.", code="invalid_name")
    if ApiToken.objects.filter(name=name, revoked_at__isnull=True).exists():
        raise Conflict(
            f"An active token named '{name}' already exists; revoke it first.", code="token_exists"
        )
    secret = ApiToken.new_secret()
    now = timezone.now()
    with transaction.atomic():
        token = ApiToken.objects.create(
            name=name,
            scope=scope,
            prefix=secret[:8],
            token_hash=ApiToken.hash_secret(secret),
            created_by=actor,
            created_at=now,
            expires_at=now + expires_in if expires_in is not None else None,
        )
        audit_record(
            actor=actor, action="token.create", obj=token,
            detail={"name": name, "scope": scope,
                    "expires_at": token.expires_at.isoformat() if token.expires_at else None},
        )
    return token, secret


def token_record_use(*, token: ApiToken, now=None) -> bool:
    """Note that `token` was just used, at most once per LAST_USED_RESOLUTION: no query at all when
    the loaded row says it was recorded within it, else one conditional UPDATE, so that of many
    requests racing past that check only one writes. True when this call wrote."""
    now = now or timezone.now()
    stale = now - LAST_USED_RESOLUTION
    if token.last_used_at is not None and token.last_used_at > stale:
        return False
    written = (
        ApiToken.objects.filter(pk=token.pk)
        .filter(Q(last_used_at__isnull=True) | Q(last_used_at__lte=stale))
        .update(last_used_at=now)
    )
    if written:
        token.last_used_at = now
    return bool(written)


def tokens_revoke(*, tokens, actor: str) -> int:
    """Revoke the still-active tokens among `tokens` (a queryset); returns how many."""
    count = 0
    with transaction.atomic():
        now = timezone.now()
        for token in tokens.select_for_update().filter(revoked_at__isnull=True):
            before = audit_values(token, ["revoked_at"])
            token.revoked_at = now
            token.save(update_fields=["revoked_at"])
            audit_record(actor=actor, action="token.revoke", obj=token, detail={"name": token.name}, before=before)
            count += 1
    return count


def token_revoke(*, name: str, actor: str) -> int:
    count = tokens_revoke(tokens=ApiToken.objects.filter(name=name), actor=actor)
    if not count:
        raise not_found(f"No active token named '{name}'.", "token_not_found")
    return count
