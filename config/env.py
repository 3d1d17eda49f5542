"""Typed environment helpers that fail loudly.

A bad value stops the process at start-up with a message naming the variable, instead of
surfacing later as a confusing runtime error. Any variable may instead be given as NAME_FILE,
the path of a file holding the value (for secrets mounted by an orchestrator).
"""

from __future__ import annotations

import os
import re
from pathlib import Path


class ConfigError(Exception):
    pass


_UNSET = object()


def _raw(name: str) -> str | None:
    file_var = f"{name}_FILE"
    if os.environ.get(file_var):
        path = Path(os.environ[file_var])
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{file_var}={path}: cannot read the file: {exc.strerror}") from None
    return os.environ.get(name)


def env_str(name: str, default=_UNSET, *, choices: tuple[str, ...] | None = None) -> str:
    value = _raw(name)
    if value is None or value == "":
        if default is _UNSET:
            raise ConfigError(f"{name} is required but not set")
        return default
    if choices and value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of: {', '.join(choices)}")
    return value


def env_int(name: str, default: int, *, min_value: int | None = None, max_value: int | None = None) -> int:
    value = _raw(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None
    if min_value is not None and number < min_value:
        raise ConfigError(f"{name}={number} is below the minimum {min_value}")
    if max_value is not None and number > max_value:
        raise ConfigError(f"{name}={number} is above the maximum {max_value}")
    return number


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_bool(name: str, default: bool) -> bool:
    value = _raw(name)
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean (use one of: true, false, 1, 0, yes, no)")


def env_list(name: str, default: list[str]) -> list[str]:
    value = _raw(name)
    if value is None or value == "":
        return list(default)
    return [item.strip() for item in value.split(",") if item.strip()]


def env_path(name: str, default: Path) -> Path:
    value = _raw(name)
    return Path(value).expanduser().resolve() if value else default


_HEADER_NAME = re.compile(r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*")


def env_http_header(name: str) -> str | None:
    """An HTTP request header name (e.g. X-Forwarded-Proto) as Django's request.META key
    (HTTP_X_FORWARDED_PROTO); None when unset. Letters, digits and single dashes only: WSGI servers
    drop or merge header names with underscores, so such a name could never match."""
    value = _raw(name)
    if value is None or value.strip() == "":
        return None
    header = value.strip()
    if not _HEADER_NAME.fullmatch(header):
        raise ConfigError(
            f"{name}={value!r} is not an HTTP header name "
            "(letters, digits and dashes, e.g. X-Forwarded-Proto)"
        )
    return "HTTP_" + header.upper().replace("-", "_")
