"""`fleetctl verify`: check a release envelope offline, exactly as a device agent would."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from fleetctl.common import (
    EXIT_INVALID,
    EXIT_OK,
    UsageError,
    eprint,
    sha256_file,
)


def cmd_verify(args: argparse.Namespace) -> int:
    # Imported here so the HTTP commands work even where `cryptography` is unusable.
    from agent.protocol import ErrorCode, ProtocolError, verify_release
    from agent.signing import Keyring, VerificationError

    try:
        envelope = json.loads(Path(args.envelope).read_text())
    except OSError as exc:
        raise UsageError(f"{args.envelope}: cannot read the envelope: {exc.strerror}") from None
    except ValueError as exc:
        eprint(f"refused: MALFORMED: {args.envelope} is not JSON: {exc}")
        return EXIT_INVALID
    pems = []
    for key_path in args.key:
        try:
            pems.append(Path(key_path).read_bytes())
        except OSError as exc:
            raise UsageError(f"--key {key_path}: cannot read the key: {exc.strerror}") from None
    if not 1 <= args.threshold <= len(pems):
        raise UsageError(f"--threshold {args.threshold}: must be from 1 to the number of --key files ({len(pems)})")
    try:
        keyring = Keyring.from_pems(*pems, threshold=args.threshold)
    except ValueError as exc:
        raise UsageError(f"--key: {exc}") from None

    try:
        manifest = verify_release(envelope, keyring)
    except (VerificationError, ProtocolError) as exc:
        eprint(f"refused: {exc.code}: {exc}")
        return EXIT_INVALID
    now = datetime.now(timezone.utc)
    if manifest.expires is not None and manifest.expires <= now and not args.allow_expired:
        eprint(f"refused: {ErrorCode.RELEASE_EXPIRED}: the release expired at {manifest.expires:%Y-%m-%dT%H:%M:%SZ}")
        return EXIT_INVALID
    for spec in args.artifact:
        hardware, sep, path = spec.partition("=")
        if not sep:
            raise UsageError(f"--artifact {spec!r}: expected HARDWARE=PATH")
        entry = manifest.artifact_for(hardware)
        if entry is None:
            eprint(f"refused: {ErrorCode.NO_ARTIFACT}: the release has no artifact for hardware {hardware!r}")
            return EXIT_INVALID
        file_path = Path(path)
        if not file_path.is_file():
            raise UsageError(f"--artifact {spec}: no such file")
        size = file_path.stat().st_size
        if size != entry.length:
            eprint(f"refused: {ErrorCode.HASH_MISMATCH}: {path} is {size} bytes, the release says {entry.length}")
            return EXIT_INVALID
        actual = sha256_file(file_path)
        if actual != entry.sha256:
            eprint(f"refused: {ErrorCode.HASH_MISMATCH}: {path} has sha256 {actual}, the release says {entry.sha256}")
            return EXIT_INVALID

    payload = base64.b64decode(envelope["payload"])
    print(f"OK: {manifest.model} {manifest.version} (counter {manifest.counter}, rollback floor {manifest.rollback_floor})")
    print(f"digest: {hashlib.sha256(payload).hexdigest()}")
    print(f"signed by: {', '.join(s.get('keyid', '')[:16] for s in envelope['signatures'] if s.get('keyid') in keyring.keys)}")
    expires = f"{manifest.expires:%Y-%m-%dT%H:%M:%SZ}" if manifest.expires else "never"
    print(f"created: {manifest.created:%Y-%m-%dT%H:%M:%SZ}  expires: {expires}")
    for artifact in manifest.artifacts:
        print(f"  {artifact.hardware}  {artifact.format}  {artifact.file_name}  {artifact.length} bytes  sha256 {artifact.sha256}")
    return EXIT_OK


def add_parser(sub) -> None:
    verify = sub.add_parser(
        "verify", help="verify a release envelope offline against a release public key",
        description="Checks the DSSE signature, the manifest schema and expiry (and, with --artifact, "
        "a local file's length and sha256) exactly as a device agent would. Exit 0 when valid, "
        "1 with the reason code when refused.",
    )
    verify.add_argument("envelope", metavar="ENVELOPE.json")
    verify.add_argument("--key", action="append", required=True, metavar="PEM",
                        help="trusted release public key (PEM file); repeat for several")
    verify.add_argument("--artifact", action="append", default=[], metavar="HARDWARE=PATH",
                        help="also check this file against the release's entry for HARDWARE")
    verify.add_argument("--threshold", type=int, default=1, metavar="K",
                        help="distinct --key keys that must have signed (a device's [keys] release_threshold; default 1)")
    verify.add_argument("--allow-expired", action="store_true", help="accept a release past its expiry")
    verify.set_defaults(func=cmd_verify)
