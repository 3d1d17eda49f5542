"""DSSE envelopes signed with Ed25519.

The signature covers DSSE's pre-authentication encoding (PAE) of the exact payload bytes, so no
canonical-JSON rules are involved and any DSSE verifier can check our envelopes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

RELEASE_PAYLOAD_TYPE = "application/vnd.modelfleet.release+json"
DIRECTIVE_PAYLOAD_TYPE = "application/vnd.modelfleet.directive+json"
KEYRING_PAYLOAD_TYPE = "application/vnd.modelfleet.keyring+json"  # signed by the root key (agent.trust)
TIMESTAMP_PAYLOAD_TYPE = "application/vnd.modelfleet.timestamp+json"  # signed by the rollout key (agent.trust)


class VerificationError(Exception):
    """An envelope was refused. `code` is the machine-readable reason reported upstream."""

    def __init__(self, message: str, code: str = "SIGNATURE_INVALID"):
        super().__init__(message)
        self.code = code


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding; lengths are ASCII decimal byte counts."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


def keyid_of(public_key: Ed25519PublicKey) -> str:
    """Key id: hex SHA-256 of the raw 32-byte public key (stable across PEM re-encodings)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def load_private_key_pem(data: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    return key


def load_public_key_pem(data: bytes | str) -> Ed25519PublicKey:
    if isinstance(data, str):
        data = data.encode("ascii")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def generate_private_key_pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def sign_envelope(payload: bytes, payload_type: str, private_key: Ed25519PrivateKey) -> dict:
    signature = private_key.sign(pae(payload_type, payload))
    return {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [
            {"keyid": keyid_of(private_key.public_key()), "sig": base64.b64encode(signature).decode("ascii")}
        ],
    }


@dataclass(frozen=True)
class Keyring:
    """Trusted public keys by key id, for one role (release or rollout), and how many distinct
    ones must have signed an envelope (TUF's threshold; 1 for a single key)."""

    keys: Mapping[str, Ed25519PublicKey]
    threshold: int = 1

    @classmethod
    def from_pems(cls, *pems: bytes | str, threshold: int = 1) -> Keyring:
        loaded = [load_public_key_pem(pem) for pem in pems]
        return cls({keyid_of(key): key for key in loaded}, threshold)


def _b64decode(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise VerificationError(f"envelope {what} must be a base64 string", "MALFORMED")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise VerificationError(f"envelope {what} is not valid base64", "MALFORMED") from None


def verify_envelope(envelope: object, payload_type: str, keyring: Keyring) -> bytes:
    """Return the payload bytes if signatures by at least `keyring.threshold` distinct trusted
    keys verify (signatures by other keys are ignored, as DSSE allows).

    Raises VerificationError with code MALFORMED, WRONG_PAYLOAD_TYPE, UNKNOWN_KEY (no signature
    by a trusted key) or SIGNATURE_INVALID (trusted keys signed, but too few signatures verify).
    """
    if not isinstance(envelope, Mapping):
        raise VerificationError("envelope must be a JSON object", "MALFORMED")
    if envelope.get("payloadType") != payload_type:
        raise VerificationError(
            f"payloadType is {envelope.get('payloadType')!r}, expected {payload_type!r}",
            "WRONG_PAYLOAD_TYPE",
        )
    payload = _b64decode(envelope.get("payload"), "payload")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        raise VerificationError("envelope has no signatures", "MALFORMED")
    message = pae(payload_type, payload)
    known_key_seen = False
    verified: set[str] = set()  # key ids, so one key signing twice counts once
    for entry in signatures:
        if not isinstance(entry, Mapping):
            raise VerificationError("each signature must be an object", "MALFORMED")
        keyid = entry.get("keyid")
        key = keyring.keys.get(keyid)
        if key is None:
            continue
        known_key_seen = True
        try:
            key.verify(_b64decode(entry.get("sig"), "signature"), message)
        except InvalidSignature:
            continue
        verified.add(keyid)
        if len(verified) >= keyring.threshold:
            return payload
    if not known_key_seen:
        ids = ", ".join(str(e.get("keyid"))[:16] for e in signatures if isinstance(e, Mapping))
        raise VerificationError(f"no signature by a trusted key (key ids: {ids})", "UNKNOWN_KEY")
    if keyring.threshold > 1:
        raise VerificationError(
            f"{len(verified)} of the {keyring.threshold} required signatures by distinct trusted keys verify",
            "SIGNATURE_INVALID",
        )
    raise VerificationError("signature does not verify against the trusted key", "SIGNATURE_INVALID")
