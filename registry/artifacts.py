"""Artifacts: the artifact store, uploading a file to a draft (hashing, size budget, format check,
ONNX and TFLite model checks, the version's health contract against the model's inputs and
outputs, then store and row together or neither), and deleting one from a draft."""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.core.files.storage import storages
from django.db import transaction
from django.utils.text import get_valid_filename

from agent.admission import safe_file_name
from registry.audit import audit_record
from registry.errors import ApiError, Conflict
from registry.health import health_contract_check_model
from registry.models import Artifact, HardwareTarget, ModelVersion
from registry.versions import require_draft

logger = logging.getLogger(__name__)

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def artifact_storage():
    return storages["artifacts"]


def upload_discard(upload) -> None:
    """Close and delete a spooled upload now rather than at the end of the request."""
    if upload is None:
        return
    path = upload.temporary_file_path() if hasattr(upload, "temporary_file_path") else None
    try:
        upload.close()
    except OSError:
        pass
    if path:
        Path(path).unlink(missing_ok=True)


def _digest_of(upload) -> tuple[str, int]:
    if getattr(upload, "sha256", None) is not None:
        return upload.sha256, upload.length
    # Not from HashingUploadHandler (e.g. a handler override): hash it in chunks, never whole.
    digest, length = hashlib.sha256(), 0
    upload.seek(0)
    for chunk in upload.chunks():
        digest.update(chunk)
        length += len(chunk)
    upload.seek(0)
    return digest.hexdigest(), length


def _onnx_reader():
    # Imported here: onnx + numpy cost ~25 MB that workers not validating uploads never need.
    from registry.onnx_check import OnnxInvalid, onnx_io, onnx_validate

    return onnx_validate, OnnxInvalid, onnx_io


def _tflite_reader():
    from registry.tflite_check import TfliteInvalid, tflite_validate

    return tflite_validate, TfliteInvalid, lambda declared: declared  # validate returns (inputs, outputs)


@dataclass(frozen=True)
class _ModelCheck:
    """What _model_check needs to know of one model format."""

    label: str  # the format as messages spell it
    is_not: str  # what a file that fails validation is said not to be
    code: str  # the error code of both refusals
    # Imports the format's reader and returns (validate: path -> model, the error validate raises,
    # model -> (inputs, outputs)).
    reader: Callable[[], tuple[Callable[[str], Any], type[Exception], Callable[[Any], tuple]]]


# The formats whose uploads are read and checked; the others are stored as sent.
_MODEL_CHECKS = {
    Artifact.Format.ONNX: _ModelCheck("ONNX", "a valid ONNX model", "invalid_onnx", _onnx_reader),
    Artifact.Format.TFLITE: _ModelCheck("TFLite", "a TFLite model", "invalid_tflite", _tflite_reader),
}


def _model_check(
    check: _ModelCheck, *, format: str, upload, version: ModelVersion, hardware: HardwareTarget
) -> None:
    """Refuse (ApiError check.code) an upload that is not spooled to disk or is not a valid model
    of its format; then hold the version's health contract against the model's declared inputs
    and outputs (health_contract_check_model, which raises its own refusal)."""
    validate, invalid, declared_io = check.reader()
    path = getattr(upload, "temporary_file_path", None)
    if path is None:
        raise ApiError(f"{check.label} validation needs the upload spooled to disk.", code=check.code)
    try:
        model = validate(path())
    except invalid as exc:
        raise ApiError(
            f"The file claims format {format} but is not {check.is_not}: {exc}", code=check.code
        ) from None
    # A contract given at version create is held against each model as it arrives.
    health_contract_check_model(
        version.health, *declared_io(model), where=f"uploaded for hardware '{hardware.id}'"
    )


