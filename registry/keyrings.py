"""Root-signed keyrings (agent.trust): the server only stores and hands out what the offline root
key signed; it never holds the root private key. keyring_push accepts a keyring when a root key of
ROOT_PUBLIC_KEY_PATH signed it, its version is higher than the current one and it has not expired,
the very checks every agent makes (agent.trust.verify_keyring), so the server never publishes a
keyring its devices would refuse. Publishing it on the broker is ota.fleet.keyring's part (layers).
"""

from __future__ import annotations

import re
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agent.protocol import format_time
from agent.signing import Keyring as SigningKeyring
from agent.signing import VerificationError, keyid_of, load_public_key_pem
from agent.trust import verify_keyring
from registry.audit import audit_record
from registry.errors import ApiError, Conflict
from registry.keys import load_rollout_key
from registry.models import Keyring

_PEM_RE = re.compile(r"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", re.S)


def root_public_pems() -> list[str]:
    """The root public keys devices pin at enrollment ([] when ROOT_PUBLIC_KEY_PATH is unset)."""
    path = settings.ROOT_PUBLIC_KEY_PATH
    if not path:
        return []
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ApiError(f"ROOT_PUBLIC_KEY_PATH {path!r} cannot be read: {exc.strerror}", code="root_keys_missing",
                       status_code=503) from None
    pems = [pem + "\n" for pem in _PEM_RE.findall(text)]  # as agent.signing.public_key_pem writes them
    for pem in pems:
        load_public_key_pem(pem)  # a broken setting fails loudly, not as a refused keyring
    if not pems:
        raise ApiError(f"ROOT_PUBLIC_KEY_PATH {path!r} holds no public key PEM", code="root_keys_missing",
                       status_code=503)
    return pems


def current_keyring() -> Keyring | None:
    return Keyring.objects.order_by("-version").first()


def keyring_push(*, envelope: object, actor: str) -> Keyring:
    """Store a root-signed keyring as the current one (audited `keyring.push`). Refusals:
    400 keyring_invalid (with the agent's code: UNKNOWN_KEY,
    SIGNATURE_INVALID, MALFORMED, WRONG_PAYLOAD_TYPE), 409 keyring_not_newer, 400 keyring_expired;
    409 keyring_lacks_rollout_key when the keyring does not list the key this server signs directives
    with; 409 root_keys_missing when no root key is configured, 503 when its file cannot be read."""
    pems = root_public_pems()
    if not pems:
        # A state of this server, not an outage: 409 like other refusals an admin must resolve.
        raise Conflict("no root public key is configured (ROOT_PUBLIC_KEY_PATH): keyrings cannot be accepted",
                       code="root_keys_missing")
    root = SigningKeyring.from_pems(*pems)
    with transaction.atomic():
        # One push at a time: two of the same version must not both pass the version check.
        held = Keyring.objects.select_for_update().order_by("-version").first()
        held_version = held.version if held else 0
        try:
            doc = verify_keyring(envelope, root, held_version=held_version, now=timezone.now())
        except VerificationError as exc:
            if exc.code == "REPLAYED":
                raise Conflict(str(exc), code="keyring_not_newer", current_version=held_version) from None
            if exc.code == "EXPIRED":
                raise ApiError(str(exc), code="keyring_expired") from None
            raise ApiError(f"keyring refused: {exc}", code="keyring_invalid", reason=exc.code) from None
        # The server signs directives with its ROLLOUT_KEY_PATH key: a keyring without it would have
        # every device refuse every directive (rotate in two keyrings: `fleetctl keys rotate`).
        signing_keyid = keyid_of(load_rollout_key().public_key())
        if signing_keyid not in {keyid_of(load_public_key_pem(p)) for p in doc.rollout}:
            raise Conflict(
                f"this server signs directives with rollout key {signing_keyid[:16]}, which keyring version "
                f"{doc.version} does not list: every device would refuse them. Install the new rollout key as "
                "ROLLOUT_KEY_PATH first, or push a keyring listing both keys", code="keyring_lacks_rollout_key",
                rollout_keyid=signing_keyid,
            )
        row = Keyring.objects.create(version=doc.version, envelope=envelope, expires_at=doc.expires,
                                     created_by=actor)
        audit_record(actor=actor, action="keyring.push", obj=row, detail={
            "version": doc.version, "expires": format_time(doc.expires),
            "release_keyids": [keyid_of(load_public_key_pem(p)) for p in doc.release],
            "release_threshold": doc.release_threshold,
            "rollout_keyids": [keyid_of(load_public_key_pem(p)) for p in doc.rollout],
            "previous_version": held_version,
        })
    return row
