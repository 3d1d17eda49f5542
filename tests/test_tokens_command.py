"""`manage.py tokens create/list/revoke`: the secret is printed once and works as a bearer token."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from registry.models import ApiToken

pytestmark = pytest.mark.django_db


def create(capsys, name: str, scope: str) -> str:
    call_command("tokens", "create", "--name", name, "--scope", scope)
    return capsys.readouterr().out.strip()


def test_it_prints_a_secret_that_authenticates_with_its_scope(capsys, client):
    secret = create(capsys, "github-actions", "ci")

    assert secret.startswith("mf_")
    token = ApiToken.objects.get(name="github-actions")
    assert (
        token.scope == "ci"
        and token.token_hash == ApiToken.hash_secret(secret)
        and secret not in token.token_hash
    )
    auth = {"HTTP_AUTHORIZATION": f"Bearer {secret}"}
    assert client.get("/api/v1/models/", **auth).status_code == 200
    created = client.post("/api/v1/models/", {"name": "m"}, content_type="application/json", **auth)
    assert created.status_code == 201
    assert client.post("/api/v1/models/m/versions/1/revoke", **auth).status_code == 403  # admin only


def test_it_lists_tokens_without_secrets(capsys):
    secret = create(capsys, "dashboard", "read")
    call_command("tokens", "list")
    out = capsys.readouterr().out
    assert "dashboard" in out and "read" in out and secret[:8] in out and secret not in out


def test_it_revokes_by_name_and_the_token_stops_working(capsys, client):
    secret = create(capsys, "old-ci", "ci")
    call_command("tokens", "revoke", "old-ci")
    assert "revoked 1 token(s)" in capsys.readouterr().out

    response = client.get("/api/v1/models/", HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert response.status_code == 401
    call_command("tokens", "list")
    assert "old-ci" not in capsys.readouterr().out
    call_command("tokens", "list", "--all")
    assert "old-ci" in capsys.readouterr().out


def test_it_refuses_unknown_names_scopes_and_duplicates(capsys):
    with pytest.raises(CommandError, match="No active token named 'ghost'"):
        call_command("tokens", "revoke", "ghost")
    with pytest.raises(CommandError, match="invalid choice: 'root'"):
        call_command("tokens", "create", "--name", "x", "--scope", "root")
    create(capsys, "dup", "read")
    with pytest.raises(CommandError, match="active token named 'dup' already exists"):
        call_command("tokens", "create", "--name", "dup", "--scope", "read")


def test_it_creates_expiring_tokens_and_lists_expiry_and_last_use(capsys, client):
    call_command("tokens", "create", "--name", "quarterly", "--scope", "read", "--expires-in", "90d")
    captured = capsys.readouterr()
    secret = captured.out.strip()
    token = ApiToken.objects.get(name="quarterly")
    assert timedelta(days=89, hours=23) < token.expires_at - timezone.now() <= timedelta(days=90)
    assert f"expires {token.expires_at:%Y-%m-%d %H:%M:%S}" in captured.err
    client.get("/api/v1/models/", HTTP_AUTHORIZATION=f"Bearer {secret}")
    create(capsys, "forever", "read")

    call_command("tokens", "list")
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    used = ApiToken.objects.get(name="quarterly").last_used_at
    assert "EXPIRES" in lines["NAME"] and "LAST USED" in lines["NAME"]
    assert f"{token.expires_at:%Y-%m-%d %H:%M:%S}" in lines["quarterly"]
    assert f"{used:%Y-%m-%d %H:%M:%S}" in lines["quarterly"]
    assert lines["forever"].split()[5:7] == ["-", "-"]  # never expires, never used

    ApiToken.objects.filter(name="quarterly").update(expires_at=timezone.now() - timedelta(hours=1))
    call_command("tokens", "list")
    assert "(expired)" in capsys.readouterr().out
    assert client.get("/api/v1/models/", HTTP_AUTHORIZATION=f"Bearer {secret}").json()["error"]["code"] == "token_expired"


@pytest.mark.parametrize("text, message", [
    ("99999999d", "longer than the maximum of 3650 days"),
    ("0d", "is not a duration"),
    ("90 days", "is not a duration"),
])
def test_it_refuses_bad_expiry_durations(text, message):
    with pytest.raises(CommandError, match=f"--expires-in: .*{message}"):
        call_command("tokens", "create", "--name", "x", "--scope", "read", "--expires-in", text)
    assert not ApiToken.objects.exists()
