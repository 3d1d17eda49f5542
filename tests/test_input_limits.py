"""Limits on input: bad input is a 4xx with a code at every entry (API bodies, forms, query
parameters, URL paths, the web UI, the admin), never a 500. Each case of issue 11's hand-made
probes is here: JSON nested 1,000 deep, NUL in jsonb fields, URL paths and filters,
expires_in 99999999d, ?at= in year 0, NUL in the web UI, timeouts and soak of 10^11 s, 10,000
waves, a 1 MB wave name, an empty canary wave; and device lists past their cap."""

from __future__ import annotations

import json
import re

import pytest

from ota.models import Rollout
from ota.rollouts.definition import MAX_WAVE_DEVICES, MAX_WAVES
from registry.limits import MAX_JSON_DEPTH
from registry.models import HardwareTarget, Model
from tests.support.registry_api import API
from tests.support.rollout_data import make_devices, release

pytestmark = pytest.mark.django_db


def post_json(client, token, path, body):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.post(f"{API}{path}", data, content_type="application/json", **token.headers)


def error_of(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content[:500]
    error = response.json()["error"]
    assert error["code"] == code, error
    return error


@pytest.fixture
def fleet(client, admin_token):
    release(client, admin_token, "detector", "2.0")
    return make_devices(6, labels={"site": "berlin"})


def rollout_body(**overrides):
    body = {"model": "detector", "version": "2.0", "target": {"labels": {"site": "berlin"}},
            "waves": [{"percent": 50}, {"percent": 100}]}
    body.update(overrides)
    return body


# --- JSON bodies: depth, size, control characters at any depth ---------------------------------


def test_it_refuses_json_nested_1000_deep_with_400_too_deep(client, ci_token):
    body = "[" * 1000 + "]" * 1000  # the 2 KB body: a RecursionError (500) before
    assert len(body) == 2000
    error = error_of(post_json(client, ci_token, "/models/", body), 400, "too_deep")
    assert str(MAX_JSON_DEPTH) in error["message"]
    # Brackets inside strings are text, not nesting.
    ok = post_json(client, ci_token, "/models/", {"name": "brackets", "description": "[" * 1000})
    assert ok.status_code == 201, ok.content


def test_it_refuses_a_json_body_over_the_size_limit_with_413(client, ci_token, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 4096
    body = {"name": "big", "description": "x" * 5000}
    error = error_of(post_json(client, ci_token, "/models/", body), 413, "request_too_large")
    assert error["limit"] == 4096
    assert not Model.objects.filter(name="big").exists()


@pytest.mark.parametrize(
    "body, field",
    [
        ({"version": "3.0", "metadata": {"site": "berlin\x00"}}, "metadata.site"),
        ({"version": "3.0", "metrics": {"runs": [1, {"note": "\x00"}]}}, "metrics.runs[1].note"),
        ({"version": "3.0", "metadata": {"a\x00": 1}}, "metadata"),
        ({"version": "3.0", "provenance": {"git_sha": "abc\x07"}}, "provenance.git_sha"),
        ({"version": "3.0\x00"}, "version"),
    ],
)
def test_it_refuses_nul_and_control_characters_in_json_fields_naming_the_field(client, ci_token, body, field):
    Model.objects.create(name="detector")
    error = error_of(post_json(client, ci_token, "/models/detector/versions/", body), 400, "invalid_characters")
    assert error["field"] == field
    assert "U+00" in error["message"]


def test_it_takes_tabs_and_new_lines_in_free_text(client, ci_token):
    response = post_json(client, ci_token, "/models/", {"name": "texty", "description": "line 1\r\n\tline 2"})
    assert response.status_code == 201, response.content
    assert Model.objects.get(name="texty").description == "line 1\r\n\tline 2"


def test_it_refuses_control_characters_in_form_and_multipart_bodies(client, ci_token, fleet):
    multipart = client.post(f"{API}/models/", {"name": "m1", "description": "x\x00"}, **ci_token.headers)
    assert error_of(multipart, 400, "invalid_characters")["field"] == "description"
    form = client.post(f"{API}/models/", "name=m2&description=x%01y", content_type="application/x-www-form-urlencoded",
                       **ci_token.headers)
    assert error_of(form, 400, "invalid_characters")["field"] == "description"
    # A JSON field sent as text in a form is parsed by the field: held to the same rules.
    as_form = client.post(
        f"{API}/rollouts/",
        {"model": "detector", "version": "2.0", "target": '{"labels": {"site": "b\\u0000"}}', "waves": '[{"percent": 100}]'},
        **ci_token.headers,
    )
    assert error_of(as_form, 400, "invalid_characters")["field"] == "target.labels.site"
    deep = client.post(f"{API}/rollouts/", {"model": "detector", "version": "2.0", "target": "[" * 5000,
                                            "waves": "[]"}, **ci_token.headers)
    error_of(deep, 400, "too_deep")
    assert not Model.objects.filter(name__in=["m1", "m2"]).exists()


# --- URL paths and query parameters -----------------------------------------------------------


@pytest.mark.parametrize(
    "url, field",
    [
        ("/devices/?label=site%3Dberlin%00", "label"),
        ("/devices/?q=%00", "q"),
        ("/devices/?hardware=rpi4%00", "hardware"),
        ("/models/?name=%00", "name"),
        ("/rollouts/?model=det%00", "model"),
        ("/rollouts/?state=running%00", "state"),
        ("/audit/?actor=%00", "actor"),
        ("/devices/?a%00=1", "a\\x00"),
        ("/devices/dev%00/", "path"),
        ("/models/detector/versions/2%00/", "path"),
        ("/models/detector/versions/2.0/artifacts/rpi%00/download", "path"),
    ],
)
def test_it_refuses_nul_in_url_paths_and_filters_with_400(client, admin_token, url, field):
    Model.objects.create(name="detector")
    response = client.get(f"{API}{url}", **admin_token.headers)
    error = error_of(response, 400, "invalid_characters")
    assert error["field"] == field


@pytest.mark.parametrize("at", ["0000-01-01", "0001-01-01T00:00:00%2B05:00", "9999-12-31T23:59:59-05:00",
                                "1969-12-31", "2026-13-01"])
def test_it_refuses_at_outside_the_accepted_range(client, read_token, at):
    Model.objects.create(name="detector")
    response = client.get(f"{API}/models/detector/aliases/?at={at}", **read_token.headers)
    error_of(response, 400, "invalid_at")


@pytest.mark.parametrize(
    "query, code",
    [
        ("offset=99999999999999999999", "invalid_offset"),
        ("offset=-1", "invalid_offset"),
        ("offset=null", "invalid_offset"),
        ("limit=99999999999999999999", "invalid_limit"),
        ("limit=1001", "invalid_limit"),
        ("limit=0", "invalid_limit"),
        ("limit=abc", "invalid_limit"),
    ],
)
def test_it_refuses_page_bounds_out_of_range(client, read_token, query, code):
    error = error_of(client.get(f"{API}/devices/?{query}", **read_token.headers), 400, code)
    assert error["field"] == query.split("=")[0]


def test_it_pages_within_the_bounds(client, read_token):
    response = client.get(f"{API}/devices/?limit=1000&offset=1000000000", **read_token.headers)
    assert response.status_code == 200 and response.json()["results"] == []


def test_it_refuses_an_enrollment_token_lasting_99999999_days(client, admin_token):
    response = post_json(client, admin_token, "/enrollment-tokens/", {"max_uses": 1, "expires_in": "99999999d"})
    error = error_of(response, 400, "invalid")
    assert "3650 days" in str(error["fields"]["expires_in"])


# --- rollout definitions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"gates": {"soak_seconds": 10**11}}, "gates.soak_seconds"),
        ({"gates": {"timeouts": {"trial_seconds": 10**11}}}, "gates.timeouts.trial_seconds"),
        ({"gates": {"timeouts": {"delivery_seconds": 10**11}}}, "gates.timeouts.delivery_seconds"),
        ({"waves": [{"percent": 100, "gates": {"soak_seconds": 10**11}}]}, "waves[0].gates.soak_seconds"),
        ({"gates": {"rate_per_minute": 10**30}}, "gates.rate_per_minute"),
        ({"gates": {"failure": {"min_reports": 10**30}}}, "gates.failure.min_reports"),
        ({"waves": [{"count": 10**30}]}, "waves[0].count"),
        ({"waves": [{"count": 1}] * 10_000}, "waves"),
        ({"waves": "; ".join(["+1"] * (MAX_WAVES + 1))}, "waves"),
        ({"waves": [{"percent": 100, "name": "x" * 1_000_000}]}, "waves[0].name"),
        ({"waves": [{"percent": 100, "name": ["canary"]}]}, "waves[0].name"),
        ({"waves": [{"name": "canary", "devices": []}, {"percent": 100}]}, "waves[0].devices"),
        ({"waves": [{"name": "canary", "percent": 0}, {"percent": 100}]}, "waves[0].percent"),
        # The first wave takes what the later ones leave: here nothing. An empty canary.
        ({"waves": [{"name": "canary", "count": 2},
                    {"devices": [f"dev-{i:04d}" for i in range(6)]}]}, "waves[0]"),
        ({"target": {"labels": {"site": "berlin"}, "hardware": ["rpi4"] * 101}}, "target.hardware"),
        ({"target": {"labels": {"site": "x" * 200}}}, "target.labels"),
    ],
)
def test_it_refuses_out_of_range_rollout_definitions_with_400(client, ci_token, fleet, overrides, field):
    response = post_json(client, ci_token, "/rollouts/", rollout_body(**overrides))
    error = error_of(response, 400, "invalid")
    assert field in error["fields"], error
    assert len(error["message"]) < 1000
    assert not Rollout.objects.exists()


