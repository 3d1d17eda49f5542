"""`fleetctl keyring sign|push|show` and `fleetctl keys rotate`: the root-signed keyring devices
take new release and rollout keys from (agent.trust), with no re-enrollment.

`sign` runs where the offline root key is (it never needs the server); `push` uploads the signed
file (admin token), which the server checks as devices do and retains for them. `keys rotate`
walks an operator through a rollout-key rotation in two keyrings, so no directive is refused
in between: first one listing the old and the new rollout key (`--stage add`), then, once the
server signs with the new key (ROLLOUT_KEY_PATH), one listing only the new key (`--stage retire`):
from then on every device refuses a directive signed with the old key (UNKNOWN_KEY).
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import timedelta
from pathlib import Path

from fleetctl.common import API, EXIT_OK, Parser, UsageError, client_from_args, common_options, eprint, print_json
from fleetctl.keys import load_signing_key

_DURATION_RE = re.compile(r"^(\d+)([dh])$")
RESET_HELP = ("devices forget the directive seqs they handled when they take this keyring: after a stolen "
              "rollout key signed huge seqs (a fast-forward attack), with the stolen key retired")


def parse_expiry(text: str) -> timedelta:
    match = _DURATION_RE.match(text)
    if not match or int(match.group(1)) < 1:
        raise UsageError(f"--expires {text!r}: give a duration such as 365d or 48h")
    n, unit = int(match.group(1)), match.group(2)
    return timedelta(days=n) if unit == "d" else timedelta(hours=n)


def read_pems(paths: list[str], what: str) -> list[str]:
    from agent.signing import load_public_key_pem

    pems = []
    for path in paths:
        try:
            pem = Path(path).read_text()
            load_public_key_pem(pem)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UsageError(f"{what} {path}: not a readable Ed25519 public key PEM ({exc})") from None
        pems.append(pem)
    return pems


def signed_keyring(*, root_path: str, version: int, expires: timedelta, release: list[str], rollout: list[str],
                   release_threshold: int, reset_seqs: bool = False) -> dict:
    """The DSSE envelope of a keyring, signed with the root private key at `root_path`."""
    from agent.protocol import ProtocolError, utcnow
    from agent.signing import KEYRING_PAYLOAD_TYPE, sign_envelope
    from agent.trust import build_keyring_payload

    root = load_signing_key(root_path)
    try:
        payload = build_keyring_payload(version=version, expires=utcnow() + expires, release_pems=release,
                                        rollout_pems=rollout, release_threshold=release_threshold,
                                        reset_seqs=reset_seqs)
    except ProtocolError as exc:
        raise UsageError(f"keyring refused: {exc}") from None
    return sign_envelope(payload, KEYRING_PAYLOAD_TYPE, root)


def cmd_keyring_sign(args: argparse.Namespace) -> int:
    if args.version < 1:
        raise UsageError("--version must be >= 1 (higher than the keyring devices hold)")
    envelope = signed_keyring(
        root_path=args.root, version=args.version, expires=parse_expiry(args.expires),
        release=read_pems(args.release, "--release"), rollout=read_pems(args.rollout, "--rollout"),
        release_threshold=args.release_threshold, reset_seqs=args.reset_seqs,
    )
    out = Path(args.out)
    out.write_text(json.dumps(envelope, indent=1) + "\n")
    eprint(f"wrote keyring version {args.version} to {out}")
    return EXIT_OK


def cmd_keyring_push(args: argparse.Namespace) -> int:
    try:
        envelope = json.loads(Path(args.file).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{args.file}: not a readable keyring JSON file ({exc})") from None
    row = client_from_args(args).post(f"{API}/keyring/", {"envelope": envelope})
    if args.json:
        print_json(row)
    else:
        state = "retained for devices" if row.get("published") else "stored, NOT yet published (broker unreachable)"
        print(f"keyring version {row['version']} {state}")
    return EXIT_OK


def cmd_keyring_show(args: argparse.Namespace) -> int:
    import base64

    row = client_from_args(args).get(f"{API}/keyring/")
    doc = json.loads(base64.b64decode(row["envelope"]["payload"]))
    print_json({**{k: row[k] for k in ("version", "expires_at", "created_at", "created_by")}, "keyring": doc})
    return EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    """Rollout-key rotation, one stage per call (see the module docstring)."""
    import base64

    client = client_from_args(args)
    current = client.get(f"{API}/keyring/")
    doc = json.loads(base64.b64decode(current["envelope"]["payload"]))
    new = read_pems([args.new_rollout], "--new-rollout")[0]
    old = [pem for pem in doc["rollout"]["keys"] if pem.strip() != new.strip()]
    rollout = [*old, new] if args.stage == "add" else [new]
    release = read_pems(args.release, "--release") if args.release else doc["release"]["keys"]
    threshold = args.release_threshold or doc["release"]["threshold"]
    envelope = signed_keyring(root_path=args.root, version=current["version"] + 1,
                              expires=parse_expiry(args.expires), release=release, rollout=rollout,
                              release_threshold=threshold, reset_seqs=args.reset_seqs)
    row = client.post(f"{API}/keyring/", {"envelope": envelope})
    print(f"keyring version {row['version']} pushed: rollout keys {len(rollout)}, release keys {len(release)}")
    if args.stage == "add":
        print("next: install the new rollout private key as the server's ROLLOUT_KEY_PATH, restart the web and "
              "worker processes, then run `fleetctl keys rotate --stage retire` with the same --new-rollout")
    else:
        print("the old rollout key is retired: every device refuses directives it signs (UNKNOWN_KEY)")
    return EXIT_OK


def add_parser(sub) -> None:
    common = common_options()
    keyring = sub.add_parser("keyring", help="the root-signed keyring devices take keys from: sign, push, show")
    keyring_sub = keyring.add_subparsers(dest="keyring_command", metavar="ACTION", parser_class=Parser)
    keyring_sub.required = True
    sign = keyring_sub.add_parser("sign", help="sign a keyring with the offline root key (no server needed)")
    sign.add_argument("--root", required=True, metavar="ROOT.pem", help="the root private key")
    sign.add_argument("--release", required=True, action="append", metavar="PUB.pem", help="repeatable")
    sign.add_argument("--release-threshold", type=int, default=1, metavar="K")
    sign.add_argument("--rollout", required=True, action="append", metavar="PUB.pem", help="repeatable")
    sign.add_argument("--version", type=int, required=True, metavar="N", help="higher than the devices' keyring")
    sign.add_argument("--expires", default="365d", metavar="365d|48h")
    sign.add_argument("--out", required=True, metavar="keyring.json")
    sign.add_argument("--reset-seqs", action="store_true", help=RESET_HELP)
    sign.set_defaults(func=cmd_keyring_sign)
    push = keyring_sub.add_parser("push", parents=[common], help="upload a signed keyring (admin)")
    push.add_argument("file", metavar="keyring.json")
    push.add_argument("--json", action="store_true")
    push.set_defaults(func=cmd_keyring_push)
    show = keyring_sub.add_parser("show", parents=[common], help="the server's current keyring")
    show.set_defaults(func=cmd_keyring_show)


def add_rotate_parser(keys_sub, common) -> None:
    rotate = keys_sub.add_parser(
        "rotate", parents=[common],
        help="rotate the rollout key through two root-signed keyrings: --stage add, then --stage retire (admin)",
    )
    rotate.add_argument("--root", required=True, metavar="ROOT.pem")
    rotate.add_argument("--new-rollout", required=True, metavar="PUB.pem", help="the new rollout public key")
    rotate.add_argument("--stage", required=True, choices=("add", "retire"))
    rotate.add_argument("--release", action="append", metavar="PUB.pem",
                        help="replace the release keys too (repeatable; default: keep the current ones)")
    rotate.add_argument("--release-threshold", type=int, default=0, metavar="K")
    rotate.add_argument("--expires", default="365d", metavar="365d|48h")
    rotate.add_argument("--reset-seqs", action="store_true", help=RESET_HELP)
    rotate.set_defaults(func=cmd_keys_rotate)
