"""fleetctl: push model versions from CI, list them, move aliases, verify releases offline.

Exit codes (stable; CI scripts may branch on them):
  0  success
  1  `verify`: the envelope was refused (the reason code is printed)
  2  usage or configuration error, or a local file that cannot be used
  3  the server refused the request (HTTP 4xx; its message is printed)
  4  server error (HTTP 5xx) or the server could not be reached
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fleetctl import __version__, rollout
from fleetctl.client import ApiError, ConfigError, FleetClient, path_quote
from fleetctl.common import (
    API,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_SERVER,
    EXIT_USAGE,
    Parser,
    UsageError,
    client_from_args,
    common_options,
    eprint,
    print_json,
    print_table,
)
from fleetctl.progress import Progress, human_bytes

# --- push ----------------------------------------------------------------------------------


def _parse_artifacts(values: list[str]) -> list[tuple[str, Path]]:
    artifacts: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for value in values:
        hardware, sep, path = value.partition("=")
        if not sep or not hardware or not path:
            raise UsageError(f"--artifact {value!r}: expected HARDWARE=PATH, e.g. --artifact jetson-orin=model.onnx")
        if hardware in seen:
            raise UsageError(f"--artifact: hardware {hardware!r} given twice; one artifact per hardware target")
        seen.add(hardware)
        file_path = Path(path)
        if not file_path.is_file():
            raise UsageError(f"--artifact {hardware}={path}: no such file")
        try:
            file_path.open("rb").close()
        except OSError as exc:
            raise UsageError(f"--artifact {hardware}={path}: cannot read the file: {exc.strerror}") from None
        artifacts.append((hardware, file_path))
    return artifacts


def _parse_expected(values: list[str], hardware_ids: set[str]) -> dict[str, str]:
    expected: dict[str, str] = {}
    for value in values:
        hardware, sep, digest = value.partition("=")
        if not sep or hardware not in hardware_ids:
            raise UsageError(f"--expect-sha256 {value!r}: expected HARDWARE=SHA256 for a hardware given with --artifact")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
            raise UsageError(f"--expect-sha256 {value!r}: the digest must be 64 hex characters")
        expected[hardware] = digest.lower()
    return expected


def _load_json_option(name: str, text: str | None, *, from_file: bool = False) -> Any:
    if text is None:
        return None
    if from_file:
        try:
            text = Path(text).read_text()
        except OSError as exc:
            raise UsageError(f"{name} {text}: cannot read the file: {exc.strerror}") from None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{name}: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{name}: must be a JSON object")
    return value


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def envelope_digest(envelope: dict) -> str:
    """The release's digest: sha256 of the exact payload bytes the signature covers."""
    try:
        payload = base64.b64decode(envelope["payload"], validate=True)
    except (KeyError, TypeError, ValueError):
        raise ApiError(200, "unexpected_response", "the server's release response is not a DSSE envelope") from None
    return hashlib.sha256(payload).hexdigest()


def cmd_push(args: argparse.Namespace) -> int:
    if args.alias and not args.release:
        raise UsageError("--alias needs --release: an alias can only point at a released version")
    # Everything local is checked before the first request, so a typo leaves nothing on the server.
    artifacts = _parse_artifacts(args.artifact)
    expected = _parse_expected(args.expect_sha256, {hardware for hardware, _ in artifacts})
    metadata = _load_json_option("--metadata", args.metadata) or {}
    health = _load_json_option("--health", args.health, from_file=True)
    client = client_from_args(args)
    model = path_quote(args.model)

    try:
        client.get(f"{API}/models/{model}/")
    except ApiError as exc:
        if exc.status != 404:
            raise
        if not args.create_model:
            raise ApiError(
                404,
                "model_not_found",
                f"model {args.model!r} does not exist on {client.url}; "
                "pass --create-model to create it, or create it with POST /api/v1/models/",
            ) from None
        client.post(f"{API}/models/", {"name": args.model, "description": args.description or ""})
        eprint(f"created model {args.model}")

    provenance = {
        key: value
        for key, value in (
            ("git_sha", args.git_sha),
            ("ci_run_url", args.ci_run_url),
            ("training_run_id", args.training_run_id),
        )
        if value
    }
    body: dict[str, Any] = {"version": args.version, "metadata": metadata, "provenance": provenance}
    if health is not None:
        body["health"] = health
    client.post(f"{API}/models/{model}/versions/", body)
    eprint(f"created draft {args.model} {args.version}")

    try:
        return _upload_and_release(client, args, artifacts, expected)
    except ApiError as exc:
        # The draft stays (released versions are immutable, drafts are not deleted behind the
        # user's back); say so, or a retry with the same version only meets a 409.
        if not getattr(exc, "released", False):
            exc.message += (
                f"\n  note: {args.model} {args.version} was created on the server and is still a draft;"
                " push again under a new version, or finish it through the API"
            )
        raise


