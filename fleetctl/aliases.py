"""`fleetctl alias set|list`: show or move a model's aliases (production, staging, ...)."""

from __future__ import annotations

import argparse

from fleetctl.client import path_quote
from fleetctl.common import (
    API,
    EXIT_OK,
    Parser,
    client_from_args,
    common_options,
    print_json,
    print_table,
)


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


def add_parser(sub) -> None:
    common = common_options()
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
