"""Rendering a page of the web UI: every view renders through page(), which adds what the user
may do (web.roles.Can) and their role for the header."""

from __future__ import annotations

from django.shortcuts import render

from web.roles import Can


def role_of(scopes) -> str:
    if "admin" in scopes:
        return "admin"
    if "operator" in scopes:
        return "operator"
    return "viewer" if "read" in scopes else "no role"


def page(request, template, context=None, *, section="", status=200):
    can = Can(request.user)
    context = {**(context or {}), "can": can, "role": role_of(can.scopes), "section": section}
    return render(request, template, context, status=status)


def is_htmx(request) -> bool:
    return request.headers.get("HX-Request") == "true"
