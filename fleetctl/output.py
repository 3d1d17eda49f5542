"""What a command prints, written once: with --json what the server sent, otherwise an aligned
table of rows (print_listing, over fleetctl.common's print_table) or one line about the row a
command created or changed (print_result). Used by fleetctl.hardware and fleetctl.keys."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fleetctl.common import EXIT_OK, print_json, print_table


def print_result(row: dict, *, as_json: bool, line: Callable[[dict], str]) -> int:
    """Print the row a command created or changed: as JSON when `as_json`, else line(row).
    Returns EXIT_OK."""
    if as_json:
        print_json(row)
    else:
        print(line(row))
    return EXIT_OK


def print_listing(
    rows: list[dict],
    columns: list[tuple[str, str]],
    *,
    as_json: bool,
    computed: dict[str, Callable[[dict], Any]] | None = None,
) -> int:
    """Print `rows`: as JSON when `as_json`, else as a table of `columns` ([(key, HEADER), ...]),
    where a key in `computed` is a cell made from its row (the JSON keeps the rows as they are).
    Returns EXIT_OK."""
    if as_json:
        print_json(rows)
        return EXIT_OK
    computed = computed or {}
    print_table([{**r, **{key: cell(r) for key, cell in computed.items()}} for r in rows], columns)
    return EXIT_OK
