"""Admin-only pages of the web admin: API and enrollment tokens (secret shown once), the public
signing keys, and revoking a device; operators and viewers get 403."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import Group, User

from ota.models import Device, EnrollmentToken
from registry.models import ApiToken, AuditEntry
from tests.support import web_data

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_user(db):
    user = User.objects.create_user("ada-admin", password="x")
    user.groups.add(Group.objects.get_or_create(name="admin")[0])
    return user


def test_it_creates_an_api_token_shows_its_secret_once_and_revokes_it(client, admin_user):
    client.force_login(admin_user)

    response = client.post("/access/", {"kind": "api", "api-name": "github-actions", "api-scope": "ci"})

    html = response.content.decode()
    secret = re.search(r"<code class=\"hash\" data-secret>(mf_[^<]+)</code>", html).group(1)
    token = ApiToken.objects.get(name="github-actions")
    assert token.token_hash == ApiToken.hash_secret(secret) and token.scope == "ci"
    assert response["Cache-Control"] == "no-store"
    assert secret not in client.get("/access/").content.decode()  # shown once
    assert client.get("/api/v1/models/", HTTP_AUTHORIZATION=f"Bearer {secret}").status_code == 200

    again = client.post("/access/", {"kind": "api", "api-name": "github-actions", "api-scope": "ci"})
    assert again.status_code == 400
    assert "An active token named &#x27;github-actions&#x27; already exists; revoke it first." in again.content.decode()

    client.post("/access/", {"kind": "revoke-api", "token_id": token.pk})
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert client.get("/api/v1/models/", HTTP_AUTHORIZATION=f"Bearer {secret}").status_code == 401
    assert AuditEntry.objects.filter(action="token.revoke", actor="user:ada-admin").exists()
    for bad in ("abc", "-1", "9" * 30):
        response = client.post("/access/", {"kind": "revoke-api", "token_id": bad}, follow=True)
        assert response.status_code == 200 and "No such active token." in response.content.decode()


def test_it_creates_and_revokes_enrollment_tokens_with_errors_next_to_fields(client, admin_user):
    client.force_login(admin_user)
    bad = client.post(
        "/access/", {"kind": "enroll", "enroll-max_uses": "0", "enroll-expires_in": "soon", "enroll-labels": "site"}
    )
    html = bad.content.decode()
    assert bad.status_code == 400
    assert "Ensure this value is greater than or equal to 1." in html
    assert "&#x27;soon&#x27; is not a duration; use a positive number with s, m, h, d or w" in html
    assert "label &#x27;site&#x27; must look like key=value" in html
    assert not EnrollmentToken.objects.exists()

    ok = client.post(
        "/access/",
        {"kind": "enroll", "enroll-name": "line 2", "enroll-max_uses": "25", "enroll-expires_in": "2d",
         "enroll-labels": "site=berlin, line=2"},
    )
    secret = re.search(r"data-secret>(mfe_[^<]+)</code>", ok.content.decode()).group(1)
    token = EnrollmentToken.objects.get()
    assert (token.max_uses, token.default_labels, token.name) == (25, {"site": "berlin", "line": "2"}, "line 2")
    assert token.prefix == secret[:10] and token.expires_at is not None

    client.post("/access/", {"kind": "revoke-enroll", "token_id": token.pk})
    token.refresh_from_db()
    assert token.revoked_at is not None


def test_it_shows_the_public_signing_keys(client, admin_user):
    from registry.keys import public_keys

    client.force_login(admin_user)
    html = client.get("/access/").content.decode()
    for key in public_keys():
        assert key.keyid in html
        assert key.public_key_pem.strip().splitlines()[1] in html
    assert "PRIVATE KEY" not in html


def test_it_lets_an_admin_revoke_a_device(client, admin_user, operator):
    web_data.hardware("rpi5")
    Device.objects.create(id="cam-1", hardware_id="rpi5", mqtt_username="cam-1", api_token_hash="f" * 64)
    client.force_login(operator)
    assert 'id="revoke-device"' not in client.get("/devices/cam-1/").content.decode()
    assert client.post("/devices/cam-1/revoke/").status_code == 403

    client.force_login(admin_user)
    assert 'id="revoke-device"' in client.get("/devices/cam-1/").content.decode()
    response = client.post("/devices/cam-1/revoke/", follow=True)

    device = Device.objects.get(pk="cam-1")
    assert device.state == "revoked" and device.revoked_by == "user:ada-admin" and device.api_token_hash is None
    assert "Device cam-1 revoked" in response.content.decode()


def test_it_links_the_django_admin_only_for_staff_admins(client, admin_user):
    client.force_login(admin_user)
    html = client.get("/").content.decode()
    assert 'href="/access/"' in html and 'href="/admin/"' not in html  # not staff: /admin/ would refuse it
    admin_user.is_staff = True
    admin_user.save()
    assert 'href="/admin/"' in client.get("/").content.decode()


@pytest.mark.parametrize("who", ["operator", "viewer"])
def test_it_refuses_the_access_page_to_non_admins(client, request, who):
    client.force_login(request.getfixturevalue(who))
    assert client.get("/access/").status_code == 403
    assert client.post("/access/", {"kind": "api", "api-name": "x", "api-scope": "admin"}).status_code == 403
    assert not ApiToken.objects.filter(name="x").exists()
    assert 'href="/access/"' not in client.get("/").content.decode()


def _post_urls():
    """Every web URL a POST can change something through, read from the URLconf itself, so a new
    action view is covered the day it is added: (name, view kwargs)."""
    from web.urls import urlpatterns
    from ota.rollouts.catalogue import BY_NAME

    sample = {"device_id": "dev-0000", "name": "detector", "version": "2.0.0", "pk": None}
    out = []
    for pattern in urlpatterns:
        scope = getattr(pattern.callback, "required_scope", None)
        if scope in (None, "read") or pattern.name == "rollout_preview":  # login/logout; GET-only pages
            continue
        params = list(pattern.pattern.converters)
        if "action" in params:
            out += [(pattern.name, {**{p: sample[p] for p in params if p != "action"}, "action": a})
                    for a in BY_NAME]
        else:
            out.append((pattern.name, {p: sample[p] for p in params}))
    return out


POST_URLS = _post_urls()


@pytest.fixture
def targets(db):
    from ota.rollouts.create import rollout_create
    from tests.support.rollout_data import make_devices

    web_data.released("detector", "2.0.0", hardware_ids=("jetson-orin",))
    make_devices(2, hardware="jetson-orin", labels={"site": "berlin"})
    rollout = rollout_create(model="detector", version="2.0.0", target={"labels": {"site": "berlin"}},
                                     waves=[{"percent": 100}], actor="user:x")
    return rollout


def _url(name, kwargs, rollout):
    from django.urls import reverse

    return reverse(f"web:{name}", kwargs={k: (rollout.pk if k == "pk" else v) for k, v in kwargs.items()})


def test_it_covers_every_action_url_of_the_web_admin():
    names = {name for name, _ in POST_URLS}
    assert names == {
        "device_revoke", "alias_move", "version_release", "version_deprecate", "version_revoke", "access",
        "rollout_new", "rollout_action",
    }
    from ota.rollouts.catalogue import ACTIONS

    assert len(POST_URLS) == 7 + len(ACTIONS) == 7 + 9  # one per rollout action (start ... unschedule)


@pytest.mark.parametrize("name, kwargs", POST_URLS, ids=[f"{n}-{k.get('action', '')}".rstrip("-") for n, k in POST_URLS])
def test_it_answers_403_to_a_viewer_post_on_every_action_url(viewer, targets, name, kwargs):
    from django.test import Client

    browser = Client(enforce_csrf_checks=True)
    browser.force_login(viewer)
    browser.get("/")
    token = browser.cookies["csrftoken"].value

    response = browser.post(_url(name, kwargs, targets), {"csrfmiddlewaretoken": token, "kind": "api", "name": "x"})

    assert response.status_code == 403, response.content[:300]
    assert "role" in response.content.decode()  # refused by the role check, not by CSRF
    targets.refresh_from_db()
    assert targets.state == "created"
    assert Device.objects.get(pk="dev-0000").state == "active"
    assert not AuditEntry.objects.filter(actor=f"user:{viewer.username}").exists()


@pytest.mark.parametrize("name, kwargs", POST_URLS, ids=[f"{n}-{k.get('action', '')}".rstrip("-") for n, k in POST_URLS])
def test_it_refuses_every_action_post_without_a_csrf_token(admin_user, targets, name, kwargs):
    from django.test import Client

    browser = Client(enforce_csrf_checks=True)
    browser.force_login(admin_user)  # allowed to do everything: only the missing token stops it

    response = browser.post(_url(name, kwargs, targets), {"kind": "api", "name": "x"})

    assert response.status_code == 403
    assert "CSRF" in response.content.decode()
    targets.refresh_from_db()
    assert targets.state == "created"
    assert Device.objects.get(pk="dev-0000").state == "active"


def test_it_puts_a_csrf_token_in_every_post_form_and_on_htmx_requests():
    from pathlib import Path

    templates = Path(__file__).resolve().parents[1] / "web" / "templates"
    for path in templates.rglob("*.html"):
        html = path.read_text()
        for form in re.findall(r"<form\b[^>]*method=\"post\"[^>]*>(.*?)</form>", html, re.DOTALL | re.IGNORECASE):
            assert "{% csrf_token %}" in form, f"{path.name}: a POST form without {{% csrf_token %}}"
    base = (templates / "web" / "base.html").read_text()
    assert "hx-headers='{\"X-CSRFToken\": \"{{ csrf_token }}\"}'" in base  # hx-post buttons send it too
