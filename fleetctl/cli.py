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
import sys

from fleetctl import __version__, aliases, hardware, keyring, keys, push, rollout, verify, versions
from fleetctl.client import ApiError, ConfigError
from fleetctl.common import EXIT_REFUSED, EXIT_SERVER, EXIT_USAGE, Parser, UsageError, common_options, eprint


def build_parser() -> argparse.ArgumentParser:
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
    for command in (push, versions, hardware, aliases, verify, rollout):
        command.add_parser(sub)
    keys.add_parser(sub, extra_actions=(keyring.add_rotate_parser,))
    keyring.add_parser(sub)
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
