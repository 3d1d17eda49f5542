"""Agent configuration: one TOML file loaded into frozen dataclasses.

Every bad value raises ConfigError with a message naming the offending key, so an operator
fixing a box over a serial console sees exactly what to change. The enrollment command writes
this file; the key names are a contract with it (see deploy/agent.example.toml).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.protocol import IDENT_RE
from agent.signing import load_public_key_pem

DEFAULT_CONFIG_PATH = "/etc/fleet-agent/agent.toml"
DEFAULT_STATE_DIR = "/var/lib/fleet-agent"


class ConfigError(Exception):
    """A config file that the agent refuses to run with (CLI exit code 2)."""


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    topic_root: str = "fleet"
    keepalive: int = 30
    reconnect_min_seconds: float = 1.0
    reconnect_max_seconds: float = 60.0
    # While the broker cannot be reached: the first failed attempt is logged at once, then at most
    # one line (with the count of attempts since) per this many seconds (agent.mqtt.ConnectLog).
    failure_log_interval_seconds: float = 60.0
    # Events the broker acknowledged this recently are sent again when the server's ingest starts a
    # new broker session (a broker crash, say): the broker may have lost them before the server
    # took them (Mosquitto saves its queues every autosave_interval, 30 minutes by default). The
    # server keeps one copy. 0 turns it off.
    resend_window_seconds: float = 1800.0


@dataclass(frozen=True)
class ServerConfig:
    url: str = ""
    token: str = ""
    ca_file: str | None = None


@dataclass(frozen=True)
class KeysConfig:
    release: tuple[str, ...] = ()
    rollout: tuple[str, ...] = ()
    # Distinct release keys that must have signed a release (offline signing, RELEASE_SIGNATURE_THRESHOLD).
    release_threshold: int = 1
    # Root keys (agent.trust): empty on a device enrolled before keyrings, which keeps the pinned
    # release/rollout keys for ever and checks no freshness.
    root: tuple[str, ...] = ()
    # The newest signed timestamp older than this: STALE_DIRECTIVES (0: never). Only with root keys.
    max_staleness_seconds: float = 86400


@dataclass(frozen=True)
class UpdateConfig:
    disk_reserve_mb: float = 100
    reload_command: str = ""
    health_command: str = ""
    trial_seconds: float = 30
    health_interval_seconds: float = 5
    max_trial_restarts: int = 3
    max_error_rate: float = 0.05
    max_latency_ms_p95: float = 0
    precheck_timeout_seconds: float = 60
    precheck_memory_mb: int = 2048
    command_timeout_seconds: float = 30
    download_timeout_seconds: float = 30
    download_retries: int = 8
    download_backoff_seconds: float = 1.0
    download_backoff_max_seconds: float = 60.0
    download_byte_budget_factor: float = 3.0
    max_transitions: int = 40


@dataclass(frozen=True)
class TelemetryConfig:
    interval_seconds: float = 60


@dataclass(frozen=True)
class MetricsConfig:
    # Where the application that runs the model sends StatsD lines (agent/metrics/, README "Model
    # metrics"). Empty: no listener. The socket is not authenticated: keep it on loopback.
    statsd_listen: str = "127.0.0.1:8125"
    # The trial judges the new release on the app's figures (update.max_error_rate,
    # update.max_latency_ms_p95) once this many requests were reported; fewer say too little.
    min_trial_requests: int = 20


@dataclass(frozen=True)
class ShadowConfig:
    # The spool the app drops real inputs into for shadow evaluation (agent/shadow.py):
    # <state_dir>/shadow/<model>/*.npz, trimmed to the newest spool_max_files, none over
    # spool_max_file_mb (older and oversized samples are deleted).
    spool_max_files: int = 200
    spool_max_file_mb: float = 16


@dataclass(frozen=True)
class Config:
    device_id: str
    hardware: str
    state_dir: Path
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    shadow: ShadowConfig = field(default_factory=ShadowConfig)
    log_level: str = "INFO"
    path: Path | None = None


# --- validation helpers -----------------------------------------------------------------------

_MISSING = object()


def _typename(value: Any) -> str:
    return {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list"}.get(
        type(value), type(value).__name__
    )


def _get(table: dict, key: str, where: str, kind: str, default: Any = _MISSING) -> Any:
    name = f"{where}{key}"
    if key not in table:
        if default is _MISSING:
            raise ConfigError(f"{name} is required")
        return default
    value = table[key]
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {_typename(value)}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {_typename(value)}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {_typename(value)}")
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {_typename(value)}")
        value = float(value)
        # TOML allows nan and inf: nan slips through every < / > range check (a nan error-rate
        # limit would never trip) and sleep(nan) raises, so refuse both here, naming the key.
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")
    return value


def _positive(value: float, name: str, *, allow_zero: bool = False) -> float:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def _no_unknown(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"unknown key {where}{unknown[0]} (allowed: {', '.join(sorted(allowed))})")


def _table(data: dict, key: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table, got {_typename(value)}")
    return value


def _pems(table: dict, key: str) -> tuple[str, ...]:
    name = f"keys.{key}"
    value = table.get(key)
    if value is None:
        raise ConfigError(f"{name} is required (a list of pinned Ed25519 public key PEMs)")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{name} must be a non-empty list of PEM strings")
    for i, pem in enumerate(value):
        if not isinstance(pem, str):
            raise ConfigError(f"{name}[{i}] must be a PEM string, got {_typename(pem)}")
        try:
            load_public_key_pem(pem)
        except ValueError as exc:
            raise ConfigError(f"{name}[{i}] is not an Ed25519 public key PEM: {exc}") from None
    return tuple(value)


def _optional_str(table: dict, key: str, where: str) -> str | None:
    value = _get(table, key, where, "str", "")
    return value or None


def parse_listen(text: str) -> tuple[str, int]:
    """'127.0.0.1:8125' or '[::1]:8125' -> (host, port); ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not host:port (e.g. 127.0.0.1:8125)")
    return host, int(port)


