"""The hardened web side: cookie flags and HSTS (from the public URL), the Content-Security-Policy
and pages that need nothing it forbids, login throttling and lockout (django-axes), API token expiry
and last use in the UI, and the optional login for /api/schema/ and /api/docs/."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from django.utils import timezone

from registry.models import ApiToken

pytestmark = pytest.mark.django_db

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "ada-admin-password-123"


@pytest.fixture
def admin_user(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # speed only
    user = User.objects.create_user("ada-admin", password=PASSWORD, is_staff=True, is_superuser=True)
    user.groups.add(Group.objects.get_or_create(name="admin")[0])
    return user


def sign_in(client, username, password, *, path="/login/", address="127.0.0.1", **extra):
    return client.post(path, {"username": username, "password": password}, REMOTE_ADDR=address, **extra)


def settings_from_env(**env) -> dict:
    """config.settings as a fresh process reads it from these environment variables."""
    names = ["SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE", "SECURE_HSTS_SECONDS", "SESSION_COOKIE_SAMESITE",
             "API_DOCS_REQUIRE_LOGIN", "AXES_FAILURE_LIMIT"]
    code = ("import json, django; from django.conf import settings; django.setup(); "
            f"print(json.dumps({{n: getattr(settings, n) for n in {names!r}}}))")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SECURE_", "PUBLIC_URL", "COOKIE_", "LOGIN_"))}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**base, "DJANGO_SETTINGS_MODULE": "config.settings", "SECRET_KEY": "x", **env},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- cookies and HSTS ---------------------------------------------------------------------------


def test_it_makes_cookies_secure_and_sends_hsts_when_the_public_url_is_https():
    https = settings_from_env(PUBLIC_URL="https://fleet.example.com")
    assert https["SESSION_COOKIE_SECURE"] and https["CSRF_COOKIE_SECURE"]
    assert https["SECURE_HSTS_SECONDS"] == 31_536_000 and https["SESSION_COOKIE_SAMESITE"] == "Lax"
    plain = settings_from_env(PUBLIC_URL="http://127.0.0.1:8000")
    assert not plain["SESSION_COOKIE_SECURE"] and plain["SECURE_HSTS_SECONDS"] == 0
    tuned = settings_from_env(PUBLIC_URL="https://fleet.example.com", SECURE_COOKIES="false", SECURE_HSTS_SECONDS="300",
                              COOKIE_SAMESITE="Strict", API_DOCS_REQUIRE_LOGIN="true", LOGIN_FAILURE_LIMIT="3")
    assert tuned == {**tuned, "SESSION_COOKIE_SECURE": False, "SECURE_HSTS_SECONDS": 300,
                     "SESSION_COOKIE_SAMESITE": "Strict", "API_DOCS_REQUIRE_LOGIN": True, "AXES_FAILURE_LIMIT": 3}
    refused = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "SECRET_KEY": "x", "COOKIE_SAMESITE": "None"},
    )
    assert refused.returncode != 0 and "COOKIE_SAMESITE='None' is not one of: Lax, Strict" in refused.stderr


def test_it_sets_httponly_samesite_session_and_csrf_cookies(client, admin_user, settings):
    settings.SESSION_COOKIE_SECURE = settings.CSRF_COOKIE_SECURE = True  # what an https PUBLIC_URL sets
    page = client.get("/login/")
    csrf = page.cookies["csrftoken"]
    assert csrf["httponly"] and csrf["samesite"] == "Lax" and csrf["secure"]

    signed_in = sign_in(client, "ada-admin", PASSWORD)
    assert signed_in.status_code == 302
    session = signed_in.cookies["sessionid"]
    assert session["httponly"] and session["samesite"] == "Lax" and session["secure"]


def test_it_sends_hsts_only_over_https(client, settings):
    settings.SECURE_HSTS_SECONDS = 31_536_000
    assert "Strict-Transport-Security" not in client.get("/login/")
    assert client.get("/login/", secure=True)["Strict-Transport-Security"] == "max-age=31536000"
    # Behind the TLS proxy: the request is plain http, the proxy's header says https.
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    behind = client.get("/login/", HTTP_X_FORWARDED_PROTO="https")
    assert behind["Strict-Transport-Security"] == "max-age=31536000"


# --- Content-Security-Policy ---------------------------------------------------------------------

INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.I)
INLINE_HANDLER = re.compile(r"<[^>]+\son[a-z]+\s*=", re.I)
STYLE_ELEMENT = re.compile(r"<style[\s>]", re.I)


def policy_of(response) -> dict[str, list[str]]:
    header = response["Content-Security-Policy"]
    return {d.split()[0]: d.split()[1:] for d in header.split(";") if d.strip()}


def test_it_sends_a_csp_without_inline_script_and_its_pages_need_none(client, admin_user):
    client.force_login(admin_user)
    pages = ["/", "/devices/", "/rollouts/", "/rollouts/new/", "/registry/", "/audit/", "/access/",
             "/admin/", "/admin/registry/apitoken/", "/admin/auth/user/add/", "/api/docs/"]
    for url in pages:
        response = client.get(url)
        assert response.status_code == 200, url
        policy = policy_of(response)
        assert policy["script-src"] == ["'self'"] and policy["style-src"] == ["'self'"], url
        assert policy["object-src"] == ["'none'"] and policy["frame-ancestors"] == ["'none'"], url
        html = response.content.decode()
        # json_script blocks are data, not script: the browser never runs them.
        html = re.sub(r'<script id="[^"]+" type="application/json">.*?</script>', "", html, flags=re.S)
        assert not INLINE_SCRIPT.search(html), (url, INLINE_SCRIPT.search(html).group(0))
        assert not INLINE_HANDLER.search(html), (url, INLINE_HANDLER.search(html).group(0))
        assert not STYLE_ELEMENT.search(html), url
    client.logout()
    assert "script-src 'self'" in client.get("/login/")["Content-Security-Policy"]


def test_it_serves_the_swagger_ui_init_script_as_a_file(client):
    page = client.get("/api/docs/").content.decode()
    script = re.search(r'<script src="(/api/docs/\?[^"]*script=[^"]*)"', page).group(1)
    response = client.get(script.replace("&amp;", "&"))
    assert response.status_code == 200 and response["Content-Type"].startswith("application/javascript")
    assert "SwaggerUIBundle" in response.content.decode()
    assert client.get("/static/registry/swagger_ui.css").status_code == 200


# --- login throttling ----------------------------------------------------------------------------


def test_it_locks_a_username_out_from_one_address_after_the_failure_limit(client, admin_user, settings):
    settings.AXES_FAILURE_LIMIT = 5
    for _ in range(4):
        assert sign_in(client, "ada-admin", "wrong").status_code == 200  # the form again, with its error
    locked = sign_in(client, "ada-admin", "wrong")
    assert locked.status_code == 429
    right = sign_in(client, "ada-admin", PASSWORD)
    assert right.status_code == 429 and "_auth_user_id" not in client.session
    html = right.content.decode()
    assert 'id="locked-out"' in html and "locked for 15 minutes" in html and "Traceback" not in html
    # The admin's login is locked for the pair too, and answers with the same page.
    admin = sign_in(client, "ada-admin", PASSWORD, path="/admin/login/?next=/admin/")
    assert admin.status_code == 429 and 'id="locked-out"' in admin.content.decode()

    # Only that pair: the same user from another address, and others from this one, still sign in.
    other = client.__class__()
    assert sign_in(other, "ada-admin", PASSWORD, address="10.0.0.7").status_code == 302
    User.objects.create_user("bob", password="bob-password-123")
    assert sign_in(client.__class__(), "bob", "bob-password-123").status_code == 302

    call_command("axes_reset_username", "ada-admin")
    assert sign_in(client, "ada-admin", PASSWORD).status_code == 302


def test_it_counts_failures_per_forwarded_address_only_when_told_to(client, admin_user, settings):
    settings.AXES_FAILURE_LIMIT = 2
    settings.LOGIN_TRUST_X_FORWARDED_FOR = True
    # A client-sent X-Forwarded-For entry comes first; the proxy's appended one is what counts.
    for _ in range(2):
        sign_in(client, "ada-admin", "wrong", HTTP_X_FORWARDED_FOR="1.2.3.4, 198.51.100.1")
    assert sign_in(client, "ada-admin", PASSWORD, HTTP_X_FORWARDED_FOR="9.9.9.9, 198.51.100.1").status_code == 429
    assert sign_in(client, "ada-admin", PASSWORD, HTTP_X_FORWARDED_FOR="1.2.3.4, 198.51.100.2").status_code == 302
    settings.LOGIN_TRUST_X_FORWARDED_FOR = False  # then the proxy itself (REMOTE_ADDR) is the address
    client.logout()
    for _ in range(2):
        sign_in(client, "ada-admin", "wrong", address="192.0.2.9", HTTP_X_FORWARDED_FOR="198.51.100.3")
    assert sign_in(client, "ada-admin", PASSWORD, address="192.0.2.9",
                   HTTP_X_FORWARDED_FOR="198.51.100.4").status_code == 429


def test_it_resets_the_failure_count_on_a_successful_login(client, admin_user, settings):
    settings.AXES_FAILURE_LIMIT = 3
    for _ in range(2):
        sign_in(client, "ada-admin", "wrong")
    assert sign_in(client, "ada-admin", PASSWORD).status_code == 302
    client.logout()
    for _ in range(2):
        sign_in(client, "ada-admin", "wrong")
    assert sign_in(client, "ada-admin", PASSWORD).status_code == 302


# --- API tokens in the UI ------------------------------------------------------------------------


def test_it_creates_expiring_tokens_in_the_ui_and_lists_expiry_and_last_use(client, admin_user):
    client.force_login(admin_user)
    made = client.post("/access/", {"kind": "api", "api-name": "nightly", "api-scope": "read", "api-expires_in": "2w"})
    assert made.status_code == 200
    token = ApiToken.objects.get(name="nightly")
    assert timedelta(days=13, hours=23) < token.expires_at - timezone.now() <= timedelta(weeks=2)
    secret = re.search(r"data-secret>(mf_[^<]+)<", made.content.decode()).group(1)
    assert client.get("/api/v1/models/", HTTP_AUTHORIZATION=f"Bearer {secret}").status_code == 200

    for bad, message in [("99999999d", "longer than the maximum of 3650 days"), ("soon", "is not a duration")]:
        refused = client.post("/access/", {"kind": "api", "api-name": "x", "api-scope": "read", "api-expires_in": bad})
        assert refused.status_code == 400 and message in refused.content.decode()
    assert not ApiToken.objects.filter(name="x").exists()

    ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    row = re.search(r"<tr><td>nightly</td>.*?</tr>", client.get("/access/").content.decode(), re.S).group(0)
    used = timezone.localtime(ApiToken.objects.get(pk=token.pk).last_used_at)
    assert f"{used:%Y-%m-%d %H:%M}" in row and "expired" in row


# --- login for the schema and docs ---------------------------------------------------------------


def test_it_requires_a_login_for_the_schema_and_docs_when_configured(client, settings, read_token):
    assert client.get("/api/schema/").status_code == 200  # open by default
    settings.API_DOCS_REQUIRE_LOGIN = True
    schema = client.get("/api/schema/")
    assert schema.status_code == 401 and schema.json()["error"]["code"] == "not_authenticated"
    docs = client.get("/api/docs/")
    assert docs.status_code == 302 and docs["Location"] == "/login/?next=/api/docs/"
    assert client.get("/api/docs/?script=").status_code == 401

    assert client.get("/api/schema/", **read_token.headers).status_code == 200  # a token of any scope
    client.force_login(User.objects.create_user("no-group"))  # a session, whatever the role
    assert client.get("/api/schema/").status_code == 200 and client.get("/api/docs/").status_code == 200
