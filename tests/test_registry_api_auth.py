"""API auth and errors: bearer tokens with scopes, 401 vs 403, and JSON (never HTML) errors."""

from __future__ import annotations

import json
from datetime import timedelta
from unittest import mock

import pytest
from django.utils import timezone

from registry import views
from registry.models import ApiToken

pytestmark = pytest.mark.django_db


def test_it_answers_401_without_a_token(client):
    response = client.get("/api/v1/models/")
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "not_authenticated"
    assert "Bearer" in response.json()["error"]["message"]


def test_it_answers_401_for_an_unknown_or_malformed_token(client):
    assert client.get("/api/v1/models/", HTTP_AUTHORIZATION="Bearer mf_nope").status_code == 401
    malformed = client.get("/api/v1/models/", HTTP_AUTHORIZATION="Bearer two parts")
    assert malformed.status_code == 401 and "Bearer <token>" in malformed.json()["error"]["message"]


def test_it_answers_401_for_a_revoked_token(client, ci_token):
    assert client.get("/api/v1/models/", **ci_token.headers).status_code == 200
    ApiToken.objects.update(revoked_at=timezone.now())
    response = client.get("/api/v1/models/", **ci_token.headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "authentication_failed"


def test_it_answers_403_for_the_wrong_scope(client, read_token, ci_token):
    response = client.post(
        "/api/v1/models/", {"name": "m"}, content_type="application/json", **read_token.headers
    )
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "permission_denied" and "'ci'" in error["message"] and "read" in error["message"]
    hardware = client.post(
        "/api/v1/hardware/",
        {"id": "rpi5", "max_artifact_bytes": 10},
        content_type="application/json",
        **read_token.headers,
    )
    assert hardware.status_code == 403
    assert client.post("/api/v1/models/m/versions/1/revoke", **ci_token.headers).status_code == 403


def test_it_answers_json_404s(client, read_token):
    unknown_route = client.get("/api/v1/no-such-thing/", **read_token.headers)
    assert unknown_route.status_code == 404
    assert unknown_route["Content-Type"] == "application/json"
    assert unknown_route.json()["error"]["code"] == "not_found"
    unknown_model = client.get("/api/v1/models/ghost/", **read_token.headers)
    assert unknown_model.status_code == 404
    assert unknown_model.json()["error"] == {"code": "model_not_found", "message": "No model named 'ghost'."}


def test_it_answers_json_for_an_unexpected_server_error(client, read_token):
    with mock.patch.object(views, "model_get", autospec=True, side_effect=RuntimeError("boom")):
        response = client.get("/api/v1/models/anything/", **read_token.headers)
    assert response.status_code == 500
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "server_error"
    assert "boom" not in response.content.decode()


def test_it_answers_json_for_bad_request_bodies(client, ci_token):
    broken = client.post("/api/v1/models/", "{not json", content_type="application/json", **ci_token.headers)
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "parse_error"
    invalid = client.post(
        "/api/v1/models/", {"name": "has spaces"}, content_type="application/json", **ci_token.headers
    )
    assert invalid.status_code == 400
    assert invalid.json()["error"]["code"] == "invalid" and "name" in invalid.json()["error"]["fields"]


def test_it_answers_json_for_a_host_not_in_allowed_hosts(client, ci_token):
    response = client.get("/api/v1/models/", HTTP_HOST="evil.example", **ci_token.headers)
    assert response.status_code == 400 and response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "bad_request"
    assert "evil.example" in response.json()["error"]["message"] and "ALLOWED_HOSTS" in response.json()["error"]["message"]
    assert client.get("/admin/", HTTP_HOST="evil.example")["Content-Type"].startswith("text/html")


def test_it_answers_json_for_oversized_bodies_and_numbers(client, ci_token, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    huge = client.post(
        "/api/v1/models/", json.dumps({"name": "m", "description": "x" * 20_000}),
        content_type="application/json", **ci_token.headers,
    )
    assert huge.status_code == 413, huge.content
    assert huge.json()["error"]["code"] == "request_too_large" and huge.json()["error"]["limit"] == 10_000
    assert "10000-byte limit" in huge.json()["error"]["message"]
    too_big = client.post(
        "/api/v1/hardware/", {"id": "x", "max_artifact_bytes": 10**30}, content_type="application/json",
        **ci_token.headers,
    )
    assert too_big.status_code == 400, too_big.content
    assert "max_artifact_bytes" in too_big.json()["error"]["fields"]
    unsupported = client.post("/api/v1/models/", "name=m", content_type="text/plain", **ci_token.headers)
    assert unsupported.status_code == 415 and unsupported.json()["error"]["code"] == "unsupported_media_type"
    not_allowed = client.delete("/api/v1/models/", **ci_token.headers)
    assert not_allowed.status_code == 405 and not_allowed.json()["error"]["code"] == "method_not_allowed"


def test_it_serves_the_openapi_schema_and_swagger_ui_without_a_cdn(client):
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for path in (
        "/api/v1/hardware/",
        "/api/v1/models/{name}/versions/{version}/artifacts/",
        "/api/v1/models/{name}/versions/{version}/release",
        "/api/v1/models/{name}/versions/{version}/manifest",
        "/api/v1/models/{name}/versions/{version}/artifacts/{hardware}/download",
        "/api/v1/models/{name}/aliases/{alias}",
        "/api/v1/keys/",
    ):
        assert path in paths
    assert "bearerToken" in schema.json()["components"]["securitySchemes"]
    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    html = docs.content.decode()
    assert "swagger-ui" in html and "drf_spectacular_sidecar" in html and "cdn.jsdelivr" not in html


def test_it_generates_the_registry_schema_without_warnings(capsys):
    from django.core.management import call_command

    call_command("spectacular", "--validate", "--file", "/dev/null")
    report = capsys.readouterr().err
    registry_lines = [
        line for line in report.splitlines() if "registry" in line.lower() or "VersionState" in line
    ]
    assert registry_lines == []
    assert "Schema generation summary" in report or report == ""


def test_it_answers_401_token_expired_for_an_expired_token(client, ci_token):
    ApiToken.objects.update(expires_at=timezone.now() + timedelta(minutes=5))
    assert client.get("/api/v1/models/", **ci_token.headers).status_code == 200
    ApiToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    response = client.get("/api/v1/models/", **ci_token.headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "token_expired" and "Token 'test-ci' expired at" in error["message"]


def test_it_records_a_tokens_last_use_at_most_once_a_minute(client, ci_token):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    assert ApiToken.objects.get().last_used_at is None
    client.get("/api/v1/models/", **ci_token.headers)
    first = ApiToken.objects.get().last_used_at
    assert first is not None and timezone.now() - first < timedelta(seconds=30)

    with CaptureQueriesContext(connection) as queries:
        assert client.get("/api/v1/models/", **ci_token.headers).status_code == 200
    assert not [q for q in queries.captured_queries if q["sql"].startswith("UPDATE")]
    assert ApiToken.objects.get().last_used_at == first

    ApiToken.objects.update(last_used_at=first - timedelta(seconds=61))
    client.get("/api/v1/models/", **ci_token.headers)
    assert ApiToken.objects.get().last_used_at > first


def test_it_writes_a_last_use_once_when_requests_race_past_the_loaded_time(ci_token):
    from registry.tokens import token_record_use

    stale = timezone.now() - timedelta(minutes=5)
    ApiToken.objects.update(last_used_at=stale)
    # Two requests that both loaded the stale row: the conditional UPDATE lets only one write.
    first, second = ApiToken.objects.get(), ApiToken.objects.get()
    assert token_record_use(token=first) is True
    assert token_record_use(token=second) is False


def test_it_lists_tokens_with_expiry_and_last_use_to_admins_only(client, admin_token, read_token):
    from registry.tokens import token_create

    token, secret = token_create(name="nightly", scope="read", actor="test", expires_in=timedelta(days=30))
    client.get("/api/v1/models/", HTTP_AUTHORIZATION=f"Bearer {secret}")
    ApiToken.objects.filter(name="test-read").update(expires_at=timezone.now() - timedelta(days=1))

    listed = client.get("/api/v1/tokens/", **admin_token.headers)
    assert listed.status_code == 200
    rows = {row["name"]: row for row in listed.json()["results"]}
    assert rows["nightly"]["expires_at"] == token.expires_at.isoformat().replace("+00:00", "Z")
    assert rows["nightly"]["last_used_at"] is not None and rows["nightly"]["expired"] is False
    assert rows["test-read"]["expired"] is True and rows["test-admin"]["expires_at"] is None
    assert all(secret not in json.dumps(row) and "token_hash" not in row for row in rows.values())
    assert client.get("/api/v1/tokens/", HTTP_AUTHORIZATION=f"Bearer {secret}").status_code == 403
    assert client.post("/api/v1/tokens/", {}, **admin_token.headers).status_code == 405