def test_it_refuses_a_wave_device_list_past_its_cap_with_a_short_message(client, ci_token, fleet):
    ids = [f"dev-{i:06d}" for i in range(MAX_WAVE_DEVICES + 1)]
    response = post_json(client, ci_token, "/rollouts/", rollout_body(waves=[{"devices": ids}, {"percent": 100}]))
    error = error_of(response, 400, "invalid")
    assert f"at most {MAX_WAVE_DEVICES}" in error["fields"]["waves[0].devices"][0]
    # Unknown ids under the cap: the refusal names a few, not all of them.
    ids = [f"ghost-{i:05d}" for i in range(5000)]
    response = post_json(client, ci_token, "/rollouts/", rollout_body(target={"devices": ids}))
    message = error_of(response, 400, "invalid")["fields"]["target.devices"][0]
    assert "ghost-00000" in message and "4980 more" in message and len(message) < 1000
    within = post_json(client, ci_token, "/rollouts/", rollout_body(
        waves=[{"devices": ["dev-0000", "dev-0001", "dev-0000"]}, {"percent": 100}]))
    assert within.json()["error"]["fields"]["waves[0].devices"] == ["devices listed twice: dev-0000"]
    across = post_json(client, ci_token, "/rollouts/", rollout_body(
        waves=[{"devices": ["dev-0000", "dev-0001"]}, {"devices": ["dev-0001"]}, {"percent": 100}]))
    assert across.json()["error"]["fields"]["waves[1].devices"] == ["devices listed twice: dev-0001"]


