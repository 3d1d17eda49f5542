"""Role checks for the web admin. The roles are Django groups (viewer, operator, admin) and
registry.auth.scopes_of turns them into the same scopes the API checks, so a browser user and a
token with the same scope can do exactly the same things. The checks run on the server for every
request; hiding a button in a template is a courtesy, never the control."""

from __future__ import annotations

from functools import wraps

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied

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
        return bool({"ci", "operator"} & self.scopes)

    @property
    def administer(self) -> bool:
        return "admin" in self.scopes


def scope_required(scope: str):
    """Anonymous users go to the login page; signed-in users without the scope get 403."""

    def decorator(view):
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            if scope not in scopes_of(request.user):
                raise PermissionDenied(f"This needs the '{scope}' role.")
            return view(request, *args, **kwargs)

        wrapper.required_scope = scope
        return wrapper

    return decorator
