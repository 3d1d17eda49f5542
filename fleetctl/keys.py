"""`fleetctl keys generate|add|list|revoke`: release keys for offline signing
(RELEASE_SIGNING=offline). `generate` makes an Ed25519 key pair on this machine (the private key
never leaves it); `add`, `list` and `revoke` manage the server's registered release public keys
(admin token). `fleetctl push --release --sign-with KEY.pem` signs with such a key."""

from __future__ import annotations

import argparse
import base64
import os
from pathlib import Path

from fleetctl.client import path_quote
from fleetctl.common import (
    API,
    EXIT_OK,
    Parser,
    UsageError,
    client_from_args,
    common_options,
    eprint,
)
from fleetctl.output import print_listing, print_result


def public_path_for(private_path: Path) -> Path:
    """KEY.pem -> KEY.pub.pem (any other name gets .pub.pem appended)."""
    name = private_path.name
    stem = name[: -len(".pem")] if name.endswith(".pem") else name
    return private_path.with_name(stem + ".pub.pem")


def load_signing_key(path_text: str):
    """An Ed25519 private key from a PEM file, or UsageError saying why not."""
    from agent.signing import load_private_key_pem

    path = Path(path_text)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--sign-with {path}: cannot read the key: {exc.strerror}") from None
    try:
        return load_private_key_pem(data)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--sign-with {path}: not an unencrypted Ed25519 private key PEM ({exc})") from None


def sign_payload(private_key, payload_type: str, payload: bytes) -> dict:
    """One DSSE signature ({keyid, sig}) over PAE(payload_type, payload), as agent.signing checks it."""
    from agent.signing import keyid_of, pae

    return {
        "keyid": keyid_of(private_key.public_key()),
        "sig": base64.b64encode(private_key.sign(pae(payload_type, payload))).decode("ascii"),
    }


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from agent.signing import generate_private_key_pem, keyid_of, load_private_key_pem, public_key_pem

    out = Path(args.out)
    pub = public_path_for(out)
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: directory {out.parent} does not exist")
    for path in (out, pub):
        if path.exists():
            raise UsageError(f"{path} exists already; never overwritten (a key may be pinned on devices)")
    pem = generate_private_key_pem()
    try:
        # O_EXCL and 0600 from the first byte: the private key is never readable by others.
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        public = load_private_key_pem(pem).public_key()
        pub.write_text(public_key_pem(public))
    except OSError as exc:
        raise UsageError(f"cannot write the key pair: {exc}") from None
    eprint(f"wrote private key {out} (mode 0600; keep it offline) and public key {pub}")
    print(keyid_of(public))
    return EXIT_OK


def cmd_keys_add(args: argparse.Namespace) -> int:
    try:
        pem = Path(args.public_key).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{args.public_key}: cannot read the public key: {exc}") from None
    row = client_from_args(args).post(f"{API}/keys/", {"role": "release", "public_key_pem": pem})
    return print_result(row, as_json=args.json, line=lambda r: f"registered release key {r['keyid']}")


def cmd_keys_list(args: argparse.Namespace) -> int:
    return print_listing(
        client_from_args(args).get_all(f"{API}/keys/registered/"),
        [("keyid", "KEY ID"), ("role", "ROLE"), ("state", "STATE"), ("created_at", "CREATED"), ("created_by", "BY")],
        as_json=args.json,
        computed={"state": lambda r: f"revoked {r['revoked_at']}" if r.get("revoked_at") else "active"},
    )


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    row = client_from_args(args).post(
        f"{API}/keys/registered/{path_quote(args.keyid)}/revoke", {"reason": args.reason or ""}
    )
    return print_result(row, as_json=args.json, line=lambda r: f"revoked release key {r['keyid']}")


def add_parser(sub, *, extra_actions=()) -> None:
    common = common_options()
    keys = sub.add_parser("keys", help="release keys for offline signing: generate, add, list, revoke; rotate")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", parser_class=Parser)
    keys_sub.required = True
    generate = keys_sub.add_parser(
        "generate", help="write an Ed25519 key pair here: KEY.pem (0600) and KEY.pub.pem; prints the key id"
    )
    generate.add_argument("--out", required=True, metavar="KEY.pem")
    generate.set_defaults(func=cmd_keys_generate)
    add = keys_sub.add_parser("add", parents=[common], help="register a release public key on the server (admin)")
    add.add_argument("public_key", metavar="KEY.pub.pem")
    add.add_argument("--json", action="store_true")
    add.set_defaults(func=cmd_keys_add)
    listing = keys_sub.add_parser("list", parents=[common], help="list registered release keys (admin)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys_sub.add_parser("revoke", parents=[common], help="stop trusting a registered release key (admin)")
    revoke.add_argument("keyid")
    revoke.add_argument("--reason", default="")
    revoke.add_argument("--json", action="store_true")
    revoke.set_defaults(func=cmd_keys_revoke)
    for add_action in extra_actions:  # `keys rotate` (fleetctl.keyring, which imports this module)
        add_action(keys_sub, common)
