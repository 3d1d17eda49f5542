"""The access page (admin): API tokens through registry.tokens, enrollment tokens through
ota.fleet.enrollment, the public signing keys from registry.keys."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.http import HttpResponseBadRequest
from django.shortcuts import redirect

from ota.fleet.enrollment import enrollment_token_create, enrollment_token_revoke
from ota.models import EnrollmentToken
from registry import keys as registry_keys
from registry import tokens as registry_tokens
from registry.auth import actor_label
from registry.errors import ApiError
from registry.models import ApiToken, ReleaseKey
from web.forms import ApiTokenForm, EnrollmentTokenForm
from web.pages import page
from web.roles import scope_required


@scope_required("admin")
def access(request):
    """API tokens, enrollment tokens and the public signing keys. A new secret is shown once, in
    this response only (never in a redirect's flash message, which would keep it in the session)."""
    api_form = ApiTokenForm(prefix="api")
    enroll_form = EnrollmentTokenForm(prefix="enroll")
    new_secret = None
    status = 200
    if request.method == "POST":
        actor = actor_label(request.user)
        kind = request.POST.get("kind")
        if kind == "api":
            api_form = ApiTokenForm(request.POST, prefix="api")
            if api_form.is_valid():
                try:
                    token, secret = registry_tokens.token_create(**api_form.cleaned_data, actor=actor)
                except ApiError as exc:
                    api_form.add_error("name", str(exc.detail))
                else:
                    new_secret = {"what": f"API token '{token.name}' ({token.scope})", "secret": secret}
                    api_form = ApiTokenForm(prefix="api")
        elif kind == "enroll":
            enroll_form = EnrollmentTokenForm(request.POST, prefix="enroll")
            if enroll_form.is_valid():
                d = enroll_form.cleaned_data
                token, secret = enrollment_token_create(
                    max_uses=d["max_uses"], expires_in=d["expires_in"], labels=d["labels"], name=d["name"],
                    created_by=actor,
                )
                new_secret = {"what": f"enrollment token {token.prefix}… ({token.max_uses} uses)", "secret": secret}
                enroll_form = EnrollmentTokenForm(prefix="enroll")
        elif kind == "revoke-api":
            raw_id = request.POST.get("token_id") or "0"
            # A non-numeric id matches no token (filter(pk="abc") would raise ValueError: a 500).
            tokens = ApiToken.objects.filter(pk=int(raw_id)) if raw_id.isdigit() else ApiToken.objects.none()
            count = registry_tokens.tokens_revoke(tokens=tokens, actor=actor)
            if count:
                messages.success(request, "API token revoked.")
            else:
                messages.error(request, "No such active token.")
            return redirect("web:access")
        elif kind == "revoke-enroll":
            try:
                enrollment_token_revoke(token_id=int(request.POST.get("token_id") or 0), actor=actor)
            except (EnrollmentToken.DoesNotExist, ValueError):
                messages.error(request, "No such enrollment token.")
            else:
                messages.success(request, "Enrollment token revoked.")
            return redirect("web:access")
        else:
            return HttpResponseBadRequest("Unknown form.")
        if new_secret is None:
            status = 400
    try:
        keys = registry_keys.public_keys()
        keys_error = ""
    except ApiError as exc:
        keys, keys_error = [], str(exc.detail)
    context = {
        "api_form": api_form,
        "enroll_form": enroll_form,
        "new_secret": new_secret,
        "api_tokens": ApiToken.objects.order_by("revoked_at", "-created_at")[:200],
        "enrollment_tokens": EnrollmentToken.objects.order_by("-created_at")[:200],
        "keys": keys,
        "keys_error": keys_error,
        "registered_keys": ReleaseKey.objects.order_by("revoked_at", "-created_at")[:200],
        "release_signing": settings.RELEASE_SIGNING,
        "release_threshold": registry_keys.release_threshold(),
    }
    response = page(request, "web/access.html", context, section="access", status=status)
    if new_secret:
        response["Cache-Control"] = "no-store"
    return response