def artifact_upload(
    *,
    version: ModelVersion,
    hardware_id: str | None,
    format: str | None,
    upload,
    expected_sha256: str | None,
    actor: str,
    stopped_over_bytes: int | None = None,
) -> Artifact:
    """Validate a spooled upload and move it into the artifact store with its DB row.

    `stopped_over_bytes`: the upload handler dropped the file mid-stream at this many bytes (the
    largest budget of any hardware target). On any refusal or failure the temporary file, the
    stored object and the row are all gone.
    """
    stored_key = None
    storage = artifact_storage()
    try:
        require_draft(version)
        if (
            stopped_over_bytes is not None
            and not HardwareTarget.objects.filter(pk=hardware_id or "").exists()
        ):
            raise ApiError(
                f"The file is larger than {stopped_over_bytes} bytes, the largest budget of any hardware target.",
                code="over_budget",
                status_code=413,
                limit=stopped_over_bytes,
            )
        if upload is None and stopped_over_bytes is None:
            raise ApiError("The multipart field 'file' is required.", code="file_missing")
        if not hardware_id:
            raise ApiError("The multipart field 'hardware' is required.", code="hardware_missing")
        hardware = HardwareTarget.objects.filter(pk=hardware_id).first()
        if hardware is None:
            known = list(HardwareTarget.objects.order_by("id").values_list("id", flat=True)[:20])
            raise ApiError(
                f"Unknown hardware id '{hardware_id}'; known: {', '.join(known) or 'none (create one first)'}.",
                code="unknown_hardware",
            )
        formats = [choice.value for choice in Artifact.Format]
        if format not in formats:
            raise ApiError(
                f"format must be one of {', '.join(formats)}; got {format!r}.", code="invalid_format"
            )
        # The agent's own rule: a name every device would refuse (hidden, a dot name, a path)
        # is refused here, before it is stored and signed into a release no device installs.
        sent_name = getattr(upload, "name", None) or ""
        if sent_name and not safe_file_name(sent_name):
            raise ApiError(
                f"file name {sent_name!r} would be refused by every agent: it must be one plain, "
                "non-hidden file name (no path separators, not starting with '.').",
                code="invalid_file_name",
            )
        if stopped_over_bytes is not None:
            raise ApiError(
                f"The file is larger than the {hardware.max_artifact_bytes}-byte limit of hardware '{hardware.id}'.",
                code="over_budget",
                status_code=413,
                limit=hardware.max_artifact_bytes,
            )
        if expected_sha256 is not None:
            expected_sha256 = expected_sha256.strip().lower()
            if not SHA256_RE.match(expected_sha256):
                raise ApiError("sha256 must be 64 hexadecimal characters.", code="invalid_sha256")
        sha256, length = _digest_of(upload)
        if expected_sha256 is not None and expected_sha256 != sha256:
            raise ApiError(
                f"sha256 mismatch: the client sent {expected_sha256} but the uploaded bytes hash to {sha256}.",
                code="sha256_mismatch",
                expected=expected_sha256,
                actual=sha256,
            )
        if length == 0:
            raise ApiError("The uploaded file is empty.", code="empty_file")
        if length > hardware.max_artifact_bytes:
            raise ApiError(
                f"The file is {length} bytes, over the {hardware.max_artifact_bytes}-byte limit "
                f"of hardware '{hardware.id}'.",
                code="over_budget",
                status_code=413,
                limit=hardware.max_artifact_bytes,
                length=length,
            )
        if version.artifacts.filter(hardware=hardware).exists():
            raise Conflict(
                f"{version} already has an artifact for hardware '{hardware.id}'.", code="artifact_exists"
            )
        check = _MODEL_CHECKS.get(format)
        if check is not None:
            _model_check(check, format=format, upload=upload, version=version, hardware=hardware)

        file_name = get_valid_filename(Path(upload.name or "").name) or f"{hardware.id}.{format}"
        key = f"{version.model.name}/{version.version}/{hardware.id}/{uuid.uuid4().hex}/{file_name}"
        with transaction.atomic():
            # Lock the version so a concurrent release cannot sign without this artifact.
            locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
            require_draft(locked)
            if locked.artifacts.filter(hardware=hardware).exists():
                raise Conflict(
                    f"{version} already has an artifact for hardware '{hardware.id}'.", code="artifact_exists"
                )
            stored_key = storage.save(key, upload)
            artifact = Artifact.objects.create(
                version=locked,
                hardware=hardware,
                format=format,
                file_name=file_name,
                length=length,
                sha256=sha256,
                storage_key=stored_key,
            )
            audit_record(
                actor=actor,
                action="artifact.upload",
                obj=artifact,
                detail={"version": str(locked), "hardware": hardware.id, "sha256": sha256, "length": length},
            )
        return artifact
    except BaseException:
        # Covers refusals, storage errors, DB errors and a failed COMMIT alike.
        if stored_key is not None:
            try:
                storage.delete(stored_key)
            except Exception:  # the original error matters more; log the leftover
                logger.exception("could not delete stored artifact %s after a failed upload", stored_key)
        upload_discard(upload)
        raise


def artifact_delete_draft(*, artifact: Artifact, actor: str) -> None:
    storage = artifact_storage()
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=artifact.version_id)
        require_draft(locked)
        key = artifact.storage_key
        audit_record(
            actor=actor,
            action="artifact.delete",
            obj=artifact,
            detail={"version": str(locked), "hardware": artifact.hardware_id},
        )
        artifact.delete()
        transaction.on_commit(lambda: storage.delete(key))
