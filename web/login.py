"""Signing in and out of the web UI (Django's auth views, the project's template)."""

from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.views.decorators.http import require_POST


class LoginView(auth_views.LoginView):
    template_name = "web/login.html"
    redirect_authenticated_user = True


logout_view = require_POST(auth_views.LogoutView.as_view(next_page="web:login"))
