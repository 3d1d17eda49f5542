"""The API fuzzed against its own OpenAPI schema: schemathesis generates requests for every
operation of /api/schema/ (schema examples, boundary and negative values, random data) and sends
them over real HTTP to a live server on the test PostgreSQL database, once with an admin token
and once with a read token. Every check is on: no 5xx, every status and content type documented,
every body and header as the schema says, invalid data refused, valid data accepted.

The few exceptions are narrow and each says why: BEYOND_THE_SCHEMA (valid-looking requests a
rule OpenAPI 3.0 cannot state refuses with a 400), 410/416 on the download (state, not input), and
the generated cases that are not sent (_sendable).

Bounded and repeatable: a fixed seed, deterministic generation, a cap on examples per operation,
no example database and no schemathesis cache; the stateful phase is off (its request chains
follow the links the server answers with, so length and path vary with server state). Seeded
rows (a released version with an artifact, a draft, an alias, a device, a rollout, an
enrollment token) are what the path parameters are pinned to."""

from __future__ import annotations

import json
import time

import pytest
import schemathesis
from schemathesis import engine
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events

from registry.guards import FORM_TYPES
from registry.limits import bad_character
from tests.support.registry_api import API
from tests.support.rollout_data import create_rollout, make_devices, release

pytestmark = pytest.mark.django_db(transaction=True)

SEED = 20261201
MAX_EXAMPLES = 6  # per operation and phase: enough to cover every operation, kept small for the suite's 20-minute budget
# schemathesis' default statuses for "valid data accepted" (config/_checks.py).
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
# Operations whose valid requests can still be refused with a 400 for rules OpenAPI 3.0 cannot
# state; the schema documents the shape, the 400 names the rule. Everything else must be accepted.
NOT_SENT: dict[str, int] = {}
BEYOND_THE_SCHEMA = [
    # `version` needs `model` (a dependency between parameters).
    ("GET", "/api/v1/devices/"),
    # Label keys follow a pattern (a rule on object keys: propertyNames is OpenAPI 3.1).
    ("POST", "/api/v1/enroll"),
    ("POST", "/api/v1/enrollment-tokens/"),
    # The health contract: each tensor's data as long as its shape's product, outputs need inputs.
    ("POST", "/api/v1/models/{name}/versions/"),
    # A rollout definition: a released version of an existing model, waves that add up, known devices.
    ("POST", "/api/v1/rollouts/"),
    # A release public key: the PEM must decode to an Ed25519 key (a rule on decoded content).
    ("POST", "/api/v1/keys/"),
    # A keyring: a DSSE envelope a configured root key signed, newer and unexpired (signed content).
    ("POST", "/api/v1/keyring/"),
]


@pytest.fixture
def server(live_server, monkeypatch):
    """pytest-django's live server (a thread of this process serving real HTTP), with Nagle's
    algorithm off on its connections: it writes headers and body separately, and on the
    keep-alive connections schemathesis reuses each response then waited ~40 ms for a delayed
    ACK (50 ms a request instead of 5)."""
    from django.core.servers.basehttp import WSGIRequestHandler

    monkeypatch.setattr(WSGIRequestHandler, "disable_nagle_algorithm", True)
    return live_server


@pytest.fixture
def fuzz_data(client, admin_token, settings):
    """Real rows for the path parameters, made through the API (in process) before the run."""
    settings.MQTT_BROKER_AUTH = "none"
    release(client, admin_token, "detector", "1.0", hardware=("rpi4",))
    release(client, admin_token, "detector", "2.0-draft", hardware=("rpi4",), released=False)
    moved = client.put(f"{API}/models/detector/aliases/stable", {"version": "1.0"},
                       content_type="application/json", **admin_token.headers)
    assert moved.status_code == 200, moved.content
    devices = make_devices(2, hardware="rpi4", labels={"site": "berlin"})
    _failed_install(devices[0], model="detector")
    rollout = create_rollout(client, admin_token, model="detector", version="1.0",
                             target={"labels": {"site": "berlin"}}, waves=[{"percent": 100}])
    assert rollout.status_code == 201, rollout.content
    token = client.post(f"{API}/enrollment-tokens/", {"max_uses": 1, "name": "fuzz"},
                        content_type="application/json", **admin_token.headers)
    assert token.status_code == 201, token.content
    return {
        "name": "detector", "version": "1.0", "hardware": "rpi4", "alias": "stable",
        "device": devices[0], "rollout": rollout.json()["id"], "enrollment_token": token.json()["id"],
    }


def _failed_install(device_id: str, *, model: str) -> None:
    """What a device reports after its first install failed: a model state and a release-history
    row without a version (nulls the device responses must be allowed to carry)."""
    from ota.models import ActiveRelease, DeviceModelState
    from registry.models import Model

    model_row = Model.objects.get(name=model)
    DeviceModelState.objects.create(device_id=device_id, model=model_row, last_state="failed",
                                    last_error_code="precheck_failed")
    ActiveRelease.objects.create(device_id=device_id, model=model_row, version=None, sha256="0" * 64)


