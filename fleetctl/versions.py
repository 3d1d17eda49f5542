"""`fleetctl versions MODEL` lists a model's versions; `fleetctl version delete MODEL VERSION`
deletes a draft (a released version is never deleted: the server answers 409)."""

from __future__ import annotations

import argparse

from fleetctl.client import path_quote
from fleetctl.common import (
    API,
    EXIT_OK,
    Parser,
    client_from_args,
    common_options,
    eprint,
    print_json,
    print_table,
)


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


def cmd_version_delete(args: argparse.Namespace) -> int:
    client_from_args(args).delete(f"{API}/models/{path_quote(args.model)}/versions/{path_quote(args.version)}/")
    eprint(f"deleted draft {args.model} {args.version}")
    return EXIT_OK


def add_parser(sub) -> None:
    common = common_options()
    versions = sub.add_parser("versions", parents=[common], help="list a model's versions")
    versions.add_argument("model")
    versions.add_argument("--json", action="store_true", help="print the server's JSON")
    versions.set_defaults(func=cmd_versions)

    version = sub.add_parser("version", help="act on one version of a model")
    version_sub = version.add_subparsers(dest="version_command", metavar="ACTION", parser_class=Parser)
    version_sub.required = True
    delete = version_sub.add_parser(
        "delete", parents=[common], help="delete a draft (never a released version) and its artifacts (ci)"
    )
    delete.add_argument("model")
    delete.add_argument("version")
    delete.set_defaults(func=cmd_version_delete)
