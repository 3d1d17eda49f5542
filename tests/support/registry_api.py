"""Helpers for registry API tests: set up hardware, models and draft versions over the real API."""

from __future__ import annotations

import hashlib
from pathlib import Path

from django.core.files.uploadedfile import SimpleUploadedFile

API = "/api/v1"


def version_url(model: str, version: str) -> str:
    return f"{API}/models/{model}/versions/{version}"


def create_hardware(client, token, hardware_id: str, max_bytes: int = 50_000_000) -> dict:
    response = client.post(
        f"{API}/hardware/",
        {"id": hardware_id, "description": f"{hardware_id} box", "max_artifact_bytes": max_bytes},
        content_type="application/json",
        **token.headers,
    )
    assert response.status_code == 201, response.content
    return response.json()


def create_model(client, token, name: str) -> dict:
    response = client.post(
        f"{API}/models/", {"name": name, "description": "d"}, content_type="application/json", **token.headers
    )
    assert response.status_code == 201, response.content
    return response.json()


def create_version(client, token, model: str, version: str, **body) -> dict:
    response = client.post(
        f"{API}/models/{model}/versions/",
        {"version": version, **body},
        content_type="application/json",
        **token.headers,
    )
    assert response.status_code == 201, response.content
    return response.json()


def upload(
    client,
    token,
    model: str,
    version: str,
    *,
    hardware: str,
    data: bytes,
    fmt: str = "onnx",
    sha256: str | None = None,
    file_name: str = "model.onnx",
):
    form = {"hardware": hardware, "format": fmt, "file": SimpleUploadedFile(file_name, data)}
    if sha256 is not None:
        form["sha256"] = sha256
    return client.post(f"{version_url(model, version)}/artifacts/", form, **token.headers)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(path: Path) -> list[Path]:
    return [p for p in Path(path).rglob("*") if p.is_file()] if Path(path).exists() else []
