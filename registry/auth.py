"""Bearer-token and session authentication mapped onto scopes.

Scopes: read (GET anything), ci (registry writes; create and start rollouts), operator
(rollout actions, alias moves), admin (everything). Browser users get scopes from their
Django group (viewer, operator, admin); superusers are admins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.utils import timezone
from rest_framework import authentication, exceptions, permissions

from registry.models import ApiToken

SCOPE_GRANTS: dict[str, frozenset[str]] = {
    "read": frozenset({"read"}),
    "ci": frozenset({"read", "ci"}),
    "operator": frozenset({"read", "operator"}),
    "admin": frozenset({"read", "ci", "operator", "admin"}),
    # Devices (tokens authenticated by ota.fleet.auth, an authentication class listed before this
    # app's in settings) may only fetch artifacts and release manifests.
    "device": frozenset({"device"}),
}
ROLE_GROUPS = ("admin", "operator", "viewer")


@dataclass
class TokenPrincipal:
    """The caller behind a bearer token. Quacks enough like a user for DRF and the audit log.

    A principal may narrow what it downloads by defining `may_download(*, version_id,
    hardware_id=None) -> bool`; the artifact download view (with the hardware) and the manifest
    view (hardware None) ask it when present (device principals, defined by the ota app, do).
    """

    name: str
    scope: str
    token_id: int | None = None
    device_id: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)

    is_authenticated = True
    is_active = True
    is_anonymous = False
    is_staff = False
    is_superuser = False

    @property
    def label(self) -> str:
        return f"device:{self.device_id}" if self.device_id else f"token:{self.name}"

    @property
    def username(self) -> str:
        return self.label


def scopes_of(user) -> frozenset[str]:
    if user is None or not getattr(user, "is_authenticated", False):
        return frozenset()
    if isinstance(user, TokenPrincipal):
        return user.scopes
    if user.is_superuser:
        return SCOPE_GRANTS["admin"]
    groups = set(user.groups.values_list("name", flat=True))
    if "admin" in groups:
        return SCOPE_GRANTS["admin"]
    if "operator" in groups:
        # Operators in the UI may also create rollouts, which the API gives the ci scope.
        return SCOPE_GRANTS["operator"] | {"ci"}
    if "viewer" in groups:
        return SCOPE_GRANTS["read"]
    return frozenset()


def actor_label(user) -> str:
    if isinstance(user, TokenPrincipal):
        return user.label
    if user is not None and getattr(user, "is_authenticated", False):
        return f"user:{user.get_username()}"
    return "anonymous"


def bearer_secret(request) -> str | None:
    """The secret of an `Authorization: Bearer <secret>` header; None for no or another scheme."""
    header = authentication.get_authorization_header(request).decode("latin-1")
    if not header:
        return None
    parts = header.split()
    if parts[0].lower() != "bearer":
        return None
    if len(parts) != 2:
        raise exceptions.AuthenticationFailed("Authorization header must be 'Bearer <token>'.")
    return parts[1]


class BearerTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        secret = bearer_secret(request)
        if secret is None:
            return None
        token = ApiToken.objects.filter(token_hash=ApiToken.hash_secret(secret), revoked_at__isnull=True).first()
        if token is None:
            raise exceptions.AuthenticationFailed("Invalid or revoked token.")
        now = timezone.now()
        if token.is_expired(now):
            # Its own code, so a CI job can say "renew the token" instead of "wrong token".
            raise exceptions.AuthenticationFailed(
                f"Token '{token.name}' expired at {token.expires_at:%Y-%m-%d %H:%M:%S}Z; create a new one.",
                code="token_expired",
            )
        # Imported here: this module loads while DRF reads its settings, from registry.errors'
        # import of rest_framework, and registry.tokens needs registry.errors complete.
        from registry.tokens import token_record_use

        token_record_use(token=token, now=now)
        principal = TokenPrincipal(
            name=token.name, scope=token.scope, token_id=token.pk, scopes=SCOPE_GRANTS[token.scope]
        )
        return principal, token

    def authenticate_header(self, request):
        return self.keyword


class HasScope(permissions.BasePermission):
    """Safe methods need `read`; writes need the view's `write_scope` (default admin).

    A view may set `required_scopes = {"action_name": "operator"}` for finer control, keyed by
    DRF action or HTTP method. Any scope setting may also be a tuple, meaning "any one of these".
    """

    def has_permission(self, request, view) -> bool:
        needed = required_scope(request, view)
        if needed is None:
            return True
        user = request.user
        if user is None or not getattr(user, "is_authenticated", False):
            raise exceptions.NotAuthenticated("Authentication required: send 'Authorization: Bearer <token>'.")
        accepted = (needed,) if isinstance(needed, str) else tuple(needed)
        if not scopes_of(user) & set(accepted):
            have = ", ".join(sorted(scopes_of(user))) or "none"
            want = " or ".join(f"'{scope}'" for scope in accepted)
            raise exceptions.PermissionDenied(f"This action needs the {want} scope; you have: {have}.")
        return True


def required_scope(request, view) -> str | tuple[str, ...] | None:
    overrides = getattr(view, "required_scopes", {})
    action = getattr(view, "action", None)
    if action and action in overrides:
        return overrides[action]
    if request.method in overrides:
        return overrides[request.method]
    if request.method in permissions.SAFE_METHODS:
        return getattr(view, "read_scope", "read")
    return getattr(view, "write_scope", "admin")
