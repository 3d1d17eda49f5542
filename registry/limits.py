"""The bounds every entry (API, web UI, admin, CLI) puts on what people and pipelines type: one
function per rule, called from each entry, so the API and the UI cannot drift apart. The lowest
layer of the server (registry imports nothing of ota or web), so every app can use it. The
maxima are documented in README.md ("Limits on input"); rollout-specific ones (waves, gates,
device lists) live in ota/rollouts/definition.py."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

# Longest duration anyone may type (tokens, enrollment tokens): ten years. Far beyond any sane
# expiry, far below what overflows a datetime or a database interval.
MAX_DURATION = timedelta(days=3650)

# Instants people may ask about (?at= on aliases): the registry holds nothing older, and far
# from the edges of datetime (year 1..9999), where converting a time zone overflows.
MIN_INSTANT = datetime(1970, 1, 1, tzinfo=UTC)
MAX_INSTANT = datetime(3000, 1, 1, tzinfo=UTC)

# Nesting of a JSON request body: the deepest document the API takes (rollout gates) is 3 deep;
# past a few hundred the parser itself runs out of recursion.
MAX_JSON_DEPTH = 32

# Uses of one enrollment token (API, web UI, CLI).
MAX_ENROLLMENT_USES = 1_000_000

# Pagination (?limit=, ?offset=): an offset past a bigint overflows the database.
MAX_PAGE_LIMIT = 1000
MAX_PAGE_OFFSET = 10**9

_DURATION_RE = re.compile(r"^(\d{1,9})([smhdw])$")
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}

# Characters no field takes: the C0 controls, DEL and the C1 controls (PostgreSQL cannot store
# NUL in text or jsonb at all; the others are invisible and end up in logs and terminals), and
# lone surrogates (not encodable as UTF-8). Tab, line feed and carriage return are text: a
# reason, a description, a wave plan or a device list typed over several lines has them.
_FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
# Where no text belongs (URL paths, JSON keys, query parameter names): those three as well.
_FORBIDDEN_IN_NAMES = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def parse_duration(text: str, *, maximum: timedelta = MAX_DURATION) -> timedelta:
    """'90s', '30m', '12h', '1d', '2w' -> timedelta; ValueError with the accepted forms (and the
    maximum) otherwise."""
    match = _DURATION_RE.match(str(text).strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration; use a positive number with s, m, h, d or w (e.g. 1d, 12h)")
    value = timedelta(**{_DURATION_UNITS[match.group(2)]: int(match.group(1))})
    if value > maximum:
        raise ValueError(f"{text!r} is longer than the maximum of {maximum.days} days")
    return value


def instant_check(value: datetime) -> datetime:
    """An aware datetime within MIN_INSTANT..MAX_INSTANT, in UTC; ValueError naming the range
    otherwise (also for a local time whose conversion to UTC leaves the datetime range)."""
    try:
        utc = value.astimezone(UTC)
    except (OverflowError, ValueError):
        utc = None
    if utc is None or not MIN_INSTANT <= utc < MAX_INSTANT:
        raise ValueError(
            f"{value.isoformat()} is outside the accepted range {MIN_INSTANT:%Y-%m-%d} to {MAX_INSTANT:%Y-%m-%d}"
        )
    return utc


def bad_character(text: str, *, name: bool = False) -> str | None:
    """The first character of `text` no field takes, described as 'U+0000', or None. `name`:
    `text` is an identifier (a URL path, a JSON key, a parameter name), where tab, line feed
    and carriage return are refused too."""
    match = (_FORBIDDEN_IN_NAMES if name else _FORBIDDEN).search(text)
    return f"U+{ord(match.group()):04X}" if match else None


def bad_character_message(where: str, found: str) -> str:
    return (
        f"{where} contains the control character {found}; control characters (and NUL) are not accepted "
        "(tab, line feed and carriage return are, in text values)"
    )


def text_check(value: str, *, where: str, name: bool = False) -> str:
    """`value` unchanged, or ValueError saying which character of `where` is refused."""
    found = bad_character(value, name=name)
    if found:
        raise ValueError(bad_character_message(where, found))
    return value
