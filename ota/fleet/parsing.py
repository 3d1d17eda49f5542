"""Parsing and checking what operators type about devices: labels (API, CLI, UI). Durations are
registry.limits.parse_duration."""

from __future__ import annotations

import re

from registry.limits import text_check

LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}\Z")  # \Z: "$" would let a trailing newline in
MAX_LABELS = 32
MAX_LABEL_VALUE = 128
LABEL_KEY_RULE = "1-63 letters, digits, '.', '_', '/' or '-', starting with a letter or digit"


def parse_label_pairs(pairs: list[str] | None) -> dict[str, str]:
    """['site=eu', 'tier=gold'] -> {'site': 'eu', 'tier': 'gold'}; ValueError names the bad pair."""
    labels: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"label {pair!r} must look like key=value")
        labels[key.strip()] = value.strip()
    return validate_labels(labels)


def validate_labels(labels: object) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise ValueError("labels must be an object of string keys to string values")
    if len(labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels are allowed, got {len(labels)}")
    for key, value in labels.items():
        if not isinstance(key, str) or not LABEL_KEY_RE.match(key):
            raise ValueError(
                f"label key {key!r} must be {LABEL_KEY_RULE}"
            )
        if not isinstance(value, str):
            raise ValueError(f"label {key!r} must have a string value, got {type(value).__name__}")
        if len(value) > MAX_LABEL_VALUE:
            raise ValueError(f"label {key!r} value is longer than {MAX_LABEL_VALUE} characters")
        text_check(value, where=f"label {key!r}", name=True)  # the CLI's way in; the API's parser refuses them too
    return dict(labels)


def parse_label_filter(text: str) -> tuple[str, str | None]:
    """'site=berlin' -> ('site', 'berlin'); 'camera' -> ('camera', None), meaning "has the label".
    Keys follow the rule labels are stored with; ValueError names the offending piece."""
    key, sep, value = text.strip().partition("=")
    key = key.strip()
    if not LABEL_KEY_RE.match(key):
        raise ValueError(f"{text.strip()!r} is not key=value or key (a key is {LABEL_KEY_RULE})")
    value = value.strip()
    if sep:
        text_check(value, where=f"the value of label filter {key!r}", name=True)
    return key, value if sep else None
