"""The acceptance flow CI scripts follow, with nothing but `curl` against a live server: a ci token
uploads a real ONNX model of more than 2 MB for two hardware targets, releases it and downloads
the manifest; the envelope verifies with an independent DSSE implementation (securesystemslib)
against the PEM from /api/v1/keys/, and the signed sha256/length equal `sha256sum` and the size."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import SSlibKey

from tests.support.onnx_models import write_linear_model

pytestmark = pytest.mark.django_db(transaction=True)


class Curl:
    def __init__(self, base_url: str, token: str | None, workdir: Path):
        self.base_url = base_url
        self.token = token
        self.workdir = workdir

    def __call__(self, method: str, path: str, *args: str, expect: int = 200) -> bytes:
        out = self.workdir / "body"
        result = subprocess.run(
            [
                "curl",
                "-sS",
                "-X",
                method,
                *(["-H", f"Authorization: Bearer {self.token}"] if self.token else []),
                "-o",
                str(out),
                "-w",
                "%{http_code}",
                *args,
                self.base_url + path,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        body = out.read_bytes() if out.exists() else b""
        assert int(result.stdout) == expect, body[:500]
        return body

    def json(self, method: str, path: str, data: dict | None = None, expect: int = 200):
        args = (
            ["-H", "Content-Type: application/json", "--data-binary", json.dumps(data)]
            if data is not None
            else []
        )
        return json.loads(self(method, path, *args, expect=expect))


def sha256sum(path: Path) -> str:
    result = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True)
    return result.stdout.split()[0]


def test_it_runs_the_ci_flow_with_plain_curl(live_server, ci_token, tmp_path):
    curl = Curl(live_server.url, ci_token.secret, tmp_path)
    models = {
        "jetson-orin": write_linear_model(tmp_path / "orin.onnx", scale=2.0, padding_bytes=2_200_000),
        "rpi5": write_linear_model(tmp_path / "rpi5.onnx", scale=3.0, padding_bytes=2_200_000),
    }
    assert all(path.stat().st_size >= 2 * 1024 * 1024 for path in models.values())  # 2 MiB, not just 2 MB

    for hardware in models:
        curl.json("POST", "/api/v1/hardware/", {"id": hardware, "max_artifact_bytes": 10_000_000}, expect=201)
    curl.json("POST", "/api/v1/models/", {"name": "detector", "description": "people detector"}, expect=201)
    curl.json(
        "POST",
        "/api/v1/models/detector/versions/",
        {
            "version": "1.4.0",
            "metadata": {"dataset": "coco"},
            "provenance": {"git_sha": "0123abcd", "ci_run_url": "https://ci.example/runs/42"},
        },
        expect=201,
    )
    for hardware, path in models.items():
        uploaded = json.loads(
            curl(
                "POST",
                "/api/v1/models/detector/versions/1.4.0/artifacts/",
                "-F",
                f"hardware={hardware}",
                "-F",
                "format=onnx",
                "-F",
                f"sha256={sha256sum(path)}",
                "-F",
                f"file=@{path}",
                expect=201,
            )
        )
        assert uploaded["sha256"] == sha256sum(path)
    released = curl.json("POST", "/api/v1/models/detector/versions/1.4.0/release")
    envelope = json.loads(curl("GET", "/api/v1/models/detector/versions/1.4.0/manifest"))
    assert envelope == released
    keys = curl.json("GET", "/api/v1/keys/")
    release_key = next(k for k in keys if k["role"] == "release")

    # Independent verification: securesystemslib's DSSE + Ed25519, fed only the published PEM.
    public = serialization.load_pem_public_key(release_key["public_key_pem"].encode())
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert hashlib.sha256(raw).hexdigest() == release_key["keyid"]
    key = SSlibKey.from_crypto(public, keyid=release_key["keyid"])
    dsse = Envelope.from_dict(copy.deepcopy(envelope))  # from_dict mutates its argument
    assert set(dsse.verify([key], 1)) == {release_key["keyid"]}
    manifest = json.loads(dsse.payload)
    assert manifest["model"] == "detector" and manifest["version"] == "1.4.0" and manifest["counter"] == 1
    signed = {a["hardware"]: a for a in manifest["artifacts"]}
    assert set(signed) == set(models)
    for hardware, path in models.items():
        assert signed[hardware]["sha256"] == sha256sum(path)
        assert signed[hardware]["length"] == path.stat().st_size
        assert signed[hardware]["format"] == "onnx"

    # A tampered payload does not verify with the independent verifier either.
    manifest["artifacts"][0]["length"] += 1
    forged = Envelope.from_dict(
        {**copy.deepcopy(envelope), "payload": base64.b64encode(json.dumps(manifest).encode()).decode()}
    )
    with pytest.raises(VerificationError):
        forged.verify([key], 1)

    # Downloads: the whole file, and a byte range, both exact.
    whole = curl("GET", "/api/v1/models/detector/versions/1.4.0/artifacts/rpi5/download")
    assert whole == models["rpi5"].read_bytes()
    part = curl(
        "GET",
        "/api/v1/models/detector/versions/1.4.0/artifacts/rpi5/download",
        "-r",
        "1000000-1000999",
        expect=206,
    )
    assert part == models["rpi5"].read_bytes()[1_000_000:1_001_000]
    # Resume a partial download the way an agent does: curl -C - appends from the file's size.
    partial = tmp_path / "resume.part"
    partial.write_bytes(models["jetson-orin"].read_bytes()[:700_000])
    subprocess.run(
        [
            "curl",
            "-sS",
            "-f",
            "-C",
            "-",
            "-H",
            f"Authorization: Bearer {ci_token.secret}",
            "-o",
            str(partial),
            f"{live_server.url}/api/v1/models/detector/versions/1.4.0/artifacts/jetson-orin/download",
        ],
        check=True,
        timeout=60,
    )
    assert sha256sum(partial) == sha256sum(models["jetson-orin"])


def test_it_shows_curl_the_json_error_and_status(live_server, ci_token, tmp_path):
    curl = Curl(live_server.url, ci_token.secret, tmp_path)
    error = curl.json("POST", "/api/v1/models/", {"name": "bad name"}, expect=400)
    assert error["error"]["code"] == "invalid"
    anonymous = Curl(live_server.url, None, tmp_path)
    assert json.loads(anonymous("GET", "/api/v1/models/", expect=401))["error"]["code"] == "not_authenticated"
