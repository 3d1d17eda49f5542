"""Versions: counters strictly increasing per model (also under concurrent creates), the health
contract checked at creation, provenance kept."""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from registry.errors import ApiError
from registry.models import Model, ModelVersion
from registry.versions import version_create
from tests.support.registry_api import create_model, create_version

GOOD_HEALTH = {
    "inputs": {"x": {"dtype": "float32", "shape": [2, 2], "data": [1, 2, 3, 4.5]}},
    "outputs": {"y": {"dtype": "float32", "shape": [2], "data": [0.5, 1]}},
    "atol": 0.001,
    "rtol": 0,
    "latency_budget_ms": 20,
}


@pytest.mark.django_db
def test_it_numbers_versions_per_model_and_keeps_provenance(client, ci_token):
    create_model(client, ci_token, "detector")
    create_model(client, ci_token, "classifier")
    first = create_version(
        client,
        ci_token,
        "detector",
        "1.0",
        provenance={"git_sha": "abc123", "training_run_id": "mlflow-9"},
        metrics={"map": 0.61},
        health=GOOD_HEALTH,
    )
    second = create_version(client, ci_token, "detector", "1.1", rollback_floor=1)
    other = create_version(client, ci_token, "classifier", "7")

    assert (first["counter"], second["counter"], other["counter"]) == (1, 2, 1)
    assert first["state"] == "draft" and first["created_by"] == "token:test-ci"
    assert first["provenance"] == {
        "git_sha": "abc123",
        "ci_run_url": "",
        "training_run_id": "mlflow-9",
        "approver": "",
    }
    assert first["metrics"] == {"map": 0.61} and first["health"] == GOOD_HEALTH
    assert second["rollback_floor"] == 1
    listed = client.get("/api/v1/models/detector/versions/", **ci_token.headers).json()
    assert [v["version"] for v in listed["results"]] == ["1.1", "1.0"]
    assert client.get("/api/v1/models/detector/", **ci_token.headers).json()["latest_version"] == "1.1"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("health", "message"),
    [
        ({"outputs": GOOD_HEALTH["outputs"]}, "health.outputs needs health.inputs"),
        (
            {"inputs": {"x": {"dtype": "float32", "shape": [3], "data": [1, 2]}}},
            "health.inputs.x.data has 2 values; shape [3] needs 3",
        ),
        (
            {"inputs": {"x": {"dtype": "complex64", "shape": [1], "data": [1]}}},
            "health.inputs.x.dtype must be one of",
        ),
        (
            {"inputs": {"x": {"dtype": "float32", "shape": [1], "data": ["a"]}}},
            "health.inputs.x.data must hold only numbers",
        ),
        ({"atol": -1}, "health.atol must be a non-negative number"),
        ({"latency_budget_ms": 0}, "health.latency_budget_ms must be a positive number"),
        ({"golden": {}}, "health has unknown keys: golden"),
        (
            {"inputs": {"x": {"dtype": "float32", "shape": [10000], "data": [0.123456] * 10000}}},
            "over the 24576-byte limit",
        ),
        ([1, 2], "health must be an object"),
    ],
)
def test_it_refuses_a_bad_health_contract_naming_the_field(client, ci_token, health, message):
    create_model(client, ci_token, "detector")
    response = client.post(
        "/api/v1/models/detector/versions/",
        {"version": "1.0", "health": health},
        content_type="application/json",
        **ci_token.headers,
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_health"
    assert message in response.json()["error"]["message"]
    assert not ModelVersion.objects.exists()


@pytest.mark.django_db
def test_it_refuses_a_rollback_floor_above_the_counter(client, ci_token):
    create_model(client, ci_token, "detector")
    response = client.post(
        "/api/v1/models/detector/versions/",
        {"version": "1.0", "rollback_floor": 2},
        content_type="application/json",
        **ci_token.headers,
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_rollback_floor"


@pytest.mark.django_db
def test_it_refuses_an_unknown_model(client, ci_token):
    response = client.post(
        "/api/v1/models/ghost/versions/",
        {"version": "1"},
        content_type="application/json",
        **ci_token.headers,
    )
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


@pytest.mark.django_db(transaction=True)
def test_it_hands_out_unique_counters_to_concurrent_creates():
    model = Model.objects.create(name="busy")
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def create(i: int) -> None:
        try:
            barrier.wait()
            version_create(model=model, version=f"v{i}", actor="test")
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert sorted(ModelVersion.objects.filter(model=model).values_list("counter", flat=True)) == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]


@pytest.mark.django_db
def test_it_reports_duplicate_versions_from_the_action_too():
    model = Model.objects.create(name="m")
    version_create(model=model, version="1", actor="test")
    with pytest.raises(ApiError) as exc:
        version_create(model=model, version="1", actor="test")
    assert exc.value.status_code == 409


@pytest.mark.django_db
def test_it_refuses_duplicate_models_and_hardware_with_409(client, ci_token):
    create_model(client, ci_token, "detector")
    again = client.post(
        "/api/v1/models/", {"name": "detector"}, content_type="application/json", **ci_token.headers
    )
    assert again.status_code == 409 and again.json()["error"]["code"] == "model_exists"
    body = {"id": "rpi5", "max_artifact_bytes": 1000}
    assert (
        client.post(
            "/api/v1/hardware/", body, content_type="application/json", **ci_token.headers
        ).status_code
        == 201
    )
    dup = client.post("/api/v1/hardware/", body, content_type="application/json", **ci_token.headers)
    assert dup.status_code == 409 and dup.json()["error"]["code"] == "hardware_exists"
    bad = client.post(
        "/api/v1/hardware/",
        {"id": "rpi 5", "max_artifact_bytes": 0},
        content_type="application/json",
        **ci_token.headers,
    )
    assert bad.status_code == 400 and set(bad.json()["error"]["fields"]) == {"id", "max_artifact_bytes"}
    listed = client.get("/api/v1/hardware/", **ci_token.headers).json()
    assert [h["id"] for h in listed["results"]] == ["rpi5"]


@pytest.mark.django_db
def test_it_keeps_a_models_description_and_tags(client, ci_token, read_token):
    created = client.post(
        "/api/v1/models/",
        {"name": "detector", "description": "people detector", "tags": ["vision", "edge"]},
        content_type="application/json",
        **ci_token.headers,
    )
    assert created.status_code == 201, created.content
    shown = client.get("/api/v1/models/detector/", **read_token.headers).json()
    assert (shown["name"], shown["description"], shown["tags"]) == ("detector", "people detector", ["vision", "edge"])
    bad = client.post(
        "/api/v1/models/", {"name": "other", "tags": "vision"}, content_type="application/json", **ci_token.headers
    )
    assert bad.status_code == 400 and "tags" in bad.json()["error"]["fields"]
    assert not Model.objects.filter(name="other").exists()
