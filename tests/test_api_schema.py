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