def _upload_and_release(client: FleetClient, args, artifacts, expected) -> int:
    model, version = path_quote(args.model), path_quote(args.version)
    for hardware, file_path in artifacts:
        local_sha = sha256_file(file_path)
        # The server checks the uploaded bytes against this: the local hash catches corruption
        # in transit, an --expect-sha256 from the build step also catches a wrong or altered file.
        sent_sha = expected.get(hardware, local_sha)
        label = f"{hardware} {file_path.name}"
        result = client.upload(
            f"{API}/models/{model}/versions/{version}/artifacts/",
            fields={"hardware": hardware, "format": args.format, "sha256": sent_sha},
            file_path=file_path,
            progress=None if args.quiet else Progress(label),
        )
        server_sha = result.get("sha256") if isinstance(result, dict) else None
        if server_sha and server_sha != local_sha:
            # The server already checks the sha we send; this guards a server that did not.
            raise ApiError(0, "hash_mismatch", f"{label}: server stored sha256 {server_sha}, local file is {local_sha}")
        eprint(f"uploaded {label} ({human_bytes(file_path.stat().st_size)}, sha256 {local_sha})")

    if not args.release:
        eprint(f"{args.model} {args.version} left as a draft (pass --release to sign and release it)")
        return EXIT_OK

    envelope = client.post(f"{API}/models/{model}/versions/{version}/release")
    digest = envelope_digest(envelope)
    eprint(f"released {args.model} {args.version} (manifest sha256 {digest})")
    if args.envelope_out:
        Path(args.envelope_out).write_text(json.dumps(envelope, indent=2) + "\n")
        eprint(f"wrote the signed envelope to {args.envelope_out}")
    if args.alias:
        try:
            client.put(f"{API}/models/{model}/aliases/{path_quote(args.alias)}", {"version": args.version})
        except ApiError as exc:
            exc.released = True
            exc.message += f"\n  note: {args.model} {args.version} is released; only the alias move failed"
            raise
        eprint(f"alias {args.model}:{args.alias} -> {args.version}")
    print(digest)
    return EXIT_OK


# --- versions / alias ----------------------------------------------------------------------


