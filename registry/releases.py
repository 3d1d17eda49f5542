"""A version after its creation: releasing it (each ONNX artifact checked as a device will check
it, registry.release_check; the manifest signed with the release key, or offline by registered
release keys elsewhere, registry.keys; the version frozen),
deprecating it, revoking it; or, while still a draft, deleting it."""

from __future__ import annotations

import base64
import binascii
import hashlib
from datetime import timedelta

from cryptography.exceptions import InvalidSignature

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agent import protocol
from agent.signing import RELEASE_PAYLOAD_TYPE, load_public_key_pem, pae, sign_envelope
from registry import keys
from registry.artifacts import artifact_storage
from registry.audit import audit_record, audit_values
from registry.errors import ApiError, Conflict
from registry.models import ModelVersion
from registry.release_check import release_check
from registry.signals import version_released
from registry.versions import require_draft


def _provenance(version: ModelVersion) -> dict:
    return {
        "git_sha": version.git_sha,
        "ci_run_url": version.ci_run_url,
        "training_run_id": version.training_run_id,
        "approver": version.approver,
    }


def _artifact_entries(artifacts) -> list[dict]:
    return [
        {"hardware": a.hardware_id, "format": a.format, "file_name": a.file_name, "length": a.length,
         "sha256": a.sha256}
        for a in artifacts
    ]


def release_payload(*, version: ModelVersion, artifacts, created, approver: str) -> bytes:
    """The exact manifest bytes a release of `version` signs: the one builder behind online
    signing, the manifest-payload endpoint and the check of offline signatures."""
    try:
        return protocol.build_release_payload(
            model=version.model.name,
            version=version.version,
            counter=version.counter,
            rollback_floor=version.rollback_floor,
            created=created,
            expires=created + timedelta(days=settings.RELEASE_VALIDITY_DAYS),
            artifacts=_artifact_entries(artifacts),
            health=version.health,
            provenance={**_provenance(version), "approver": approver},
        )
    except protocol.ProtocolError as exc:
        raise ApiError(
            f"The release manifest would be refused by devices: {exc}", code="invalid_manifest"
        ) from None


def _require_artifacts(version: ModelVersion, artifacts: list) -> None:
    if not artifacts:
        raise ApiError(f"{version} has no artifacts; upload at least one before releasing.", code="no_artifacts")


def version_manifest_payload(*, version: ModelVersion, actor: str, approver: str | None = None) -> dict:
    """What offline signers sign for releasing this draft now: payloadType, the payload (base64)
    and its sha256. The payload names its creation time, so it can be signed later
    (within OFFLINE_PAYLOAD_MAX_AGE) and is still the payload the server rebuilds."""
    current = ModelVersion.objects.select_related("model").get(pk=version.pk)
    require_draft(current)
    artifacts = list(current.artifacts.order_by("hardware_id"))
    _require_artifacts(current, artifacts)
    created = timezone.now().replace(microsecond=0)
    payload = release_payload(
        version=current, artifacts=artifacts, created=created, approver=approver or current.approver or actor
    )
    return {
        "payloadType": RELEASE_PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "threshold": keys.release_threshold(),
    }


# Offline signatures may take a while to gather (keys kept apart); a payload older than this is
# refused, so a forgotten signed payload cannot be released much later with an expiry running out.
OFFLINE_PAYLOAD_MAX_AGE = timedelta(days=7)
CLOCK_SKEW = timedelta(minutes=5)


def _offline_payload(locked: ModelVersion, artifacts: list, payload_b64: str | None) -> tuple[bytes, str]:
    """The signed payload, checked to be exactly what this server would sign for the version now
    (same artifacts, counter, health, provenance). Returns (payload, approver it names)."""
    if not payload_b64:
        raise ApiError(
            "RELEASE_SIGNING=offline: send the payload from GET .../manifest-payload with its signatures.",
            code="payload_required",
        )
    try:
        payload = base64.b64decode(payload_b64, validate=True)
        manifest = protocol.parse_release(payload)
    except (binascii.Error, ValueError, protocol.ProtocolError) as exc:
        raise ApiError(f"payload is not a base64 release manifest: {exc}", code="payload_invalid") from None
    now = timezone.now()
    if not now - OFFLINE_PAYLOAD_MAX_AGE <= manifest.created <= now + CLOCK_SKEW:
        raise ApiError(
            f"The payload was made at {protocol.format_time(manifest.created)}; payloads older than "
            f"{OFFLINE_PAYLOAD_MAX_AGE.days} days (or from the future) are refused. Fetch manifest-payload again.",
            code="payload_stale",
        )
    approver = str(manifest.provenance.get("approver") or "")
    expected = release_payload(version=locked, artifacts=artifacts, created=manifest.created, approver=approver)
    if payload != expected:
        raise ApiError(
            f"The payload is not the manifest {locked} would be released with (its artifacts, health or "
            "metadata differ); fetch manifest-payload again and sign that.",
            code="payload_mismatch",
        )
    return payload, approver


def _require_signatures(signatures: list[dict] | None) -> None:
    if not signatures:
        raise ApiError(
            "RELEASE_SIGNING=offline: this server holds no release key; sign the payload from "
            "GET .../manifest-payload (`fleetctl push --sign-with KEY.pem`) and send the signatures.",
            code="signature_required",
        )


