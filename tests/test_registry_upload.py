"""Artifact upload: streamed, hashed, validated; every refusal is a specific JSON error and leaves
nothing behind in the artifact store, the upload spool or the database."""

from __future__ import annotations

import pytest

from registry.models import Artifact, AuditEntry, ModelVersion
from tests.support.onnx_models import linear_model
from tests.support.registry_api import (
    create_hardware,
    create_model,
    create_version,
    files_under,
    sha256_hex,
    upload,
    version_url,
)
from tests.support.tflite_models import tflite_linear_model

pytestmark = pytest.mark.django_db

MODEL = linear_model()


@pytest.fixture
def draft(client, ci_token):
    create_hardware(client, ci_token, "jetson-orin", max_bytes=1_000_000)
    create_model(client, ci_token, "detector")
    create_version(client, ci_token, "detector", "1.0.0")
    return ("detector", "1.0.0")


def assert_clean(isolated_storage, settings):
    assert files_under(isolated_storage) == []
    assert files_under(settings.FILE_UPLOAD_TEMP_DIR) == []
    assert Artifact.objects.count() == 0
    assert not AuditEntry.objects.filter(action="artifact.upload").exists()


def error_of(response) -> dict:
    assert response["Content-Type"].startswith("application/json")
    return response.json()["error"]


def test_it_stores_a_real_onnx_model_with_its_hash_and_length(
    client, ci_token, draft, isolated_storage, settings
):
    response = upload(client, ci_token, *draft, hardware="jetson-orin", data=MODEL, sha256=sha256_hex(MODEL))

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["sha256"] == sha256_hex(MODEL)
    assert body["length"] == len(MODEL)
    assert (
        body["hardware"] == "jetson-orin" and body["format"] == "onnx" and body["file_name"] == "model.onnx"
    )
    assert body["download_url"].endswith(f"{version_url(*draft)}/artifacts/jetson-orin/download")
    stored = files_under(isolated_storage)
    assert len(stored) == 1 and stored[0].read_bytes() == MODEL
    artifact = Artifact.objects.get()
    assert (isolated_storage / artifact.storage_key).read_bytes() == MODEL
    assert files_under(settings.FILE_UPLOAD_TEMP_DIR) == []


def test_it_refuses_a_sha256_mismatch_naming_both_hashes(client, ci_token, draft, isolated_storage, settings):
    wrong = "0" * 64
    response = upload(client, ci_token, *draft, hardware="jetson-orin", data=MODEL, sha256=wrong)

    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "sha256_mismatch"
    assert wrong in error["message"] and sha256_hex(MODEL) in error["message"]
    assert error["expected"] == wrong and error["actual"] == sha256_hex(MODEL)
    assert_clean(isolated_storage, settings)


def test_it_refuses_a_file_over_the_hardware_budget_naming_the_limit(
    client, ci_token, draft, isolated_storage, settings
):
    create_hardware(client, ci_token, "big-server", max_bytes=100_000_000)  # so the file is spooled whole
    big = linear_model(padding_bytes=1_200_000)
    response = upload(client, ci_token, *draft, hardware="jetson-orin", data=big)

    assert response.status_code == 413
    error = error_of(response)
    assert error["code"] == "over_budget"
    assert "1000000-byte limit" in error["message"] and "jetson-orin" in error["message"]
    assert error["limit"] == 1_000_000 and error["length"] == len(big)
    assert_clean(isolated_storage, settings)


def test_it_stops_writing_a_file_once_it_outgrows_every_budget(
    client, ci_token, draft, isolated_storage, settings
):
    big = linear_model(padding_bytes=3_000_000)  # past 1 MB, the largest budget there is, it is dropped
    response = upload(client, ci_token, *draft, hardware="jetson-orin", data=big)

    assert response.status_code == 413
    error = error_of(response)
    assert error["code"] == "over_budget" and error["limit"] == 1_000_000
    assert "1000000-byte limit of hardware 'jetson-orin'" in error["message"]
    assert_clean(isolated_storage, settings)


def test_it_names_the_largest_budget_when_the_hardware_field_comes_after_the_file(
    client, ci_token, draft, isolated_storage, settings
):
    from django.core.files.uploadedfile import SimpleUploadedFile

    form = {
        "file": SimpleUploadedFile("m.onnx", linear_model(padding_bytes=3_000_000)),
        "hardware": "jetson-orin",
        "format": "onnx",
    }
    response = client.post(f"{version_url(*draft)}/artifacts/", form, **ci_token.headers)

    assert response.status_code == 413
    error = error_of(response)
    assert error["code"] == "over_budget"
    assert "larger than 1000000 bytes, the largest budget of any hardware target" in error["message"]
    assert_clean(isolated_storage, settings)


def test_it_refuses_an_unknown_hardware_id(client, ci_token, draft, isolated_storage, settings):
    response = upload(client, ci_token, *draft, hardware="toaster-9000", data=MODEL)

    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "unknown_hardware"
    assert "toaster-9000" in error["message"] and "jetson-orin" in error["message"]
    assert_clean(isolated_storage, settings)


