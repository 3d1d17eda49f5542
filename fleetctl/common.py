"""What every fleetctl command shares: exit codes, the configured client, output helpers and
the argument-parser pieces. Both fleetctl.cli and its subcommand modules (fleetctl.rollout)
import from here, so neither imports the other's internals."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from fleetctl.client import FleetClient, from_environment

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_SERVER = 4

API = "/api/v1"


class UsageError(Exception):
    """Bad arguments or an unusable local file; exit code 2."""


def client_from_args(args: argparse.Namespace) -> FleetClient:
    """The configured client for a parsed command line (--url/--token, else FLEET_URL/FLEET_TOKEN)."""
    return from_environment(getattr(args, "url", None), getattr(args, "token", None), timeout=getattr(args, "timeout", 300.0))


def eprint(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """Print rows as an aligned text table; `columns` is [(key, HEADER), ...]."""
    cells = [[h for _, h in columns]] + [["" if r.get(k) is None else str(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own exit code is already 2; keep its message style
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def common_options(*, top_level: bool = False) -> argparse.ArgumentParser:
    """--url/--token/--timeout as a parent parser, so they work before or after the subcommand.

    Subcommand copies default to SUPPRESS: otherwise a subparser's None would overwrite a value
    given before the subcommand. Every subcommand passes `parents=[common_options()]`.
    """
    common = argparse.ArgumentParser(add_help=False)
    default = None if top_level else argparse.SUPPRESS
    common.add_argument("--url", default=default, help="server base URL (default: $FLEET_URL)")
    common.add_argument("--token", default=default,
                        help="API token (default: $FLEET_TOKEN); sent as 'Authorization: Bearer'")
    common.add_argument("--timeout", type=float, default=300.0 if top_level else argparse.SUPPRESS,
                        help="seconds per request (default: 300)")
    return common


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
