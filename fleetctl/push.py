"""`fleetctl push`: create a version, upload one artifact per hardware target, release it, move an alias."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from fleetctl.client import ApiError, FleetClient, path_quote
from fleetctl.common import (
    API,
    EXIT_OK,
    UsageError,
    client_from_args,
    common_options,
    eprint,
    sha256_file,
)
from fleetctl.keys import load_signing_key, sign_payload
from fleetctl.progress import Progress, human_bytes
from fleetctl.samples import health_from_samples


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


def envelope_digest(envelope: dict) -> str:
    """The release's digest: sha256 of the exact payload bytes the signature covers."""
    try:
        payload = base64.b64decode(envelope["payload"], validate=True)
    except (KeyError, TypeError, ValueError):
        raise ApiError(200, "unexpected_response", "the server's release response is not a DSSE envelope") from None
    return hashlib.sha256(payload).hexdigest()


def cmd_push(args: argparse.Namespace) -> int:
    if args.sign_with and not args.release:
        raise UsageError("--sign-with needs --release: only a release is signed")
    for key_path in args.sign_with:  # an unusable key is refused before anything is uploaded
        load_signing_key(key_path)
    if args.alias and not args.release:
        raise UsageError("--alias needs --release: an alias can only point at a released version")
    # Everything local is checked before the first request, so a typo leaves nothing on the server.
    artifacts = _parse_artifacts(args.artifact)
    expected = _parse_expected(args.expect_sha256, {hardware for hardware, _ in artifacts})
    for hardware, file_path in artifacts:
        # The server checks the bytes it receives against this digest too (transit, a file
        # changed while uploading); a file that is already wrong here is refused before any write.
        if hardware in expected and (actual := sha256_file(file_path)) != expected[hardware]:
            raise UsageError(
                f"--artifact {hardware}={file_path}: sha256 is {actual}, but --expect-sha256 says {expected[hardware]}"
            )
    metadata = _load_json_option("--metadata", args.metadata) or {}
    health = _load_json_option("--health", args.health, from_file=True)
    if args.sample_inputs:  # runs the models here: the runtime and numpy are imported only then
        health = health_from_samples(args.sample_inputs, artifacts, args.format, base=health)
    client = client_from_args(args)
    model = path_quote(args.model)
    # Then everything the server can tell us without writing: a push that would be refused at
    # upload (unknown hardware, an artifact too large, the version taken) creates nothing.
    model_exists = _preflight(client, args, artifacts)

    if not model_exists:
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
        if getattr(exc, "released", False):
            raise
        # A refused upload or release must not leave the version taken: delete the draft this
        # push created, so the same command can run again once the cause is fixed.
        try:
            client.delete(f"{API}/models/{model}/versions/{path_quote(args.version)}/")
            exc.message += f"\n  note: the draft {args.model} {args.version} this push created was deleted; push again"
        except ApiError as cleanup:
            exc.message += (
                f"\n  note: the draft {args.model} {args.version} could not be deleted ({cleanup.message});"
                f" delete it with `fleetctl version delete {args.model} {args.version}` before pushing again"
            )
        raise


def _preflight(client: FleetClient, args, artifacts: list[tuple[str, Path]]) -> bool:
    """Check with reads only that the push can succeed; returns whether the model exists.
    An interrupted earlier push's draft of the same version is deleted with --replace-draft."""
    model, version = path_quote(args.model), path_quote(args.version)
    try:
        client.get(f"{API}/models/{model}/")
        model_exists = True
    except ApiError as exc:
        if exc.status != 404:
            raise
        if not args.create_model:
            raise ApiError(
                404, "model_not_found",
                f"model {args.model!r} does not exist on {client.url}; pass --create-model to create it",
            ) from None
        model_exists = False
    known = {h["id"]: h for h in client.get_all(f"{API}/hardware/")}
    for hardware, file_path in artifacts:
        target = known.get(hardware)
        if target is None:
            raise ApiError(
                404, "unknown_hardware",
                f"hardware {hardware!r} does not exist on {client.url} (known: {', '.join(sorted(known)) or 'none'}); "
                f"create it with `fleetctl hardware create --id {hardware} --description TEXT --max-bytes N`",
            )
        size, limit = file_path.stat().st_size, target.get("max_artifact_bytes")
        if isinstance(limit, int) and size > limit:
            raise ApiError(
                413, "artifact_too_large",
                f"{file_path} is {human_bytes(size)}, over the {human_bytes(limit)} ({limit} bytes) limit of "
                f"hardware {hardware!r}",
            )
    if model_exists:
        try:
            existing = client.get(f"{API}/models/{model}/versions/{version}/")
        except ApiError as exc:
            if exc.status != 404:
                raise
            existing = None
        if existing is not None:
            if existing.get("state") != "draft":
                raise ApiError(
                    409, "version_exists",
                    f"{args.model} {args.version} is already {existing.get('state')}; released versions are never "
                    "replaced: push a new version",
                )
            if not args.replace_draft:
                raise ApiError(
                    409, "version_exists",
                    f"a draft {args.model} {args.version} is on the server (an earlier push stopped half way?); "
                    f"pass --replace-draft, or delete it with `fleetctl version delete {args.model} {args.version}`",
                )
            client.delete(f"{API}/models/{model}/versions/{version}/")
            eprint(f"deleted the earlier draft {args.model} {args.version} (--replace-draft)")
    return model_exists


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

    envelope = client.post(f"{API}/models/{model}/versions/{version}/release", _offline_signatures(client, args))
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


