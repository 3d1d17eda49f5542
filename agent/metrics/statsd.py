"""StatsD lines, in the DogStatsD dialect the usual clients speak (`statsd`, `datadog`, Telegraf):

    <name>:<value>|<type>[|@<sample rate>][|#<tag>:<value>,...]

with type c (counter), ms / h / d (timing, histogram, distribution) or g (gauge). The agent cares
about the `inference.` names; it reads the model from a `model:` tag. Parsing is pure and never
raises: a bad line comes back as a `Rejected` naming why, so the listener can count it."""

from __future__ import annotations

import math
from dataclasses import dataclass

PREFIX = "inference."
KINDS = {"c": "counter", "ms": "timing", "h": "timing", "d": "timing", "g": "gauge"}
MAX_NAME = 200


@dataclass(frozen=True)
class Sample:
    name: str          # without the "inference." prefix: latency_ms, requests, errors, output.<label>
    value: float
    kind: str          # counter, timing or gauge
    rate: float = 1.0  # a counter sampled at rate r counts 1/r per line
    model: str | None = None


@dataclass(frozen=True)
class Rejected:
    line: str
    reason: str


def parse_datagram(data: bytes) -> list[Sample | Rejected]:
    """One UDP datagram may hold several lines (clients batch them)."""
    text = data.decode("utf-8", "replace")
    return [parse_line(line) for line in text.splitlines() if line.strip()]


def parse_line(line: str) -> Sample | Rejected:
    line = line.strip()
    head, _, rest = line.partition("|")
    name, sep, raw_value = head.rpartition(":")
    if not sep or not rest:
        return Rejected(line[:120], "not name:value|type")
    if not name.startswith(PREFIX):
        return Rejected(line[:120], f"name does not start with {PREFIX!r}")
    name = name[len(PREFIX):]
    if not name or len(name) > MAX_NAME or any(c.isspace() or c in "|#@" for c in name):
        return Rejected(line[:120], "bad metric name")
    try:
        value = float(raw_value)
    except ValueError:
        return Rejected(line[:120], f"value {raw_value[:20]!r} is not a number")
    if not math.isfinite(value):
        return Rejected(line[:120], "value is not finite")
    parts = rest.split("|")
    kind = KINDS.get(parts[0])
    if kind is None:
        return Rejected(line[:120], f"unknown type {parts[0][:8]!r}")
    rate, model = 1.0, None
    for part in parts[1:]:
        if part.startswith("@"):
            try:
                rate = float(part[1:])
            except ValueError:
                return Rejected(line[:120], "bad sample rate")
            if not 0 < rate <= 1:
                return Rejected(line[:120], "sample rate must be in (0, 1]")
        elif part.startswith("#"):
            for tag in part[1:].split(","):
                key, _, tag_value = tag.partition(":")
                if key == "model" and tag_value:
                    model = tag_value
    return Sample(name=name, value=value, kind=kind, rate=rate, model=model)
