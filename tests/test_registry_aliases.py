"""Aliases: moved by ci or operator, every move kept with who and when, and "which version was
production at date D" answered by ?at=."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from registry.models import AliasMove, AuditEntry
from tests.support.onnx_models import linear_model
from tests.support.registry_api import create_hardware, create_model, create_version, upload, version_url

pytestmark = pytest.mark.django_db


@pytest.fixture
def releases(client, ci_token):
    create_hardware(client, ci_token, "rpi5")
    create_model(client, ci_token, "detector")
    for version in ("1.0", "1.1", "2.0"):
        create_version(client, ci_token, "detector", version)
        upload(client, ci_token, "detector", version, hardware="rpi5", data=linear_model())
        if version != "2.0":
            assert (
                client.post(f"{version_url('detector', version)}/release", **ci_token.headers).status_code
                == 200
            )


def put_alias(client, token, alias, version):
    return client.put(
        f"/api/v1/models/detector/aliases/{alias}",
        {"version": version},
        content_type="application/json",
        **token.headers,
    )


def test_it_moves_an_alias_and_keeps_who_and_when(client, ci_token, operator_token, read_token, releases):
    first = put_alias(client, ci_token, "production", "1.0")
    assert first.status_code == 200, first.content
    second = put_alias(client, operator_token, "production", "1.1")
    assert second.status_code == 200

    body = second.json()
    assert (
        body["name"] == "production"
        and body["version"] == "1.1"
        and body["updated_by"] == "token:test-operator"
    )
    assert [(m["from_version"], m["to_version"], m["moved_by"]) for m in body["history"]] == [
        ("1.0", "1.1", "token:test-operator"),
        (None, "1.0", "token:test-ci"),
    ]
    listed = client.get("/api/v1/models/detector/aliases/", **read_token.headers).json()
    assert [(a["name"], a["version"], len(a["history"])) for a in listed] == [("production", "1.1", 2)]
    assert client.get("/api/v1/models/detector/", **read_token.headers).json()["aliases"] == {
        "production": "1.1"
    }
    assert AuditEntry.objects.filter(action="alias.move").count() == 2


def test_it_answers_which_version_was_production_at_a_date(client, ci_token, read_token, releases):
    put_alias(client, ci_token, "production", "1.0")
    put_alias(client, ci_token, "production", "1.1")
    put_alias(client, ci_token, "staging", "1.1")
    # Spread the recorded moves over known dates, as if they had happened weeks apart.
    day = datetime(2026, 3, 1, tzinfo=timezone.utc)
    for move, when in zip(
        AliasMove.objects.order_by("id"), (day, day + timedelta(days=10), day + timedelta(days=20))
    ):
        AliasMove.objects.filter(pk=move.pk).update(moved_at=when)

    def at(value):
        response = client.get("/api/v1/models/detector/aliases/", {"at": value}, **read_token.headers)
        assert response.status_code == 200, response.content
        return {a["name"]: a["version"] for a in response.json()}

    assert at("2026-02-28T00:00:00Z") == {}
    assert at("2026-03-05T12:00:00Z") == {"production": "1.0"}
    assert at("2026-03-11T00:00:00+00:00") == {"production": "1.1"}
    assert at("2026-03-25") == {"production": "1.1", "staging": "1.1"}  # a bare date: 00:00 UTC
    assert at("2026-03-20") == {"production": "1.1"}
    bad = client.get("/api/v1/models/detector/aliases/", {"at": "last tuesday"}, **read_token.headers)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_at"


def test_it_records_nothing_when_the_alias_already_points_there(client, ci_token, releases):
    put_alias(client, ci_token, "production", "1.0")
    put_alias(client, ci_token, "production", "1.0")
    assert AliasMove.objects.count() == 1


def test_it_refuses_aliases_to_drafts_and_unknown_versions(client, ci_token, releases):
    draft = put_alias(client, ci_token, "production", "2.0")
    assert draft.status_code == 409 and draft.json()["error"]["code"] == "version_not_released"
    missing = put_alias(client, ci_token, "production", "9.9")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "version_not_found"
    assert AliasMove.objects.count() == 0


def test_it_lets_only_ci_operator_or_admin_move_aliases(client, read_token, admin_token, releases):
    denied = put_alias(client, read_token, "production", "1.0")
    assert denied.status_code == 403
    assert "'ci' or 'operator'" in denied.json()["error"]["message"]
    assert put_alias(client, admin_token, "production", "1.0").status_code == 200


def test_it_shows_one_alias_with_its_history(client, ci_token, read_token, releases):
    put_alias(client, ci_token, "production", "1.0")
    one = client.get("/api/v1/models/detector/aliases/production", **read_token.headers)
    assert one.status_code == 200 and one.json()["version"] == "1.0"
    none = client.get("/api/v1/models/detector/aliases/canary", **read_token.headers)
    assert none.status_code == 404 and none.json()["error"]["code"] == "alias_not_found"
