"""Signing keys on disk. Private keys live only in PEM files (mode 0600) under settings paths,
never in the database; the public halves are published at /api/v1/keys/."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.conf import settings

from agent.signing import generate_private_key_pem, keyid_of, load_private_key_pem, public_key_pem
from registry.errors import ApiError

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
    path: Path

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


def public_keys() -> list[PublicKeyInfo]:
    return [public_key_info(role) for role in ROLES]


def keys_init() -> list[tuple[str, Path, bool]]:
    """Create each missing key pair as a 0600 PEM; never overwrite. Returns (role, path, created)."""
    results = []
    for role in ROLES:
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
