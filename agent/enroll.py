"""`fleet-agent enroll`: one API call, then DIR/agent.toml (mode 0600) that `fleet-agent run` loads.

Plain standard library on purpose: an edge box enrolls before anything else is set up.
"""

from __future__ import annotations

import json
import socket
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

from agent.config import ConfigError, parse_config
from agent.journal import atomic_write_bytes

CONFIG_NAME = "agent.toml"

# Same meanings as the rest of fleet-agent (agent/cli.py): 1 refused or failed, 2 usage.
EXIT_OK = 0
EXIT_REFUSED = 1  # the server said no (bad token, unknown hardware, ...)
EXIT_UNREACHABLE = 1  # no answer, or a server-side failure worth retrying
EXIT_USAGE = 2  # bad arguments or an existing enrollment


class EnrollError(Exception):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def parse_labels(pairs: list[str] | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise EnrollError(f"--label {pair!r} must look like key=value", EXIT_USAGE)
        labels[key.strip()] = value.strip()
    return labels


def request_enrollment(server: str, token: str, body: dict, *, timeout: float = 30.0) -> dict:
    url = server.rstrip("/") + "/api/v1/enroll"
    data = json.dumps({**body, "token": token}).encode("utf-8")
    req = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json", "Accept": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            error = json.loads(raw)["error"]
            message = f"{error.get('message')} [{error.get('code')}]"
        except (ValueError, KeyError, TypeError):
            message = raw[:300].decode("utf-8", "replace") or exc.reason
        code = EXIT_REFUSED if 400 <= exc.code < 500 else EXIT_UNREACHABLE
        raise EnrollError(f"enrollment refused by {url} (HTTP {exc.code}): {message}", code) from None
    except urllib.error.URLError as exc:
        raise EnrollError(f"cannot reach {url}: {exc.reason}", EXIT_UNREACHABLE) from None
    except (OSError, ValueError) as exc:
        raise EnrollError(f"enrollment at {url} failed: {exc}", EXIT_UNREACHABLE) from None


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        # JSON string escapes (\n, \", \\, \uXXXX) are valid TOML basic-string escapes.
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def render_config(answer: dict, *, server_url: str, state_dir: Path) -> str:
    mqtt = answer["mqtt"]
    lines = [
        "# Written by `fleet-agent enroll`. Holds this device's secrets: keep it mode 0600.",
        f"device_id = {_toml_value(answer['device_id'])}",
        f"hardware = {_toml_value(answer['hardware'])}",
        f"state_dir = {_toml_value(str(state_dir))}",
        "",
        "[mqtt]",
    ]
    for key in ("host", "port", "username", "password", "tls", "topic_root", "keepalive"):
        if key in mqtt and mqtt[key] is not None:
            lines.append(f"{key} = {_toml_value(mqtt[key])}")
    lines += [
        "",
        "[server]",
        f"url = {_toml_value(server_url)}",
        f"token = {_toml_value(answer['server']['token'])}",
        "",
        "[keys]",
        f"release = {_toml_value(answer['keys']['release'])}",
        f"rollout = {_toml_value(answer['keys']['rollout'])}",
        "",
    ]
    return "\n".join(lines)


def enroll(
    *, server: str, token: str, hardware: str, labels: dict[str, str], state_dir: Path, name: str = "",
    force: bool = False,
) -> Path:
    if not server.startswith(("http://", "https://")):
        raise EnrollError(f"--server must start with http:// or https://, got {server!r}", EXIT_USAGE)
    if not token:
        raise EnrollError("--token is required (an enrollment token from your fleet admin)", EXIT_USAGE)
    if not hardware:
        raise EnrollError("--hardware is required (the hardware target id of this box)", EXIT_USAGE)
    state_dir = Path(state_dir).expanduser().absolute()
    config_path = state_dir / CONFIG_NAME
    if config_path.exists() and not force:
        raise EnrollError(
            f"{config_path} already exists: this box is enrolled. Remove it (or pass --force) to enroll again.",
            EXIT_USAGE,
        )
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise EnrollError(f"cannot create state dir {state_dir}: {exc.strerror}", EXIT_USAGE) from None
    answer = request_enrollment(server, token, {"hardware": hardware, "labels": labels, "name": name or ""})
    try:
        text = render_config(answer, server_url=server.rstrip("/"), state_dir=state_dir)
        parse_config(tomllib.loads(text))  # never write a file `fleet-agent run` would refuse
    except (KeyError, TypeError, ConfigError, ValueError) as exc:
        raise EnrollError(f"the server's enrollment answer is unusable: {exc}", EXIT_UNREACHABLE) from None
    atomic_write_bytes(config_path, text.encode("utf-8"))  # mode 0600 from creation: it holds credentials
    return config_path


def enroll_command(args) -> int:
    """Entry point for `fleet-agent enroll` (args: server, token, hardware, label, state_dir, name)."""
    try:
        path = enroll(
            server=args.server or "",
            token=args.token or "",
            hardware=args.hardware or "",
            labels=parse_labels(getattr(args, "label", None)),
            state_dir=Path(args.state_dir),
            name=getattr(args, "name", None) or socket.gethostname(),
            force=bool(getattr(args, "force", False)),
        )
    except EnrollError as exc:
        print(f"fleet-agent enroll: {exc}", file=sys.stderr)
        return exc.exit_code
    config = parse_config(tomllib.loads(path.read_text()))
    print(f"enrolled as {config.device_id}; wrote {path}")
    print(f"start the agent with: fleet-agent run --config {path}")
    return EXIT_OK