def _offline_signatures(client: FleetClient, args) -> dict | None:
    """With --sign-with: the manifest payload the server would sign, signed here by each key."""
    if not args.sign_with:
        return None
    version_path = f"{API}/models/{path_quote(args.model)}/versions/{path_quote(args.version)}"
    answer = client.get(f"{version_path}/manifest-payload")
    try:
        payload_type, payload_b64 = answer["payloadType"], answer["payload"]
        payload = base64.b64decode(payload_b64, validate=True)
    except (KeyError, TypeError, ValueError):
        raise ApiError(200, "unexpected_response", "the server's manifest-payload answer is not a payload") from None
    if hashlib.sha256(payload).hexdigest() != answer.get("sha256"):
        raise ApiError(200, "unexpected_response", "the manifest payload does not match the sha256 the server sent")
    signing_keys = [load_signing_key(path) for path in args.sign_with]
    signatures = [sign_payload(key, payload_type, payload) for key in signing_keys]
    eprint(f"signed the manifest (sha256 {answer['sha256']}) with {len(signatures)} key(s): "
           + ", ".join(s["keyid"][:16] for s in signatures))
    return {"payload": payload_b64, "signatures": signatures}


def add_parser(sub) -> None:
    common = common_options()
    push = sub.add_parser(
        "push", parents=[common], help="create a version, upload its artifacts, optionally release it",
        description="Check everything first (files, JSON, hardware targets and their size limits, the "
        "version not taken), then create a draft version, stream one artifact per hardware target "
        "(each checked against its local sha256 by the server), optionally release it and move an "
        "alias. A refused upload or release deletes the draft again, so the same push can be re-run. "
        "On --release, prints the manifest digest (sha256 of the signed payload) on stdout.",
    )
    push.add_argument("--model", required=True)
    push.add_argument("--version", required=True, dest="version")
    push.add_argument("--artifact", action="append", required=True, metavar="HARDWARE=PATH",
                      help="one per hardware target; repeat for several")
    push.add_argument("--format", default="onnx", help="artifact format: onnx, tflite, tensorrt, other (default: onnx)")
    push.add_argument("--release", action="store_true", help="sign and release the version after uploading")
    push.add_argument("--alias", help="after releasing, point this alias (e.g. production) at the version")
    push.add_argument("--sign-with", action="append", default=[], metavar="KEY.pem",
                      help="with --release on a RELEASE_SIGNING=offline server: sign the manifest here with this "
                      "Ed25519 private key (`fleetctl keys generate`); repeat for a threshold of several keys")
    push.add_argument("--metadata", metavar="JSON", help="free metadata as a JSON object")
    push.add_argument("--git-sha")
    push.add_argument("--ci-run-url")
    push.add_argument("--training-run-id")
    push.add_argument("--expect-sha256", action="append", default=[], metavar="HARDWARE=SHA256",
                      help="digest the artifact must have (e.g. from the build step); the server refuses "
                      "the upload if the bytes differ. Default: the local file's sha256")
    push.add_argument("--health", metavar="FILE", help="JSON file with the health contract to sign into the release "
                      "(with --sample-inputs: only its atol, rtol and latency_budget_ms)")
    push.add_argument("--sample-inputs", metavar="FILE.npz",
                      help="one array per model input name: run the artifacts here (needs modelfleet[runtime]) and "
                      "sign their outputs and a latency budget into the release as its health contract")
    push.add_argument("--create-model", action="store_true", help="create the model if it does not exist")
    push.add_argument("--replace-draft", action="store_true",
                      help="delete a draft of the same version left on the server by an interrupted push")
    push.add_argument("--description", help="model description, with --create-model")
    push.add_argument("--envelope-out", metavar="FILE", help="also write the signed envelope to FILE")
    push.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    push.set_defaults(func=cmd_push)
