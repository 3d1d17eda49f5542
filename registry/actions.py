"""Registry business logic. Views, serializers, admin and commands call these functions and
nothing else writes registry state.

Every refusal raises registry.errors.ApiError with a stable `code`, so the API, the CLI and the
admin all report the same reason.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import uuid
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from pathlib import Path

from django.conf import settings
from django.core.files.storage import storages
from django.db import IntegrityError, transaction
from django.db.models import Max
from django.urls import reverse
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime
from django.utils.text import get_valid_filename

from agent import protocol
from agent.signing import RELEASE_PAYLOAD_TYPE, sign_envelope
from registry import keys
from registry.audit import audit_record
from registry.errors import ApiError, Conflict
from registry.models import (
    Alias,
    AliasMove,
    ApiToken,
    Artifact,
    HardwareTarget,
    Model,
    ModelVersion,
)

logger = logging.getLogger(__name__)

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SLUG_RE = re.compile(r"^[-a-zA-Z0-9_]{1,64}$")
# The release manifest travels inside each device's directive, which the agent caps at 64 KiB
# (agent.protocol.MAX_PAYLOAD_BYTES, after base64): golden I/O has to stay small.
HEALTH_MAX_BYTES = 24 * 1024
HEALTH_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
HEALTH_KEYS = ("inputs", "outputs", "atol", "rtol", "latency_budget_ms")


def artifact_storage():
    return storages["artifacts"]


def _not_found(message: str, code: str = "not_found") -> ApiError:
    return ApiError(message, code=code, status_code=404)


# --- lookups ---------------------------------------------------------------------------------


def model_get(*, name: str) -> Model:
    try:
        return Model.objects.get(name=name)
    except Model.DoesNotExist:
        raise _not_found(f"No model named '{name}'.", "model_not_found") from None


def version_get(*, model_name: str, version: str) -> ModelVersion:
    model = model_get(name=model_name)
    try:
        return ModelVersion.objects.select_related("model").get(model=model, version=version)
    except ModelVersion.DoesNotExist:
        raise _not_found(f"Model '{model_name}' has no version '{version}'.", "version_not_found") from None


def artifact_get(*, version: ModelVersion, hardware_id: str) -> Artifact:
    try:
        return version.artifacts.select_related("hardware").get(hardware_id=hardware_id)
    except Artifact.DoesNotExist:
        raise _not_found(
            f"{version} has no artifact for hardware '{hardware_id}'.", "artifact_not_found"
        ) from None


# --- hardware and models ---------------------------------------------------------------------


def hardware_create(*, id: str, description: str, max_artifact_bytes: int, actor: str) -> HardwareTarget:
    if HardwareTarget.objects.filter(pk=id).exists():
        raise Conflict(f"Hardware target '{id}' already exists.", code="hardware_exists")
    try:
        with transaction.atomic():
            hardware = HardwareTarget.objects.create(
                id=id, description=description, max_artifact_bytes=max_artifact_bytes
            )
            audit_record(
                actor=actor,
                action="hardware.create",
                obj=hardware,
                detail={"max_artifact_bytes": max_artifact_bytes},
            )
    except IntegrityError:
        raise Conflict(f"Hardware target '{id}' already exists.", code="hardware_exists") from None
    return hardware


def model_create(*, name: str, description: str = "", tags: list | None = None, actor: str) -> Model:
    if Model.objects.filter(name=name).exists():
        raise Conflict(f"Model '{name}' already exists.", code="model_exists")
    try:
        with transaction.atomic():
            model = Model.objects.create(name=name, description=description, tags=list(tags or []))
            audit_record(actor=actor, action="model.create", obj=model)
    except IntegrityError:
        raise Conflict(f"Model '{name}' already exists.", code="model_exists") from None
    return model


# --- versions --------------------------------------------------------------------------------


def _health_tensors(value, where: str) -> None:
    if not isinstance(value, dict) or not value:
        raise ApiError(f"{where} must be a non-empty object of tensors by name.", code="invalid_health")
    for name, tensor in value.items():
        w = f"{where}.{name}"
        if not isinstance(tensor, dict):
            raise ApiError(f"{w} must be an object with dtype, shape and data.", code="invalid_health")
        unknown = set(tensor) - {"dtype", "shape", "data"}
        if unknown:
            raise ApiError(f"{w} has unknown keys: {', '.join(sorted(unknown))}.", code="invalid_health")
        dtype = tensor.get("dtype")
        if dtype not in HEALTH_DTYPES:
            raise ApiError(
                f"{w}.dtype must be one of {', '.join(HEALTH_DTYPES)}; got {dtype!r}.", code="invalid_health"
            )
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ApiError(f"{w}.shape must be a list of non-negative integers.", code="invalid_health")
        data = tensor.get("data")
        if not isinstance(data, list):
            raise ApiError(f"{w}.data must be a flat list of numbers.", code="invalid_health")
        expected = math.prod(shape)
        if len(data) != expected:
            raise ApiError(
                f"{w}.data has {len(data)} values; shape {shape} needs {expected}.", code="invalid_health"
            )
        number = bool if dtype == "bool" else (int, float)
        if not all(isinstance(x, number) and (dtype == "bool" or not isinstance(x, bool)) for x in data):
            raise ApiError(
                f"{w}.data must hold only {'booleans' if dtype == 'bool' else 'numbers'}.",
                code="invalid_health",
            )


def health_contract_validate(health) -> None:
    """The contract the agent's precheck runs: golden inputs/outputs, tolerances, latency budget."""
    if health is None:
        return
    if not isinstance(health, dict):
        raise ApiError("health must be an object.", code="invalid_health")
    unknown = set(health) - set(HEALTH_KEYS)
    if unknown:
        raise ApiError(
            f"health has unknown keys: {', '.join(sorted(unknown))} (allowed: {', '.join(HEALTH_KEYS)}).",
            code="invalid_health",
        )
    if "inputs" in health:
        _health_tensors(health["inputs"], "health.inputs")
    if "outputs" in health:
        if "inputs" not in health:
            raise ApiError("health.outputs needs health.inputs to compare against.", code="invalid_health")
        _health_tensors(health["outputs"], "health.outputs")
    for name in ("atol", "rtol"):
        if name in health:
            value = health[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ApiError(f"health.{name} must be a non-negative number.", code="invalid_health")
    if "latency_budget_ms" in health:
        value = health["latency_budget_ms"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ApiError("health.latency_budget_ms must be a positive number.", code="invalid_health")
    size = len(protocol.encode_json(health))
    if size > HEALTH_MAX_BYTES:
        raise ApiError(
            f"health is {size} bytes of JSON, over the {HEALTH_MAX_BYTES}-byte limit "
            "(the signed manifest rides inside every device directive); use fewer golden values.",
            code="invalid_health",
        )


def version_create(
    *,
    model: Model,
    version: str,
    actor: str,
    metadata: dict | None = None,
    metrics: dict | None = None,
    provenance: dict | None = None,
    health: dict | None = None,
    rollback_floor: int = 0,
) -> ModelVersion:
    health_contract_validate(health)
    provenance = provenance or {}
    try:
        with transaction.atomic():
            # The Model row lock serialises concurrent creates, so max+1 is race-free.
            locked = Model.objects.select_for_update().get(pk=model.pk)
            if locked.versions.filter(version=version).exists():
                raise Conflict(
                    f"Model '{model.name}' already has version '{version}'.", code="version_exists"
                )
            counter = (locked.versions.aggregate(top=Max("counter"))["top"] or 0) + 1
            if rollback_floor > counter:
                raise ApiError(
                    f"rollback_floor {rollback_floor} is above this version's counter {counter}.",
                    code="invalid_rollback_floor",
                )
            created = ModelVersion.objects.create(
                model=locked,
                version=version,
                counter=counter,
                rollback_floor=rollback_floor,
                metadata=metadata or {},
                metrics=metrics or {},
                health=health,
                git_sha=provenance.get("git_sha", ""),
                ci_run_url=provenance.get("ci_run_url", ""),
                training_run_id=provenance.get("training_run_id", ""),
                created_by=actor,
            )
            audit_record(
                actor=actor,
                action="version.create",
                obj=created,
                detail={"counter": counter, "version": version},
            )
    except IntegrityError:
        raise Conflict(
            f"Model '{model.name}' already has version '{version}'.", code="version_exists"
        ) from None
    return created


def _require_draft(version: ModelVersion) -> None:
    if version.state != ModelVersion.State.DRAFT:
        raise Conflict(
            f"{version} is {version.state}; released versions are immutable, create a new version instead.",
            code="version_immutable",
            state=version.state,
        )


# --- artifacts -------------------------------------------------------------------------------


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
        _require_draft(version)
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
        if format == Artifact.Format.ONNX:
            # Imported here: onnx + numpy cost ~25 MB that workers not validating uploads never need.
            from registry.onnx_check import OnnxInvalid, onnx_validate

            path = getattr(upload, "temporary_file_path", None)
            if path is None:
                raise ApiError("ONNX validation needs the upload spooled to disk.", code="invalid_onnx")
            try:
                onnx_validate(path())
            except OnnxInvalid as exc:
                raise ApiError(
                    f"The file claims format onnx but is not a valid ONNX model: {exc}", code="invalid_onnx"
                ) from None

        file_name = get_valid_filename(Path(upload.name or "").name) or f"{hardware.id}.{format}"
        key = f"{version.model.name}/{version.version}/{hardware.id}/{uuid.uuid4().hex}/{file_name}"
        with transaction.atomic():
            # Lock the version so a concurrent release cannot sign without this artifact.
            locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
            _require_draft(locked)
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


# --- release ---------------------------------------------------------------------------------


def _provenance(version: ModelVersion) -> dict:
    return {
        "git_sha": version.git_sha,
        "ci_run_url": version.ci_run_url,
        "training_run_id": version.training_run_id,
        "approver": version.approver,
    }


def version_release(*, version: ModelVersion, actor: str, approver: str | None = None) -> dict:
    """Sign the release manifest with the release key and freeze the version. Returns the envelope."""
    private_key = keys.load_release_key()
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().select_related("model").get(pk=version.pk)
        _require_draft(locked)
        artifacts = list(locked.artifacts.order_by("hardware_id"))
        if not artifacts:
            raise ApiError(
                f"{locked} has no artifacts; upload at least one before releasing.", code="no_artifacts"
            )
        created = timezone.now().replace(microsecond=0)
        expires = created + timedelta(days=settings.RELEASE_VALIDITY_DAYS)
        locked.approver = approver or locked.approver or actor
        try:
            payload = protocol.build_release_payload(
                model=locked.model.name,
                version=locked.version,
                counter=locked.counter,
                rollback_floor=locked.rollback_floor,
                created=created,
                expires=expires,
                artifacts=[
                    {
                        "hardware": a.hardware_id,
                        "format": a.format,
                        "file_name": a.file_name,
                        "length": a.length,
                        "sha256": a.sha256,
                    }
                    for a in artifacts
                ],
                health=locked.health,
                provenance=_provenance(locked),
            )
        except protocol.ProtocolError as exc:
            raise ApiError(
                f"The release manifest would be refused by devices: {exc}", code="invalid_manifest"
            ) from None
        envelope = sign_envelope(payload, RELEASE_PAYLOAD_TYPE, private_key)
        locked.envelope = envelope
        locked.manifest_sha256 = hashlib.sha256(payload).hexdigest()
        locked.state = ModelVersion.State.RELEASED
        locked.released_at = created
        locked.released_by = actor
        locked.expires_at = expires
        locked.save()
        audit_record(
            actor=actor,
            action="version.release",
            obj=locked,
            detail={
                "version": str(locked),
                "counter": locked.counter,
                "manifest_sha256": locked.manifest_sha256,
                "keyid": envelope["signatures"][0]["keyid"],
            },
        )
    version.refresh_from_db()
    return envelope


def version_deprecate(*, version: ModelVersion, actor: str, reason: str = "") -> ModelVersion:
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        if locked.state != ModelVersion.State.RELEASED:
            raise Conflict(
                f"Only a released version can be deprecated; {version} is {locked.state}.",
                code="invalid_state",
            )
        locked.state = ModelVersion.State.DEPRECATED
        locked.save(update_fields=["state"])
        audit_record(actor=actor, action="version.deprecate", obj=locked, reason=reason)
    return locked


def version_revoke(*, version: ModelVersion, actor: str, reason: str = "") -> ModelVersion:
    """Revocation is a state: the row, its artifacts and its signed manifest stay for the record."""
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        if locked.state == ModelVersion.State.REVOKED:
            raise Conflict(f"{version} is already revoked.", code="invalid_state")
        previous = locked.state
        locked.state = ModelVersion.State.REVOKED
        locked.save(update_fields=["state"])
        audit_record(
            actor=actor,
            action="version.revoke",
            obj=locked,
            reason=reason,
            detail={"previous_state": previous},
        )
    return locked


def version_delete_draft(*, version: ModelVersion, actor: str) -> None:
    """Delete a draft and its stored files (after commit, so a rollback loses no bytes)."""
    storage = artifact_storage()
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        _require_draft(locked)
        keys_to_delete = list(locked.artifacts.values_list("storage_key", flat=True))
        audit_record(actor=actor, action="version.delete", obj=locked, detail={"version": str(locked)})
        locked.delete()
        transaction.on_commit(lambda: [storage.delete(key) for key in keys_to_delete])


def artifact_download_path(*, artifact: Artifact) -> str:
    """This server's download endpoint for an artifact (path only, no host). The one place its
    URL is built: the API shows it, directives hand it to devices (absolute, below)."""
    return reverse(
        "registry:artifact-download",
        kwargs={
            "name": artifact.version.model.name,
            "version": artifact.version.version,
            "hardware": artifact.hardware_id,
        },
    )


def artifact_download_url(*, artifact: Artifact) -> str:
    """Where a device fetches an artifact: this server's endpoint under PUBLIC_URL (device-token
    auth). With an object store the endpoint answers with a redirect to a short-lived presigned
    URL, which a directive valid for weeks could not carry itself."""
    return f"{settings.PUBLIC_URL}{artifact_download_path(artifact=artifact)}"


def artifact_delete_draft(*, artifact: Artifact, actor: str) -> None:
    storage = artifact_storage()
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=artifact.version_id)
        _require_draft(locked)
        key = artifact.storage_key
        audit_record(
            actor=actor,
            action="artifact.delete",
            obj=artifact,
            detail={"version": str(locked), "hardware": artifact.hardware_id},
        )
        artifact.delete()
        transaction.on_commit(lambda: storage.delete(key))


# --- aliases ---------------------------------------------------------------------------------


def alias_set(*, model: Model, name: str, version_name: str, actor: str) -> Alias:
    if not SLUG_RE.match(name or ""):
        raise ApiError("Alias names use 1-64 letters, digits, '-' or '_'.", code="invalid_alias")
    try:
        target = model.versions.get(version=version_name)
    except ModelVersion.DoesNotExist:
        raise _not_found(
            f"Model '{model.name}' has no version '{version_name}'.", "version_not_found"
        ) from None
    if target.state not in (ModelVersion.State.RELEASED, ModelVersion.State.DEPRECATED):
        raise Conflict(
            f"{target} is {target.state}; an alias may only point at a released (or deprecated) version.",
            code="version_not_released",
            state=target.state,
        )
    with transaction.atomic():
        alias = Alias.objects.select_for_update().filter(model=model, name=name).first()
        now = timezone.now()
        if alias is None:
            alias = Alias.objects.create(
                model=model, name=name, version=target, updated_at=now, updated_by=actor
            )
            previous = None
        elif alias.version_id == target.pk:
            return alias  # already there: not a move, nothing to record
        else:
            previous = alias.version
            alias.version, alias.updated_at, alias.updated_by = target, now, actor
            alias.save()
        AliasMove.objects.create(
            alias=alias, from_version=previous, to_version=target, moved_by=actor, moved_at=now
        )
        audit_record(
            actor=actor,
            action="alias.move",
            obj=alias,
            detail={
                "alias": str(alias),
                "from": previous.version if previous else None,
                "to": target.version,
            },
        )
    return alias


def parse_instant(value: str) -> datetime:
    """ISO 8601 date-time; naive means UTC; a bare date means 00:00 UTC that day."""
    value = (value or "").strip().replace(" ", "+")  # '+' arrives as a space from unencoded query strings
    parsed = parse_datetime(value) if value else None
    if parsed is None and value:
        day = parse_date(value) if len(value) == 10 else None
        parsed = datetime(day.year, day.month, day.day) if day else None
    if parsed is None:
        raise ApiError(
            f"'at' must be an ISO 8601 date-time such as 2026-01-31T12:00:00Z; got {value!r}.",
            code="invalid_at",
        )
    if timezone.is_naive(parsed):
        parsed = parsed.replace(tzinfo=dt_timezone.utc)
    return parsed


def aliases_list(*, model: Model, at: datetime | None = None) -> list[dict]:
    """Each alias with its history; with `at`, the alias as it stood at that instant."""
    result = []
    for alias in model.aliases.all():
        moves = alias.moves.select_related("from_version", "to_version")
        if at is not None:
            moves = moves.filter(moved_at__lte=at)
        moves = list(moves)  # newest first
        if at is not None and not moves:
            continue  # the alias did not exist yet
        current = moves[0] if at is not None else None
        result.append(
            {
                "name": alias.name,
                "version": current.to_version.version if current else alias.version.version,
                "updated_at": current.moved_at if current else alias.updated_at,
                "updated_by": current.moved_by if current else alias.updated_by,
                "history": [
                    {
                        "from_version": m.from_version.version if m.from_version else None,
                        "to_version": m.to_version.version,
                        "moved_by": m.moved_by,
                        "moved_at": m.moved_at,
                    }
                    for m in moves
                ],
            }
        )
    return result


# --- tokens ----------------------------------------------------------------------------------


def token_create(*, name: str, scope: str, actor: str) -> tuple[ApiToken, str]:
    """Returns the token row and its secret; only a hash of the secret is stored."""
    scopes = [choice.value for choice in ApiToken.Scope]
    if scope not in scopes:
        raise ApiError(f"scope must be one of {', '.join(scopes)}; got {scope!r}.", code="invalid_scope")
    if not name or len(name) > 100:
        raise ApiError("A token needs a name of 1-100 characters.", code="invalid_name")
    if ApiToken.objects.filter(name=name, revoked_at__isnull=True).exists():
        raise Conflict(
            f"An active token named '{name}' already exists; revoke it first.", code="token_exists"
        )
    secret = ApiToken.new_secret()
    with transaction.atomic():
        token = ApiToken.objects.create(
            name=name,
            scope=scope,
            prefix=secret[:8],
            token_hash=ApiToken.hash_secret(secret),
            created_by=actor,
        )
        audit_record(actor=actor, action="token.create", obj=token, detail={"name": name, "scope": scope})
    return token, secret


def tokens_revoke(*, tokens, actor: str) -> int:
    """Revoke the still-active tokens among `tokens` (a queryset); returns how many."""
    count = 0
    with transaction.atomic():
        now = timezone.now()
        for token in tokens.select_for_update().filter(revoked_at__isnull=True):
            token.revoked_at = now
            token.save(update_fields=["revoked_at"])
            audit_record(actor=actor, action="token.revoke", obj=token, detail={"name": token.name})
            count += 1
    return count


def token_revoke(*, name: str, actor: str) -> int:
    count = tokens_revoke(tokens=ApiToken.objects.filter(name=name), actor=actor)
    if not count:
        raise _not_found(f"No active token named '{name}'.", "token_not_found")
    return count
