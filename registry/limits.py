"""The bounds every entry (API, web UI, admin, CLI) puts on what people and pipelines type: one
function per rule, called from each entry, so the API and the UI cannot drift apart. The lowest
layer of the server (registry imports nothing of ota or web), so every app can use it. The
maxima are documented in README.md ("Limits on input")."""

from __future__ import annotations

import re
from datetime import timedelta

# Longest duration anyone may type (tokens, enrollment tokens): ten years. Far beyond any sane
# expiry, far below what overflows a datetime or a database interval.
MAX_DURATION = timedelta(days=3650)

_DURATION_RE = re.compile(r"^(\d{1,9})([smhdw])$")
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


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
