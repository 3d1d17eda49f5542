"""A version after its creation: releasing it (each ONNX artifact checked as a device will check
it, registry.release_check; the manifest signed with the release key, the version frozen),
deprecating it, revoking it; or, while still a draft, deleting it."""

from __future__ import annotations

import hashlib
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agent import protocol
from agent.signing import RELEASE_PAYLOAD_TYPE, sign_envelope
from registry import keys
from registry.artifacts import artifact_storage
from registry.audit import audit_record
from registry.errors import ApiError, Conflict
from registry.models import ModelVersion
from registry.release_check import release_check
from registry.versions import require_draft


def _provenance(version: ModelVersion) -> dict:
    return {
        "git_sha": version.git_sha,
        "ci_run_url": version.ci_run_url,
        "training_run_id": version.training_run_id,
        "approver": version.approver,
    }


def version_release(*, version: ModelVersion, actor: str, approver: str | None = None) -> dict:
    """Check each artifact as a device will (registry.release_check: a precheck runtime for its
    format, the health contract against the model, the device precheck run on it), sign the release manifest with the release
    key and freeze the version. Returns the envelope."""
    private_key = keys.load_release_key()
    # Checked before the row lock (a precheck takes seconds); the lock then makes sure the
    # artifacts signed are the ones checked.
    current = ModelVersion.objects.select_related("model").get(pk=version.pk)
    require_draft(current)
    checked = list(current.artifacts.order_by("hardware_id"))
    if checked:
        release_check(current, checked)
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().select_related("model").get(pk=version.pk)
        require_draft(locked)
        artifacts = list(locked.artifacts.order_by("hardware_id"))
        if not artifacts:
            raise ApiError(
                f"{locked} has no artifacts; upload at least one before releasing.", code="no_artifacts"
            )
        if [(a.pk, a.sha256) for a in artifacts] != [(a.pk, a.sha256) for a in checked]:
            raise Conflict(
                f"The artifacts of {locked} changed while its release was being checked; release it again.",
                code="artifacts_changed",
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
        require_draft(locked)
        keys_to_delete = list(locked.artifacts.values_list("storage_key", flat=True))
        audit_record(actor=actor, action="version.delete", obj=locked, detail={"version": str(locked)})
        locked.delete()
        transaction.on_commit(lambda: [storage.delete(key) for key in keys_to_delete])