# --- loading ----------------------------------------------------------------------------------


def parse_config(data: dict, *, path: Path | None = None) -> Config:
    _no_unknown(
        data,
        {"device_id", "hardware", "state_dir", "log_level", "mqtt", "server", "keys", "update", "telemetry",
         "metrics", "shadow"},
        "",
    )
    device_id = _get(data, "device_id", "", "str")
    if not IDENT_RE.match(device_id):
        raise ConfigError(f"device_id {device_id!r} must be 1-128 characters of A-Z a-z 0-9 . _ -")
    hardware = _get(data, "hardware", "", "str")
    if not hardware.strip():
        raise ConfigError("hardware must not be empty")
    state_dir = _get(data, "state_dir", "", "str", DEFAULT_STATE_DIR)
    if not state_dir or not Path(state_dir).is_absolute():
        raise ConfigError(f"state_dir must be an absolute path, got {state_dir!r}")
    log_level = _get(data, "log_level", "", "str", "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log_level must be one of DEBUG, INFO, WARNING, ERROR, got {log_level!r}")

    m = _table(data, "mqtt")
    w = "mqtt."
    _no_unknown(m, {f.name for f in MqttConfig.__dataclass_fields__.values()}, w)
    port = _get(m, "port", w, "int", MqttConfig.port)
    if not 1 <= port <= 65535:
        raise ConfigError(f"mqtt.port must be 1-65535, got {port}")
    topic_root = _get(m, "topic_root", w, "str", MqttConfig.topic_root)
    if not topic_root or any(c in topic_root for c in "#+") or topic_root.startswith("/") or topic_root.endswith("/"):
        raise ConfigError(f"mqtt.topic_root {topic_root!r} must be non-empty, without + # or outer slashes")
    keepalive = _get(m, "keepalive", w, "int", MqttConfig.keepalive)
    if not 5 <= keepalive <= 65535:
        raise ConfigError(f"mqtt.keepalive must be 5-65535 seconds, got {keepalive}")
    tls = _get(m, "tls", w, "bool", False)
    ca_file = _optional_str(m, "ca_file", w)
    if ca_file and not Path(ca_file).is_file():
        raise ConfigError(f"mqtt.ca_file {ca_file!r} does not exist")
    rmin = _positive(
        _get(m, "reconnect_min_seconds", w, "number", MqttConfig.reconnect_min_seconds),
        "mqtt.reconnect_min_seconds",
    )
    rmax = _positive(
        _get(m, "reconnect_max_seconds", w, "number", MqttConfig.reconnect_max_seconds),
        "mqtt.reconnect_max_seconds",
    )
    if rmax < rmin:
        raise ConfigError("mqtt.reconnect_max_seconds must be >= mqtt.reconnect_min_seconds")
    failure_log_interval = _positive(
        _get(m, "failure_log_interval_seconds", w, "number", MqttConfig.failure_log_interval_seconds),
        "mqtt.failure_log_interval_seconds",
    )
    resend_window = _get(m, "resend_window_seconds", w, "number", MqttConfig.resend_window_seconds)
    if not 0 <= resend_window <= 604800:
        raise ConfigError(f"mqtt.resend_window_seconds must be 0-604800 (0: off), got {resend_window}")
    mqtt = MqttConfig(
        host=_get(m, "host", w, "str", MqttConfig.host) or MqttConfig.host,
        port=port,
        username=_optional_str(m, "username", w),
        password=_optional_str(m, "password", w),
        tls=tls,
        ca_file=ca_file,
        topic_root=topic_root,
        keepalive=keepalive,
        reconnect_min_seconds=rmin,
        reconnect_max_seconds=rmax,
        failure_log_interval_seconds=failure_log_interval,
        resend_window_seconds=float(resend_window),
    )

    s = _table(data, "server")
    w = "server."
    _no_unknown(s, {"url", "token", "ca_file"}, w)
    url = _get(s, "url", w, "str", "")
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError(f"server.url must start with http:// or https://, got {url!r}")
    server_ca = _optional_str(s, "ca_file", w)
    if server_ca and not Path(server_ca).is_file():
        raise ConfigError(f"server.ca_file {server_ca!r} does not exist")
    server = ServerConfig(url=url.rstrip("/"), token=_get(s, "token", w, "str", ""), ca_file=server_ca)

    k = _table(data, "keys")
    _no_unknown(k, {"release", "rollout", "release_threshold", "root", "max_staleness_seconds"}, "keys.")
    release_pems = _pems(k, "release")
    threshold = k.get("release_threshold", 1)
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= len(release_pems):
        raise ConfigError(
            f"keys.release_threshold must be an integer from 1 to the number of keys.release "
            f"({len(release_pems)}), got {threshold!r}"
        )
    root = _pems(k, "root") if "root" in k else ()
    staleness = _positive(_get(k, "max_staleness_seconds", "keys.", "number", KeysConfig.max_staleness_seconds),
                          "keys.max_staleness_seconds", allow_zero=True)
    keys = KeysConfig(release=release_pems, rollout=_pems(k, "rollout"), release_threshold=threshold,
                      root=root, max_staleness_seconds=staleness)

    u = _table(data, "update")
    w = "update."
    _no_unknown(u, {f.name for f in UpdateConfig.__dataclass_fields__.values()}, w)
    d = UpdateConfig()

    def num(key: str, *, allow_zero: bool = False) -> float:
        return _positive(_get(u, key, w, "number", getattr(d, key)), f"update.{key}", allow_zero=allow_zero)

    def integer(key: str, *, minimum: int) -> int:
        value = _get(u, key, w, "int", getattr(d, key))
        if value < minimum:
            raise ConfigError(f"update.{key} must be >= {minimum}, got {value}")
        return value

    max_error_rate = num("max_error_rate", allow_zero=True)
    if max_error_rate > 1:
        raise ConfigError(f"update.max_error_rate must be between 0 and 1, got {max_error_rate}")
    update = UpdateConfig(
        disk_reserve_mb=num("disk_reserve_mb", allow_zero=True),
        reload_command=_get(u, "reload_command", w, "str", ""),
        health_command=_get(u, "health_command", w, "str", ""),
        trial_seconds=num("trial_seconds", allow_zero=True),
        health_interval_seconds=num("health_interval_seconds"),
        max_trial_restarts=integer("max_trial_restarts", minimum=0),
        max_error_rate=max_error_rate,
        max_latency_ms_p95=num("max_latency_ms_p95", allow_zero=True),
        precheck_timeout_seconds=num("precheck_timeout_seconds"),
        precheck_memory_mb=integer("precheck_memory_mb", minimum=64),
        command_timeout_seconds=num("command_timeout_seconds"),
        download_timeout_seconds=num("download_timeout_seconds"),
        download_retries=integer("download_retries", minimum=0),
        download_backoff_seconds=num("download_backoff_seconds", allow_zero=True),
        download_backoff_max_seconds=num("download_backoff_max_seconds", allow_zero=True),
        download_byte_budget_factor=num("download_byte_budget_factor"),
        max_transitions=integer("max_transitions", minimum=10),
    )
    if update.download_byte_budget_factor < 1:
        raise ConfigError("update.download_byte_budget_factor must be >= 1 (it multiplies the artifact length)")

    t = _table(data, "telemetry")
    _no_unknown(t, {"interval_seconds"}, "telemetry.")
    telemetry = TelemetryConfig(
        interval_seconds=_positive(_get(t, "interval_seconds", "telemetry.", "number", 60.0), "telemetry.interval_seconds")
    )
    mt = _table(data, "metrics")
    _no_unknown(mt, {"statsd_listen", "min_trial_requests"}, "metrics.")
    statsd_listen = _get(mt, "statsd_listen", "metrics.", "str", MetricsConfig.statsd_listen).strip()
    if statsd_listen:
        try:
            parse_listen(statsd_listen)
        except ValueError as exc:
            raise ConfigError(f"metrics.statsd_listen: {exc}, or \"\" to turn the listener off") from None
    min_trial_requests = _get(mt, "min_trial_requests", "metrics.", "int", MetricsConfig.min_trial_requests)
    if min_trial_requests < 1:
        raise ConfigError(f"metrics.min_trial_requests must be >= 1, got {min_trial_requests}")
    metrics = MetricsConfig(statsd_listen=statsd_listen, min_trial_requests=min_trial_requests)

    sh = _table(data, "shadow")
    _no_unknown(sh, {"spool_max_files", "spool_max_file_mb"}, "shadow.")
    spool_max_files = _get(sh, "spool_max_files", "shadow.", "int", ShadowConfig.spool_max_files)
    if not 1 <= spool_max_files <= 100_000:
        raise ConfigError(f"shadow.spool_max_files must be 1-100000, got {spool_max_files}")
    spool_max_file_mb = _positive(_get(sh, "spool_max_file_mb", "shadow.", "number", ShadowConfig.spool_max_file_mb),
                                  "shadow.spool_max_file_mb")
    shadow = ShadowConfig(spool_max_files=spool_max_files, spool_max_file_mb=float(spool_max_file_mb))
    return Config(
        device_id=device_id,
        hardware=hardware,
        state_dir=Path(state_dir),
        mqtt=mqtt,
        server=server,
        keys=keys,
        update=update,
        telemetry=telemetry,
        metrics=metrics,
        shadow=shadow,
        log_level=log_level,
        path=path,
    )


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return parse_config(data, path=path)