def cmd_versions(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    versions = client.get_all(f"{API}/models/{path_quote(args.model)}/versions/")
    if args.json:
        print_json(versions)
        return EXIT_OK
    rows = []
    for item in versions:
        artifacts = item.get("artifacts") or []
        rows.append(
            {
                **item,
                "released_at": (item.get("released_at") or "")[:19].replace("T", " "),
                "aliases": ",".join(item.get("aliases") or []) if isinstance(item.get("aliases"), list) else "",
                "hardware": ",".join(a.get("hardware", "") for a in artifacts if isinstance(a, dict)),
            }
        )
    if not rows:
        eprint(f"model {args.model} has no versions yet")
        return EXIT_OK
    print_table(
        rows,
        [
            ("version", "VERSION"),
            ("counter", "COUNTER"),
            ("state", "STATE"),
            ("released_at", "RELEASED"),
            ("aliases", "ALIASES"),
            ("hardware", "HARDWARE"),
        ],
    )
    return EXIT_OK


def cmd_alias_set(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    result = client.put(
        f"{API}/models/{path_quote(args.model)}/aliases/{path_quote(args.alias)}", {"version": args.version}
    )
    if args.json:
        print_json(result)
    else:
        print(f"{args.model}:{args.alias} -> {args.version}")
    return EXIT_OK


def cmd_alias_list(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    aliases = client.get_all(f"{API}/models/{path_quote(args.model)}/aliases/")
    if args.json:
        print_json(aliases)
        return EXIT_OK
    rows = [{**a, "updated_at": (a.get("updated_at") or "")[:19].replace("T", " ")} for a in aliases]
    print_table(rows, [("name", "ALIAS"), ("version", "VERSION"), ("updated_at", "UPDATED"), ("updated_by", "BY")])
    return EXIT_OK


# --- verify (offline) ----------------------------------------------------------------------


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
    try:
        keyring = Keyring.from_pems(*pems)
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


# --- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = Parser(
        prog="fleetctl",
        description="modelfleet client for CI and operators.",
        epilog="Exit codes: 0 ok, 1 verification refused, 2 usage/config, 3 server refused (4xx), "
        "4 server or network error.",
        parents=[common_options(top_level=True)],
    )
    parser.add_argument("--version", action="version", version=f"fleetctl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    push = sub.add_parser(
        "push", parents=[common], help="create a version, upload its artifacts, optionally release it",
        description="Create a draft version, stream one artifact per hardware target (each checked "
        "against its local sha256 by the server), optionally release it and move an alias. "
        "On --release, prints the manifest digest (sha256 of the signed payload) on stdout.",
    )
    push.add_argument("--model", required=True)
    push.add_argument("--version", required=True, dest="version")
    push.add_argument("--artifact", action="append", required=True, metavar="HARDWARE=PATH",
                      help="one per hardware target; repeat for several")
    push.add_argument("--format", default="onnx", help="artifact format: onnx, tflite, tensorrt, other (default: onnx)")
    push.add_argument("--release", action="store_true", help="sign and release the version after uploading")
    push.add_argument("--alias", help="after releasing, point this alias (e.g. production) at the version")
    push.add_argument("--metadata", metavar="JSON", help="free metadata as a JSON object")
    push.add_argument("--git-sha")
    push.add_argument("--ci-run-url")
    push.add_argument("--training-run-id")
    push.add_argument("--expect-sha256", action="append", default=[], metavar="HARDWARE=SHA256",
                      help="digest the artifact must have (e.g. from the build step); the server refuses "
                      "the upload if the bytes differ. Default: the local file's sha256")
    push.add_argument("--health", metavar="FILE", help="JSON file with the health contract to sign into the release")
    push.add_argument("--create-model", action="store_true", help="create the model if it does not exist")
    push.add_argument("--description", help="model description, with --create-model")
    push.add_argument("--envelope-out", metavar="FILE", help="also write the signed envelope to FILE")
    push.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    push.set_defaults(func=cmd_push)

    versions = sub.add_parser("versions", parents=[common], help="list a model's versions")
    versions.add_argument("model")
    versions.add_argument("--json", action="store_true", help="print the server's JSON")
    versions.set_defaults(func=cmd_versions)

    alias = sub.add_parser("alias", help="show or move aliases (production, staging, ...)")
    alias_sub = alias.add_subparsers(dest="alias_command", metavar="ACTION", parser_class=Parser)
    alias_sub.required = True
    alias_set = alias_sub.add_parser("set", parents=[common], help="point ALIAS at VERSION")
    alias_set.add_argument("model")
    alias_set.add_argument("alias")
    alias_set.add_argument("version")
    alias_set.add_argument("--json", action="store_true")
    alias_set.set_defaults(func=cmd_alias_set)
    alias_list = alias_sub.add_parser("list", parents=[common], help="list a model's aliases")
    alias_list.add_argument("model")
    alias_list.add_argument("--json", action="store_true", help="print the server's JSON (with history)")
    alias_list.set_defaults(func=cmd_alias_list)

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
    verify.add_argument("--allow-expired", action="store_true", help="accept a release past its expiry")
    verify.set_defaults(func=cmd_verify)

    rollout.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):  # a command group given without its action
        eprint(f"fleetctl: error: '{' '.join(argv if argv is not None else sys.argv[1:])}' needs an action; see --help")
        return EXIT_USAGE
    try:
        return args.func(args)
    except (UsageError, ConfigError) as exc:
        eprint(f"fleetctl: {exc}")
        return EXIT_USAGE
    except ApiError as exc:
        eprint(f"fleetctl: error: {exc.message}")
        if exc.status:
            eprint(f"  (HTTP {exc.status}, code {exc.code})")
        return EXIT_REFUSED if exc.is_client_error else EXIT_SERVER
    except KeyboardInterrupt:
        eprint("fleetctl: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
