"""Signing keys. Private keys live only in PEM files (mode 0600) under settings paths, never in
the database; the public halves are published at /api/v1/keys/.

With RELEASE_SIGNING=offline the server holds no release private key: the release public keys
are the ones admins registered (ReleaseKey rows), and a release needs signatures by
RELEASE_SIGNATURE_THRESHOLD of them (registry.releases). Registered keys are published in online
mode too, so devices enrolled before a switch to offline signing already trust them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from agent.signing import (
    generate_private_key_pem,
    keyid_of,
    load_private_key_pem,
    load_public_key_pem,
    public_key_pem,
)
from registry.audit import audit_record
from registry.errors import ApiError, Conflict, not_found
from registry.models import ReleaseKey

ROLES = ("release", "rollout")


class SigningKeyMissing(ApiError):
    def __init__(self, role: str, path: Path, reason: str):
        super().__init__(
            f"The {role} signing key {reason} ({path}); run `manage.py keys init` to create the keys.",
            code="signing_key_missing",
            status_code=503,
            role=role,
        )


@dataclass(frozen=True)
class PublicKeyInfo:
    role: str
    keyid: str
    public_key_pem: str
    path: Path | None  # None: a registered public key (no private key on this server)

    def as_dict(self) -> dict:
        return {"keyid": self.keyid, "role": self.role, "public_key_pem": self.public_key_pem}


def key_path(role: str) -> Path:
    if role not in ROLES:
        raise ValueError(f"unknown key role {role!r}")
    return Path(settings.RELEASE_KEY_PATH if role == "release" else settings.ROLLOUT_KEY_PATH)


def load_private_key(role: str) -> Ed25519PrivateKey:
    path = key_path(role)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SigningKeyMissing(role, path, "is missing") from None
    except OSError as exc:
        raise SigningKeyMissing(role, path, f"cannot be read: {exc.strerror}") from None
    try:
        return load_private_key_pem(data)
    except ValueError as exc:
        raise SigningKeyMissing(role, path, f"is not an Ed25519 private key PEM: {exc}") from None


def load_release_key() -> Ed25519PrivateKey:
    return load_private_key("release")


def load_rollout_key() -> Ed25519PrivateKey:
    return load_private_key("rollout")


def public_key_info(role: str) -> PublicKeyInfo:
    public = load_private_key(role).public_key()
    return PublicKeyInfo(
        role=role, keyid=keyid_of(public), public_key_pem=public_key_pem(public), path=key_path(role)
    )


def offline_signing() -> bool:
    return settings.RELEASE_SIGNING == "offline"


def file_roles() -> tuple[str, ...]:
    """Roles whose private key is a file on this server. Offline, a release private key here is
    exactly what the mode exists to avoid."""
    return ("rollout",) if offline_signing() else ROLES


def release_threshold() -> int:
    """Signatures by distinct release keys a release needs: the setting offline; online the
    server's own single signature."""
    return settings.RELEASE_SIGNATURE_THRESHOLD if offline_signing() else 1


def registered_release_keys() -> list[PublicKeyInfo]:
    rows = ReleaseKey.objects.filter(role=ReleaseKey.Role.RELEASE, revoked_at__isnull=True)
    return [
        PublicKeyInfo(role="release", keyid=row.keyid, public_key_pem=row.public_key_pem, path=None)
        for row in rows.order_by("created_at", "id")
    ]


def release_public_keys() -> list[PublicKeyInfo]:
    """The release keys devices trust: offline only the registered ones (no private key file is
    ever read), online the server's key followed by any registered ones."""
    registered = registered_release_keys()
    if offline_signing():
        return registered
    own = public_key_info("release")
    return [own, *(info for info in registered if info.keyid != own.keyid)]


def public_keys() -> list[PublicKeyInfo]:
    return [*release_public_keys(), public_key_info("rollout")]


def require_enough_release_keys() -> list[PublicKeyInfo]:
    """The release keys to pin on a device, refusing (503) when they could never verify a release."""
    found = release_public_keys()
    needed = release_threshold()
    if len(found) < needed:
        raise ApiError(
            f"RELEASE_SIGNING=offline needs at least {needed} registered release key(s) "
            f"(RELEASE_SIGNATURE_THRESHOLD); {len(found)} registered. Add one with `fleetctl keys add`.",
            code="release_keys_missing",
            status_code=503,
            registered=len(found),
            threshold=needed,
        )
    return found


def release_key_register(*, public_key_pem_text: str, actor: str, role: str = "release") -> ReleaseKey:
    if role != ReleaseKey.Role.RELEASE:
        raise ApiError(
            f"Only release keys can be registered (role {role!r}); the rollout key signs directives online.",
            code="unsupported_role",
        )
    try:
        key = load_public_key_pem(public_key_pem_text)
    except (ValueError, UnicodeEncodeError) as exc:
        raise ApiError(f"public_key_pem is not an Ed25519 public key PEM: {exc}", code="invalid_public_key") from None
    keyid = keyid_of(key)
    try:
        with transaction.atomic():
            row = ReleaseKey.objects.create(
                keyid=keyid, role=role, public_key_pem=public_key_pem(key), created_by=actor
            )
            audit_record(actor=actor, action="release_key.add", obj=row, detail={"keyid": keyid, "role": role})
    except IntegrityError:
        raise Conflict(f"Release key {keyid} is registered already (revoked keys stay registered).",
                       code="key_exists", keyid=keyid) from None
    return row


def release_key_revoke(*, keyid: str, actor: str, reason: str = "") -> ReleaseKey:
    """Revoked keys are no longer published or accepted; releases they signed stay released
    (revoke those versions to withdraw them)."""
    with transaction.atomic():
        row = ReleaseKey.objects.select_for_update().filter(keyid=keyid).first()
        if row is None:
            raise not_found(f"No registered release key {keyid!r}.", "key_not_found")
        if row.revoked_at is not None:
            raise Conflict(f"Release key {keyid} is already revoked.", code="key_revoked")
        row.revoked_at = timezone.now()
        row.revoked_by = actor
        row.save(update_fields=["revoked_at", "revoked_by"])
        audit_record(actor=actor, action="release_key.revoke", obj=row, reason=reason, detail={"keyid": keyid})
    return row


def keys_init() -> list[tuple[str, Path, bool]]:
    """Create each missing key pair as a 0600 PEM; never overwrite. Returns (role, path, created)."""
    results = []
    for role in file_roles():
        path = key_path(role)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            # O_EXCL: an existing key (or one created concurrently) is never replaced.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            load_private_key(role)  # refuse loudly if what is there is not a usable key
            results.append((role, path, False))
            continue
        with os.fdopen(fd, "wb") as handle:
            handle.write(generate_private_key_pem())
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(path, 0o600)
        results.append((role, path, True))
    return results