def test_it_still_creates_a_definition_at_the_limits(client, ci_token, fleet):
    response = post_json(client, ci_token, "/rollouts/", rollout_body(
        waves=[{"name": "c" * 64, "devices": ["dev-0000"]}, {"percent": 100, "gates": {"soak_seconds": 30 * 86400}}],
        gates={"timeouts": {"delivery_seconds": 30 * 86400}},
    ))
    assert response.status_code == 201, response.content


# --- web UI and admin -------------------------------------------------------------------------


def test_it_answers_nul_in_the_web_ui_with_a_plain_400_page(client, operator):
    client.force_login(operator)
    for url in ("/devices/?q=%00", "/devices/dev%00/", "/audit/?actor=%00", "/registry/detector/versions/2%00/"):
        response = client.get(url)
        assert response.status_code == 400, url
        assert response["Content-Type"].startswith("text/html")
        assert b"Bad request" in response.content and b"U+0000" in response.content
    posted = client.post("/access/", {"kind": "enroll", "enroll-name": "line\x00two", "enroll-max_uses": "1"})
    assert posted.status_code == 400
    assert b"enroll-name" in posted.content


def test_it_refuses_nul_in_the_admin(client, admin_user):
    client.force_login(admin_user)
    assert client.get("/admin/registry/model/?q=%00").status_code == 400
    response = client.post("/admin/registry/hardwaretarget/add/", {"id": "rpi\x00", "max_artifact_bytes": "10"})
    assert response.status_code == 400


def test_it_refuses_json_nested_too_deep_in_the_admin(client, admin_user):
    HardwareTarget.objects.create(id="rpi4", max_artifact_bytes=1000)
    make_devices(1)
    client.force_login(admin_user)
    response = client.post("/admin/ota/device/dev-0000/change/", {"name": "x", "labels": "[" * 5000 + "]" * 5000})
    assert response.status_code == 200  # the form again, with the field's error: a RecursionError before
    assert f"more than {MAX_JSON_DEPTH} levels deep".encode() in response.content


def test_it_refuses_an_absurd_soak_in_the_web_wizard(client, operator, fleet):
    from registry.models import ModelVersion

    client.force_login(operator)
    release_pk = ModelVersion.objects.get(version="2.0").pk
    response = client.post("/rollouts/new/", {
        "release": release_pk, "target_labels": "site=berlin", "waves": "50% → 100%", "success_percent": 100,
        "failure_min_reports": 1, "failure_percent": 10, "soak_seconds": 10**11, "download_seconds": 1800,
        "activate_seconds": 600, "trial_seconds": 900, "abort_policy": "pause", "step": "review",
    })
    assert response.status_code == 400  # the wizard again, the field's error next to it
    assert b"less than or equal to 2592000" in response.content
    assert not Rollout.objects.exists()


# --- CLI ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-uses", str(10**12)], "--max-uses must be at most 1000000"),
        (["--max-uses", "1", "--expires-in", "99999999d"], "3650 days"),
        (["--max-uses", "1", "--label", "site=berlin\x00"], "U+0000"),
        (["--max-uses", "1", "--name", "line\x1b[2J"], "U+001B"),
    ],
)
def test_it_refuses_out_of_range_enrollment_tokens_on_the_command_line(db, args, message):
    from django.core.management import CommandError, call_command

    with pytest.raises(CommandError, match=re.escape(message)):
        call_command("enrollment", "create", *args)
