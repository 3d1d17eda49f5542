"""API tokens: creating one (only a hash of its secret is stored) and revoking them."""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from registry.audit import audit_record
from registry.errors import ApiError, Conflict, not_found
from registry.models import ApiToken


def token_create(*, name: str, scope: str, actor: str) -> tuple[ApiToken, str]:
    """Returns the token row and its secret; only a hash of the secret is stored."""
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
    with transaction.atomic():
        token = ApiToken.objects.create(
            name=name,
            scope=scope,
            prefix=secret[:8],
            token_hash=ApiToken.hash_secret(secret),
            created_by=actor,
        )
        audit_record(actor=actor, action="token.create", obj=token, detail={"name": name, "scope": scope})
    return token, secret


def tokens_revoke(*, tokens, actor: str) -> int:
    """Revoke the still-active tokens among `tokens` (a queryset); returns how many."""
    count = 0
    with transaction.atomic():
        now = timezone.now()
        for token in tokens.select_for_update().filter(revoked_at__isnull=True):
            token.revoked_at = now
            token.save(update_fields=["revoked_at"])
            audit_record(actor=actor, action="token.revoke", obj=token, detail={"name": token.name})
            count += 1
    return count


def token_revoke(*, name: str, actor: str) -> int:
    count = tokens_revoke(tokens=ApiToken.objects.filter(name=name), actor=actor)
    if not count:
        raise not_found(f"No active token named '{name}'.", "token_not_found")
    return count