@pytest.mark.parametrize(
    "data",
    [b"definitely not a protobuf", MODEL[: len(MODEL) // 2], linear_model(padding_bytes=200_000)[:-10]],
    ids=["text", "truncated-small", "truncated-weights"],
)
def test_it_refuses_a_file_that_claims_onnx_but_does_not_parse(
    client, ci_token, draft, isolated_storage, settings, data
):
    response = upload(client, ci_token, *draft, hardware="jetson-orin", data=data)

    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "invalid_onnx"
    assert "not a valid ONNX model" in error["message"]
    assert_clean(isolated_storage, settings)


def test_it_refuses_onnx_that_the_onnx_checker_rejects(client, ci_token, draft, isolated_storage, settings):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("NoSuchOperator", ["x"], ["x2"])], "g", [x], [x])
    bogus = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()

    response = upload(client, ci_token, *draft, hardware="jetson-orin", data=bogus)

    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "invalid_onnx" and "NoSuchOperator" in error["message"]
    assert_clean(isolated_storage, settings)


def test_it_accepts_other_formats_without_onnx_parsing(client, ci_token, draft, isolated_storage):
    response = upload(
        client,
        ci_token,
        *draft,
        hardware="jetson-orin",
        data=tflite_linear_model(),  # a real one: a tflite upload must carry the TFLite file identifier
        fmt="tflite",
        file_name="model.tflite",
    )
    assert response.status_code == 201, response.content
    assert response.json()["format"] == "tflite"


def test_it_refuses_a_duplicate_version_with_409(client, ci_token, draft):
    response = client.post(
        "/api/v1/models/detector/versions/",
        {"version": "1.0.0"},
        content_type="application/json",
        **ci_token.headers,
    )
    assert response.status_code == 409
    error = error_of(response)
    assert error["code"] == "version_exists" and "1.0.0" in error["message"]
    assert ModelVersion.objects.filter(version="1.0.0").count() == 1
    assert AuditEntry.objects.filter(action="version.create").count() == 1


def test_it_refuses_an_upload_to_a_released_version_with_409(
    client, ci_token, draft, isolated_storage, settings
):
    assert upload(client, ci_token, *draft, hardware="jetson-orin", data=MODEL).status_code == 201
    assert client.post(f"{version_url(*draft)}/release", **ci_token.headers).status_code == 200
    before = sorted(files_under(isolated_storage))
    create_hardware(client, ci_token, "rpi5")

    response = upload(client, ci_token, *draft, hardware="rpi5", data=MODEL)

    assert response.status_code == 409
    error = error_of(response)
    assert error["code"] == "version_immutable" and "released" in error["message"]
    assert sorted(files_under(isolated_storage)) == before
    assert files_under(settings.FILE_UPLOAD_TEMP_DIR) == []
    assert Artifact.objects.count() == 1


def test_it_refuses_a_second_artifact_for_the_same_hardware(
    client, ci_token, draft, isolated_storage, settings
):
    assert upload(client, ci_token, *draft, hardware="jetson-orin", data=MODEL).status_code == 201
    before = sorted(files_under(isolated_storage))

    response = upload(client, ci_token, *draft, hardware="jetson-orin", data=linear_model(scale=3.0))

    assert response.status_code == 409
    assert error_of(response)["code"] == "artifact_exists"
    assert sorted(files_under(isolated_storage)) == before
    assert Artifact.objects.count() == 1


@pytest.mark.parametrize(
    ("form", "code"),
    [
        ({"format": "onnx"}, "hardware_missing"),
        ({"hardware": "jetson-orin", "format": "pytorch"}, "invalid_format"),
        ({"hardware": "jetson-orin", "format": "onnx", "sha256": "abc"}, "invalid_sha256"),
    ],
)
def test_it_names_each_bad_form_field(client, ci_token, draft, isolated_storage, settings, form, code):
    from django.core.files.uploadedfile import SimpleUploadedFile

    response = client.post(
        f"{version_url(*draft)}/artifacts/",
        {**form, "file": SimpleUploadedFile("m.onnx", MODEL)},
        **ci_token.headers,
    )
    assert response.status_code == 400
    assert error_of(response)["code"] == code
    assert_clean(isolated_storage, settings)


def test_it_refuses_a_request_without_a_file(client, ci_token, draft, isolated_storage, settings):
    response = client.post(
        f"{version_url(*draft)}/artifacts/", {"hardware": "jetson-orin", "format": "onnx"}, **ci_token.headers
    )
    assert response.status_code == 400
    assert error_of(response)["code"] == "file_missing"
    assert_clean(isolated_storage, settings)


def test_it_cleans_the_store_when_the_database_write_fails(
    client, ci_token, draft, isolated_storage, settings
):
    from unittest import mock

    from registry import artifacts

    # The failure strikes after the file is in the store and the row is written, inside the
    # transaction: both must disappear.
    with mock.patch.object(
        artifacts, "audit_record", autospec=True, side_effect=RuntimeError("database went away")
    ):
        response = upload(client, ci_token, *draft, hardware="jetson-orin", data=MODEL)

    assert response.status_code == 500
    assert error_of(response)["code"] == "server_error"
    assert_clean(isolated_storage, settings)
