"""The OpenAPI 3 schema CI clients generate code from: complete, valid, and without warnings."""

import yaml
from django.core.management import call_command


def test_it_generates_a_valid_schema_without_warnings(tmp_path):
    out = tmp_path / "schema.yml"

    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))

    paths = yaml.safe_load(out.read_text())["paths"]
    for path in (
        "/api/v1/models/{name}/versions/{version}/artifacts/",
        "/api/v1/models/{name}/versions/{version}/release",
        "/api/v1/keys/",
        "/api/v1/devices/",
        "/api/v1/rollouts/",
        "/api/v1/rollouts/{id}/pause/",  # also served without the slash
        "/api/v1/audit/",
    ):
        assert path in paths, f"{path} missing from the schema"


def test_it_documents_the_refusals_every_operation_shares(tmp_path):
    """registry.schema.document_errors: each operation lists the 4xx it can answer, with the JSON
    error body (tests/test_api_fuzz.py holds the server to it)."""
    out = tmp_path / "schema.yml"
    call_command("spectacular", "--file", str(out))
    schema = yaml.safe_load(out.read_text())
    assert schema["components"]["schemas"]["Error"]["required"] == ["error"]

    for path, item in schema["paths"].items():
        for method, operation in item.items():
            statuses = set(operation["responses"])
            assert "400" in statuses, f"{method} {path}"
            if operation.get("security"):
                assert {"401", "403"} <= statuses, f"{method} {path}"
            if any(p["in"] == "path" for p in operation.get("parameters", [])):
                assert "404" in statuses, f"{method} {path}"
            if "requestBody" in operation:
                assert {"413", "415"} <= statuses, f"{method} {path}"
            for status in statuses & {"400", "401", "403", "404", "409", "413", "415"}:
                body = operation["responses"][status]["content"]["application/json"]["schema"]
                assert body == {"$ref": "#/components/schemas/Error"}, f"{method} {path} {status}"