def _schema(live_server, secret: str, data: dict):
    path_params = {
        f"path.{key}": data[key] for key in ("name", "version", "hardware", "alias")
    }
    config = SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "headers": {"Authorization": f"Bearer {secret}"},
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
            "phases": {"stateful": {"enabled": False}},
            "request-timeout": 30,
            # Nothing carried over between runs: the same seed must mean the same requests.
            "cache": {"enabled": False},
            "parameters": path_params,
            # 410: the admin run revokes the seeded version, whose artifacts are then Gone (state, not input).
            "checks": {"enabled": True,
                       "positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "410"]}},
            "operations": [
                *(
                    {"include-name": f"{method} {path}",
                     "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "410", "400"]}}}
                    for method, path in BEYOND_THE_SCHEMA
                ),
                # 416: a valid Range past the end of the seeded artifact (its length is data, not schema).
                {"include-path-regex": "^/api/v1/models/.*/download$",
                 "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "410", "416"]}}},
                {"include-path-regex": "^/api/v1/devices/", "parameters": {"path.id": data["device"]}},
                {"include-path-regex": "^/api/v1/rollouts/", "parameters": {"path.id": str(data["rollout"])}},
                {"include-path-regex": "^/api/v1/enrollment-tokens/",
                 "parameters": {"path.id": str(data["enrollment_token"])}},
            ],
        }
    )
    schema = schemathesis.openapi.from_url(
        f"{live_server.url}/api/schema/?format=json", config=config,
        headers={"Authorization": f"Bearer {secret}"},
    )
    schema.hook("filter_case")(_sendable)
    return schema


def _refused_characters(value, *, name: bool = False) -> bool:
    """Whether the server's one rule on characters (registry.limits.bad_character: no control
    characters in any string, nor tab or newlines in names and keys) refuses something in `value`."""
    if isinstance(value, str):
        return bad_character(value, name=name) is not None
    if isinstance(value, dict):
        return any(_refused_characters(k, name=True) or _refused_characters(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_refused_characters(item) for item in value)
    return False


def _sendable(context, case) -> bool:
    """Three kinds of generated case say nothing about the API, so they are not sent (counted in
    NOT_SENT, printed with the run's figures):
    - "valid" data holding control characters: every string the API takes refuses them (issue 11;
      the guard and parsers answer 400 invalid_characters), a rule OpenAPI 3.0 cannot state for
      free-form JSON (metadata, labels, unknown keys), so schemathesis would count those 400s as
      valid data refused. Invalid data with control characters is still sent, and must be refused.
    - invalid data whose only invalid part is a path parameter: the run pins path parameters to
      the seeded rows, so what is sent is valid after all;
    - an invalid form body invalid only in what a form cannot carry (_form_blurs)."""
    meta = case.meta
    if meta is None:
        return True
    if meta.generation.mode.is_positive:
        parts = (("body", case.body), ("query", case.query), ("path", case.path_parameters))
        return _sent_unless(any(_refused_characters(part, name=where == "path") for where, part in parts),
                            "valid but with control characters")
    negative = {str(location.value) for location, info in meta.components.items() if info.mode.is_negative}
    if negative == {"path"}:
        return _sent_unless(True, "invalid only in a pinned path parameter")
    blurred = "body" in negative and (case.media_type or "").startswith(FORM_TYPES) and _form_blurs(case)
    return _sent_unless(blurred, "invalid only in what a form cannot carry")


def _form_blurs(case) -> bool:
    """Whether an invalid form body is invalid only in what a form cannot carry: a form sends text,
    so a value of another JSON type than its field's (an object for a string, a number for a list)
    arrives as valid text, and an empty field means "not given" (HTML forms). Form bodies invalid
    otherwise (too long, off-pattern, out of range, a required field missing) are sent."""
    body = case.body
    if not isinstance(body, dict):
        return True
    content = case.operation.definition.raw.get("requestBody", {}).get("content", {}).get(case.media_type, {})
    ref = content.get("schema", {}).get("$ref", "")
    components = case.operation.schema.raw_schema.get("components", {}).get("schemas", {})
    properties = components.get(ref.rsplit("/", 1)[-1], {}).get("properties", {}) if ref else {}
    for key, value in body.items():
        field = properties.get(key, {})
        if value == "" or not _json_type_fits(value, field.get("type")):
            return True
        if field.get("type") == "array" and any(
            not _json_type_fits(item, field.get("items", {}).get("type")) for item in value
        ):
            return True
    return False


def _json_type_fits(value, expected: str | None) -> bool:
    if expected is None or isinstance(value, bytes):
        return True
    kinds = {"boolean": (bool,), "integer": (int,), "number": (int, float), "string": (str,),
             "array": (list,), "object": (dict,)}
    return isinstance(value, kinds.get(expected, object)) and not (
        isinstance(value, bool) and expected in ("integer", "number")
    )


def _sent_unless(skip: bool, why: str) -> bool:
    if skip:
        NOT_SENT[why] = NOT_SENT.get(why, 0) + 1
    return not skip


def _fuzz(live_server, secret: str, data: dict, who: str) -> None:
    """One engine run (the same phases `schemathesis run` goes through); fails listing every
    distinct failure with a curl line to replay it."""
    started = time.monotonic()
    NOT_SENT.clear()
    schema = _schema(live_server, secret, data)
    requests = 0
    seen_operations: set[str] = set()
    failures: dict[tuple[str, str, str], str] = {}
    errors: list[str] = []
    for event in engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            seen_operations.add(event.recorder.label)
            requests += len(event.recorder.interactions)
            for case_id, checks in event.recorder.checks.items():
                for check in checks:
                    if check.failure_info is None:
                        continue
                    failure = check.failure_info.failure
                    interaction = event.recorder.interactions.get(case_id)
                    response = interaction.response if interaction else None
                    answer = f"{response.status_code} {response.content[:300]!r}" if response else "none"
                    key = (event.recorder.label, check.name, failure.title)
                    replay = check.failure_info.code_sample[:1500]
                    failures.setdefault(key, f"{failure.message}\n    {replay}\n    -> {answer}")
        elif isinstance(event, events.NonFatalError):
            errors.append(f"{event.label}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            raise event.exception
    elapsed = time.monotonic() - started
    print(f"schemathesis {schemathesis.__version__} ({who} token): {requests} requests, "
          f"{len(seen_operations)} operations, {elapsed:.1f} s, {len(failures)} distinct failures; "
          f"generated but not sent: {NOT_SENT}")
    report = "\n\n".join(
        f"{label} [{check}] {title}\n  {detail}" for (label, check, title), detail in sorted(failures.items())
    )
    assert not failures and not errors, f"{len(failures)} failures, errors: {errors}\n\n{report}"


def test_it_fuzzes_every_operation_with_an_admin_token(server, fuzz_data, admin_token):
    _fuzz(server, admin_token.secret, fuzz_data, "admin")


def test_it_fuzzes_every_operation_with_a_read_token(server, fuzz_data, read_token):
    _fuzz(server, read_token.secret, fuzz_data, "read")


def test_it_takes_the_same_version_fields_in_a_multipart_form_as_in_json(client, ci_token):
    """Found by the fuzz run: a multipart version create dropped `provenance` and `metadata`
    (DRF looks for dotted keys in forms) and answered 201. Object fields are JSON text in a form."""
    from tests.support.registry_api import create_model

    create_model(client, ci_token, "detector")
    versions = f"{API}/models/detector/versions/"
    provenance = {"git_sha": "0123abcd", "ci_run_url": "https://ci.example/runs/42",
                  "training_run_id": "run-7"}
    body = {"version": "1.0", "metadata": {"dataset": "coco"}, "metrics": {"map": 0.5},
            "provenance": provenance, "health": {"latency_budget_ms": 50}}
    as_json = client.post(versions, body, content_type="application/json", **ci_token.headers)
    assert as_json.status_code == 201, as_json.content
    form = {key: json.dumps(value) if isinstance(value, dict) else value for key, value in body.items()}
    as_form = client.post(versions, {**form, "version": "1.1"}, **ci_token.headers)  # multipart
    assert as_form.status_code == 201, as_form.content
    same = ("metadata", "metrics", "provenance", "health")
    assert {k: as_form.json()[k] for k in same} == {k: as_json.json()[k] for k in same}
    assert as_form.json()["provenance"]["git_sha"] == "0123abcd"

    not_json = client.post(versions, {"version": "1.2", "provenance": "{git_sha: 1"}, **ci_token.headers)
    assert not_json.status_code == 400, not_json.content
    assert "provenance" in not_json.json()["error"]["fields"]
    too_long = json.dumps({"training_run_id": "x" * 201})
    refused = client.post(versions, {"version": "1.3", "provenance": too_long}, **ci_token.headers)
    assert refused.status_code == 400, refused.content
    assert "provenance" in refused.json()["error"]["fields"]
    for version in ("1.2", "1.3"):
        assert client.get(f"{versions}{version}/", **ci_token.headers).status_code == 404


@pytest.mark.parametrize("query", ["offset=null", "limit=abc", "offset=1.5"])
def test_it_refuses_page_bounds_that_are_not_numbers(client, read_token, query):
    response = client.get(f"{API}/models/?{query}", **read_token.headers)
    assert response.status_code == 400, response.content
