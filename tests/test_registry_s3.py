"""S3 artifact storage against a real S3-compatible endpoint over HTTP (moto's standalone server
as a subprocess): upload → release → download, where the download is a presigned redirect."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from unittest import mock

import boto3
import pytest

from registry import artifacts
from registry.downloads import artifact_download_url
from registry.models import Artifact
from tests.support.net import free_port
from tests.support.onnx_models import linear_model
from tests.support.registry_api import create_hardware, create_model, create_version, upload, version_url

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "modelfleet-artifacts"
CREDENTIALS = {"access_key": "testing", "secret_key": "testing", "region_name": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto server did not start on {port}")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(10)
    log.close()


@pytest.fixture
def bucket(s3_endpoint, settings):
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    settings.STORAGES = {
        **settings.STORAGES,
        "artifacts": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": BUCKET,
                "endpoint_url": s3_endpoint,
                **CREDENTIALS,
                "querystring_expire": 300,
                "file_overwrite": False,
                "default_acl": None,
            },
        },
    }
    yield client
    for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=item["Key"])
    client.delete_bucket(Bucket=BUCKET)


def keys_in(client) -> list[str]:
    return [item["Key"] for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])]


@pytest.mark.django_db
def test_it_uploads_releases_and_redirects_downloads_to_a_presigned_url(
    client, ci_token, read_token, bucket, s3_endpoint
):
    data = linear_model(padding_bytes=300_000)
    create_hardware(client, ci_token, "rpi5")
    create_model(client, ci_token, "detector")
    create_version(client, ci_token, "detector", "1.0")

    uploaded = upload(
        client,
        ci_token,
        "detector",
        "1.0",
        hardware="rpi5",
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
    )
    assert uploaded.status_code == 201, uploaded.content
    artifact = Artifact.objects.get()
    assert keys_in(bucket) == [artifact.storage_key]
    assert bucket.get_object(Bucket=BUCKET, Key=artifact.storage_key)["Body"].read() == data
    released = client.post(f"{version_url('detector', '1.0')}/release", **ci_token.headers)
    assert released.status_code == 200

    download = client.get(f"{version_url('detector', '1.0')}/artifacts/rpi5/download", **read_token.headers)

    assert download.status_code == 302
    location = download["Location"]
    assert (
        location.startswith(f"{s3_endpoint}/{BUCKET}/") and "Signature" in location and "Expires" in location
    )
    with urllib.request.urlopen(location, timeout=10) as response:
        assert response.read() == data
    # Directives hand devices the server's endpoint, which redirects as above: a presigned URL
    # expires long before a directive does.
    assert artifact_download_url(artifact=artifact).endswith(
        f"{version_url('detector', '1.0')}/artifacts/rpi5/download"
    )
    ranged = urllib.request.Request(location, headers={"Range": "bytes=100-199"})
    with urllib.request.urlopen(ranged, timeout=10) as response:
        assert response.status == 206 and response.read() == data[100:200]
    unsigned = location.split("?")[0]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(unsigned, timeout=10)
    assert refused.value.code == 403


@pytest.mark.django_db
def test_it_deletes_the_object_when_the_database_write_fails(client, ci_token, bucket):
    create_hardware(client, ci_token, "rpi5")
    create_model(client, ci_token, "detector")
    create_version(client, ci_token, "detector", "1.0")
    with mock.patch.object(
        artifacts, "audit_record", autospec=True, side_effect=RuntimeError("database went away")
    ):
        response = upload(client, ci_token, "detector", "1.0", hardware="rpi5", data=linear_model())
    assert response.status_code == 500
    assert keys_in(bucket) == []
    assert Artifact.objects.count() == 0


def test_it_refuses_to_start_with_s3_storage_but_no_bucket(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("S3_")}
    env.update(
        ARTIFACT_STORAGE="s3",
        SECRET_KEY="x",
        DATA_DIR=str(tmp_path),
        DJANGO_SETTINGS_MODULE="config.settings",
    )
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "S3_BUCKET is required but not set" in result.stderr


def test_it_reaches_the_bucket_through_the_s3_environment_variables(bucket, s3_endpoint, tmp_path):
    # The fixtures above set STORAGES by hand; this proves config/settings.py builds the same from
    # ARTIFACT_STORAGE=s3 and the S3_* variables (as a deployment sets them) and that it works.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_"))}
    env.update(
        ARTIFACT_STORAGE="s3",
        S3_BUCKET=BUCKET,
        S3_ENDPOINT_URL=s3_endpoint,
        S3_REGION="us-east-1",
        S3_ACCESS_KEY_ID="testing",
        S3_SECRET_ACCESS_KEY="testing",
        S3_PRESIGN_SECONDS="120",
        SECRET_KEY="x",
        DATA_DIR=str(tmp_path),
        DJANGO_SETTINGS_MODULE="config.settings",
    )
    script = (
        "import django; django.setup()\n"
        "from django.core.files.base import ContentFile\n"
        "from django.core.files.storage import storages\n"
        "store = storages['artifacts']\n"
        "name = store.save('probe/env.bin', ContentFile(b'through the environment'))\n"
        "print(name); print(store.url(name))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    name, url = result.stdout.split()
    assert keys_in(bucket) == [name]
    assert bucket.get_object(Bucket=BUCKET, Key=name)["Body"].read() == b"through the environment"
    assert url.startswith(f"{s3_endpoint}/{BUCKET}/") and "Expires" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"through the environment"