def _offline_envelope(payload: bytes, signatures: list[dict]) -> dict:
    """A DSSE envelope holding the valid signatures, or ApiError naming what is wrong. Every
    signature must be by a registered, unrevoked release key and verify; then at least the
    threshold of distinct keys must have signed."""
    _require_signatures(signatures)
    trusted = {info.keyid: info for info in keys.registered_release_keys()}
    message = pae(RELEASE_PAYLOAD_TYPE, payload)
    unknown = [s["keyid"] for s in signatures if s["keyid"] not in trusted]
    if unknown:
        raise ApiError(
            f"Signed by key(s) not registered (or revoked) as release keys: {', '.join(unknown)}.",
            code="unknown_key",
            keyids=unknown,
        )
    valid: dict[str, str] = {}
    for entry in signatures:
        key = load_public_key_pem(trusted[entry["keyid"]].public_key_pem)
        try:
            key.verify(base64.b64decode(entry["sig"], validate=True), message)
        except (InvalidSignature, binascii.Error, ValueError):
            raise ApiError(
                f"The signature by key {entry['keyid']} does not verify over the payload.",
                code="signature_invalid",
                keyid=entry["keyid"],
            ) from None
        valid.setdefault(entry["keyid"], entry["sig"])
    needed = keys.release_threshold()
    if len(valid) < needed:
        raise ApiError(
            f"{len(valid)} distinct release key(s) signed; RELEASE_SIGNATURE_THRESHOLD needs {needed}.",
            code="signature_threshold",
            signed=len(valid),
            threshold=needed,
        )
    return {
        "payloadType": RELEASE_PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [{"keyid": keyid, "sig": sig} for keyid, sig in valid.items()],
    }


def version_release(
    *,
    version: ModelVersion,
    actor: str,
    approver: str | None = None,
    payload: str | None = None,
    signatures: list[dict] | None = None,
) -> dict:
    """Check each artifact as a device will (registry.release_check: a precheck runtime for its
    format, the health contract against the model, the device precheck run on it), sign the
    release manifest with the release key (online) or check the signatures made elsewhere over
    `payload` (offline, base64 from version_manifest_payload), and freeze the version. Returns
    the envelope."""
    current = ModelVersion.objects.select_related("model").get(pk=version.pk)
    require_draft(current)
    offline = keys.offline_signing()
    if not offline and (signatures or payload):
        raise ApiError(
            "This server signs releases itself (RELEASE_SIGNING=online); send no payload or signatures.",
            code="online_signing",
        )
    private_key = None if offline else keys.load_release_key()
    if offline:
        _require_signatures(signatures)  # before the slow checks
    # Checked before the row lock (a precheck takes seconds); the lock then makes sure the
    # artifacts signed are the ones checked.
    checked = list(current.artifacts.order_by("hardware_id"))
    if checked:
        release_check(current, checked)
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().select_related("model").get(pk=version.pk)
        require_draft(locked)
        artifacts = list(locked.artifacts.order_by("hardware_id"))
        _require_artifacts(locked, artifacts)
        if [(a.pk, a.sha256) for a in artifacts] != [(a.pk, a.sha256) for a in checked]:
            raise Conflict(
                f"The artifacts of {locked} changed while its release was being checked; release it again.",
                code="artifacts_changed",
            )
        if offline:
            signed, locked.approver = _offline_payload(locked, artifacts, payload)
            envelope = _offline_envelope(signed, signatures or [])
            created = protocol.parse_release(signed).created
        else:
            created = timezone.now().replace(microsecond=0)
            locked.approver = approver or locked.approver or actor
            signed = release_payload(version=locked, artifacts=artifacts, created=created, approver=locked.approver)
            envelope = sign_envelope(signed, RELEASE_PAYLOAD_TYPE, private_key)
        before = audit_values(locked, ["state", "released_at", "released_by", "expires_at", "approver"])
        locked.envelope = envelope
        locked.manifest_sha256 = hashlib.sha256(signed).hexdigest()
        locked.state = ModelVersion.State.RELEASED
        locked.released_at = created
        locked.released_by = actor
        locked.expires_at = created + timedelta(days=settings.RELEASE_VALIDITY_DAYS)
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
                "keyids": [entry["keyid"] for entry in envelope["signatures"]],
                "signing": "offline" if offline else "online",
            },
            before=before,
        )
        version_id = locked.pk
        transaction.on_commit(lambda: version_released.send(sender=ModelVersion, version_id=version_id))
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
        before = audit_values(locked, ["state"])
        locked.state = ModelVersion.State.DEPRECATED
        locked.save(update_fields=["state"])
        audit_record(actor=actor, action="version.deprecate", obj=locked, reason=reason, before=before)
    return locked


def version_revoke(*, version: ModelVersion, actor: str, reason: str = "") -> ModelVersion:
    """Revocation is a state: the row, its artifacts and its signed manifest stay for the record."""
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        if locked.state == ModelVersion.State.REVOKED:
            raise Conflict(f"{version} is already revoked.", code="invalid_state")
        previous = locked.state
        before = audit_values(locked, ["state"])
        locked.state = ModelVersion.State.REVOKED
        locked.save(update_fields=["state"])
        audit_record(
            actor=actor,
            action="version.revoke",
            obj=locked,
            reason=reason,
            detail={"previous_state": previous},
            before=before,
        )
    return locked


def version_delete_draft(*, version: ModelVersion, actor: str) -> None:
    """Delete a draft and its stored files (after commit, so a rollback loses no bytes)."""
    storage = artifact_storage()
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        require_draft(locked)
        keys_to_delete = list(locked.artifacts.values_list("storage_key", flat=True))
        audit_record(actor=actor, action="version.delete", obj=locked, detail={"version": str(locked)})
        locked.delete()
        transaction.on_commit(lambda: [storage.delete(key) for key in keys_to_delete])
