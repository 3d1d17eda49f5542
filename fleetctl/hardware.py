"""`fleetctl hardware create|list`: the hardware targets artifacts are built for (one artifact per
target per version), so a CI pipeline can set up a fresh server by itself."""

from __future__ import annotations

import argparse

from fleetctl.client import ApiError
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
from fleetctl.progress import human_bytes


def cmd_hardware_create(args: argparse.Namespace) -> int:
    if args.max_bytes < 1:
        raise UsageError("--max-bytes must be at least 1 (the largest artifact this hardware accepts)")
    try:
        created = client_from_args(args).post(
            f"{API}/hardware/", {"id": args.id, "description": args.description, "max_artifact_bytes": args.max_bytes}
        )
    except ApiError as exc:
        if not (args.if_missing and exc.code == "hardware_exists"):
            raise
        eprint(f"hardware {args.id} exists already; left as it is (--if-missing)")
        return EXIT_OK
    return print_result(
        created, as_json=args.json,
        line=lambda r: f"created hardware {r['id']} (artifacts up to {human_bytes(r['max_artifact_bytes'])})",
    )


def cmd_hardware_list(args: argparse.Namespace) -> int:
    return print_listing(
        client_from_args(args).get_all(f"{API}/hardware/"),
        [("id", "ID"), ("max", "MAX ARTIFACT"), ("description", "DESCRIPTION")],
        as_json=args.json,
        computed={"max": lambda r: human_bytes(r.get("max_artifact_bytes") or 0)},
    )


def add_parser(sub) -> None:
    common = common_options()
    hardware = sub.add_parser("hardware", help="create or list hardware targets")
    hardware_sub = hardware.add_subparsers(dest="hardware_command", metavar="ACTION", parser_class=Parser)
    hardware_sub.required = True
    create = hardware_sub.add_parser("create", parents=[common], help="create a hardware target (ci)")
    create.add_argument("--id", required=True, help="e.g. jetson-orin, rpi5 (letters, digits, '-', '_')")
    create.add_argument("--description", default="", help="what the target is")
    create.add_argument("--max-bytes", type=int, required=True, metavar="N",
                        help="the largest artifact this hardware accepts, in bytes")
    create.add_argument("--if-missing", action="store_true",
                        help="succeed without change when the target exists already (for CI jobs that re-run)")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=cmd_hardware_create)
    listing = hardware_sub.add_parser("list", parents=[common], help="list hardware targets")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_hardware_list)
