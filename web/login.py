"""Signing in and out of the web UI (Django's auth views, the project's template), and what
django-axes (config/settings.py, "login throttling") asks of the project: the client's address
and the page a locked-out login gets."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import AuthenticationForm
from django.shortcuts import render
from django.views.decorators.http import require_POST


class LoginView(auth_views.LoginView):
    template_name = "web/login.html"
    redirect_authenticated_user = True


logout_view = require_POST(auth_views.LogoutView.as_view(next_page="web:login"))


def client_ip(request) -> str | None:
    """The address failed logins are counted against (with the username). Behind a proxy that
    appends the client's address to X-Forwarded-For (LOGIN_TRUST_X_FORWARDED_FOR), its last entry:
    the earlier ones are whatever the client sent."""
    if settings.LOGIN_TRUST_X_FORWARDED_FOR:
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
        last = forwarded.rsplit(",", 1)[-1].strip()
        if last:
            return last
    return request.META.get("REMOTE_ADDR")


def lockout_response(request, original_response=None, credentials=None):
    """The sign-in page again, saying why the right password does not work now (429), for the web
    login and the admin's alike."""
    minutes = int(settings.AXES_COOLOFF_TIME.total_seconds() // 60)
    message = (
        f"Too many failed sign-ins for this username from your address: signing in is locked for "
        f"{minutes} minutes (each further try restarts the wait). An administrator can lift it sooner."
    )
    # LoginView checks `next` before it redirects there; the admin's own login goes back to the admin.
    next_url = "/admin/" if request.path.startswith("/admin/") else request.POST.get("next", "")
    context = {"form": AuthenticationForm(request), "locked_out": message, "next": next_url}
    return render(request, "web/login.html", context, status=settings.AXES_HTTP_RESPONSE_CODE)
