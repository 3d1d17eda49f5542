"""`fleet-agent enroll`: one API call, then DIR/agent.toml (mode 0600) that `fleet-agent run` loads.

`--force` enrolls a box that is already enrolled again, as a new device: new identity and
credentials in agent.toml, installed models kept (see `enroll()` and agent/README.md).

Plain standard library on purpose: an edge box enrolls before anything else is set up.
"""

from __future__ import annotations

import json
import socket
import sys
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from agent import identity
from agent.config import ConfigError, parse_config
from agent.identity import UNKNOWN_OWNER, Rebound
from agent.journal import Journal, atomic_write_bytes
from agent.outbox import Outbox

CONFIG_NAME = "agent.toml"

# Same meanings as the rest of fleet-agent (agent/cli.py): 1 refused or failed, 2 usage.
EXIT_OK = 0
EXIT_REFUSED = 1  # the server said no (bad token, unknown hardware, ...)
EXIT_UNREACHABLE = 1  # no answer, or a server-side failure worth retrying
EXIT_USAGE = 2  # bad arguments, an existing enrollment without --force, an update in flight
EXIT_LOCKED = 3  # a fleet-agent is running on the state directory (as `fleet-agent run`'s 3)


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
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes (\n, \", \\, \uXXXX) are valid TOML basic-string escapes.
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


# What the server's answer sets; `--force` keeps every other setting of the agent.toml it replaces.
_ANSWER_MQTT_KEYS = ("host", "port", "username", "password", "tls", "topic_root", "keepalive")
_KEPT_TABLES = ("update", "telemetry", "metrics", "shadow")


def kept_settings(old: dict) -> dict:
    """The settings of a replaced agent.toml that are the box's, not its identity's: log_level,
    [mqtt] keys the enrollment answer does not set (ca_file, reconnect and log intervals),
    server.ca_file, and the [update], [telemetry], [metrics] and [shadow] tables (reload and health commands...)."""
    kept: dict = {}
    if "log_level" in old:
        kept["log_level"] = old["log_level"]
    mqtt = {k: v for k, v in (old.get("mqtt") or {}).items() if k not in _ANSWER_MQTT_KEYS}
    if mqtt:
        kept["mqtt"] = mqtt
    if isinstance(old.get("server"), dict) and "ca_file" in old["server"]:
        kept["server"] = {"ca_file": old["server"]["ca_file"]}
    for table in _KEPT_TABLES:
        if isinstance(old.get(table), dict) and old[table]:
            kept[table] = dict(old[table])
    return kept


def render_config(answer: dict, *, server_url: str, state_dir: Path, kept: dict | None = None) -> str:
    mqtt = answer["mqtt"]
    kept = kept or {}
    lines = [
        "# Written by `fleet-agent enroll`. Holds this device's secrets: keep it mode 0600.",
        f"device_id = {_toml_value(answer['device_id'])}",
        f"hardware = {_toml_value(answer['hardware'])}",
        f"state_dir = {_toml_value(str(state_dir))}",
    ]
    if kept:
        lines.append("# log_level, [update], [telemetry], [metrics], [shadow] and the keys below marked so: kept from the replaced agent.toml")
    if "log_level" in kept:
        lines.append(f"log_level = {_toml_value(kept['log_level'])}")
    lines += ["", "[mqtt]"]
    for key in _ANSWER_MQTT_KEYS:
        if key in mqtt and mqtt[key] is not None:
            lines.append(f"{key} = {_toml_value(mqtt[key])}")
    lines += [f"{key} = {_toml_value(value)}  # kept" for key, value in (kept.get("mqtt") or {}).items()]
    lines += [
        "",
        "[server]",
        f"url = {_toml_value(server_url)}",
        f"token = {_toml_value(answer['server']['token'])}",
    ]
    lines += [f"{key} = {_toml_value(value)}  # kept" for key, value in (kept.get("server") or {}).items()]
    lines += [
        "",
        "[keys]",
        f"release = {_toml_value(answer['keys']['release'])}",
        f"rollout = {_toml_value(answer['keys']['rollout'])}",
        f"release_threshold = {_toml_value(answer['keys'].get('release_threshold', 1))}",
        *([f"root = {_toml_value(answer['keys']['root'])}"] if answer["keys"].get("root") else []),
        "",
    ]
    for table in _KEPT_TABLES:
        if kept.get(table):
            lines += [f"[{table}]", *(f"{k} = {_toml_value(v)}" for k, v in kept[table].items()), ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class Enrolled:
    path: Path
    device_id: str
    rebound: Rebound | None = None  # the state directory was another identity's (re-enrollment)
    models: dict[str, str] = field(default_factory=dict)  # installed models kept: name -> sha256
    not_kept: str = ""  # why the replaced agent.toml's settings could not be kept ("" if they were)


def _read_old_config(path: Path) -> tuple[dict | None, str]:
    """(the replaced agent.toml as a dict, or None; why it could not be read, or "")."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")), ""
    except FileNotFoundError:
        return None, ""
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return None, f"{path} could not be read ({exc})"


def _owner_of(journal: Journal, old_config: dict | None) -> str:
    """Whose the journal is, for a journal that does not record it (agent.identity.owner is None):
    the replaced agent.toml's device, else whoever its last events were made for, else unknown.
    Never the device about to be created, so the journal is always rebound to it."""
    if old_config and isinstance(old_config.get("device_id"), str) and old_config["device_id"]:
        return old_config["device_id"]
    for item in reversed(journal.data.get("last_events") or []):
        try:
            made_for = json.loads(item["payload"]).get("device_id")
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
        if isinstance(made_for, str) and made_for:
            return made_for
    return UNKNOWN_OWNER


def enroll(
    *, server: str, token: str, hardware: str, labels: dict[str, str], state_dir: Path, name: str = "",
    force: bool = False,
) -> Enrolled:
    """Enroll this box as a new device and write DIR/agent.toml.

    Over a state directory that already holds a device's state (`force`, or an agent.toml that
    was removed), the installed models stay and the journal and outbox move to the new identity
    (agent.identity.rebind, right after agent.toml is written, under the state directory's lock;
    should enroll be cut short in between, the agent does it when it starts). The replaced
    agent.toml's own settings are kept (`kept_settings`). Refused, before the server is asked (no
    token use spent), while an agent runs on the directory or an update is in flight in it.
    """
    if not server.startswith(("http://", "https://")):
        raise EnrollError(f"--server must start with http:// or https://, got {server!r}", EXIT_USAGE)
    if not token:
        raise EnrollError("--token is required (an enrollment token from your fleet admin)", EXIT_USAGE)
    if not hardware:
        raise EnrollError("--hardware is required (the hardware target id of this box)", EXIT_USAGE)
    state_dir = Path(state_dir).expanduser().absolute()
    config_path = state_dir / CONFIG_NAME
    old_config, unreadable = _read_old_config(config_path)
    if config_path.exists() and not force:
        was = old_config.get("device_id") if old_config else None
        raise EnrollError(
            f"{config_path} already exists: this box is enrolled{f' as {was}' if isinstance(was, str) else ''}. "
            "Pass --force to enroll it again as a new device (its installed models are kept), "
            "or choose another --state-dir.",
            EXIT_USAGE,
        )
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise EnrollError(f"cannot create state dir {state_dir}: {exc.strerror}", EXIT_USAGE) from None
    from agent.daemon import AgentLocked, lock_state_dir  # the daemon's own lock on the state dir

    try:
        lock = lock_state_dir(state_dir)
    except AgentLocked:
        raise EnrollError(
            f"a fleet-agent is running on {state_dir}: stop it first (e.g. systemctl stop fleet-agent), "
            "then enroll again", EXIT_LOCKED,
        ) from None
    try:
        journal = Journal(state_dir) if (state_dir / "journal.json").exists() else None
        if journal and (upd := journal.data.get("update")):
            raise EnrollError(
                f"an update of {upd.get('model')} (directive seq {upd.get('seq')}, phase {upd.get('phase')}) is in "
                f"flight in {state_dir}: start the agent and let it finish or roll back, then enroll again",
                EXIT_USAGE,
            )
        kept = kept_settings(old_config) if old_config else {}
        answer = request_enrollment(server, token, {"hardware": hardware, "labels": labels, "name": name or ""})
        try:
            text = render_config(answer, server_url=server.rstrip("/"), state_dir=state_dir)
            parse_config(tomllib.loads(text))  # never write a file `fleet-agent run` would refuse
        except (KeyError, TypeError, ConfigError, ValueError) as exc:
            raise EnrollError(f"the server's enrollment answer is unusable: {exc}", EXIT_UNREACHABLE) from None
        if kept:
            try:
                with_kept = render_config(answer, server_url=server.rstrip("/"), state_dir=state_dir, kept=kept)
                parse_config(tomllib.loads(with_kept))
                text = with_kept
            except (TypeError, ConfigError, ValueError) as exc:
                unreadable = f"the settings of the replaced {config_path} are not valid: {exc}"
        if journal is not None and identity.owner(journal) is None:
            identity.stamp(journal, _owner_of(journal, old_config))  # so that it is rebound below
        atomic_write_bytes(config_path, text.encode("utf-8"))  # mode 0600 from creation: it holds credentials
        device_id = answer["device_id"]
        rebound = identity.rebind(journal, Outbox(state_dir / "outbox"), device_id) if journal else None
        models = {n: m["current"] for n, m in (journal.data["models"] if journal else {}).items() if m.get("current")}
    finally:
        lock.close()
    return Enrolled(path=config_path, device_id=device_id, rebound=rebound, models=models,
                    not_kept=unreadable if force else "")


def enroll_command(args) -> int:
    """Entry point for `fleet-agent enroll` (args: server, token, hardware, label, state_dir, name, force)."""
    try:
        done = enroll(
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
    print(f"enrolled as {done.device_id}; wrote {done.path}")
    if done.not_kept:
        print(f"warning: no settings kept from the replaced config: {done.not_kept}; add [update] and the "
              f"others back by hand (deploy/agent.example.toml lists every key)", file=sys.stderr)
    if done.rebound:
        old = done.rebound.previous or "an unknown device"
        models = ", ".join(f"{name} ({sha[:12]})" for name, sha in sorted(done.models.items())) or "none"
        print(f"this state directory was {old}'s: installed models kept: {models}")
        print(f"directive seq reset (was {done.rebound.last_seq}); {done.rebound.retired_events} undelivered "
              f"event(s) of {old} retired to {done.path.parent / 'outbox' / 'retired'} (never sent)")
        if done.rebound.previous:
            print(f"if {old} is not coming back, revoke it on the server: POST /api/v1/devices/{old}/revoke")
    print(f"start the agent with: fleet-agent run --config {done.path}")
    return EXIT_OK
