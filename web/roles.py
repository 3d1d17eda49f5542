"""Role checks for the web admin. The roles are Django groups (viewer, operator, admin) and
registry.auth.scopes_of turns them into the same scopes the API checks, so a browser user and a
token with the same scope can do exactly the same things. The checks run on the server for every
request; hiding a button in a template is a courtesy, never the control."""

from __future__ import annotations

from functools import wraps

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied

from ota.rollouts.catalogue import CREATE_SCOPES
from registry.auth import scopes_of


class Can:
    """What the current user may do, for templates: {% if can.operate %}…"""

    def __init__(self, user):
        self.scopes = scopes_of(user)

    @property
    def read(self) -> bool:
        return "read" in self.scopes

    @property
    def operate(self) -> bool:
        return "operator" in self.scopes

    @property
    def create_rollouts(self) -> bool:
        return bool(set(CREATE_SCOPES) & self.scopes)

    @property
    def administer(self) -> bool:
        return "admin" in self.scopes


def scope_required(scope):
    """Anonymous users go to the login page; signed-in users without the scope get 403.

    `scope` is a scope, a tuple meaning any one of them, or a callable given the view's URL
    kwargs that returns either (rollout actions: the catalogue entry's scopes)."""

    def decorator(view):
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            needed = scope(**kwargs) if callable(scope) else scope
            accepted = (needed,) if isinstance(needed, str) else tuple(needed)
            if not set(accepted) & scopes_of(request.user):
                raise PermissionDenied(f"This needs the {' or '.join(repr(s) for s in accepted)} role.")
            return view(request, *args, **kwargs)

        wrapper.required_scope = scope
        return wrapper

    return decorator
