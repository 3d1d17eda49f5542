"""Agent config: the TOML contract with `fleet-agent enroll`, a message naming the key for every
bad value, exit code 2 from the CLI, and an example file that documents every key."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agent.config import (
    Config,
    ConfigError,
    MetricsConfig,
    MqttConfig,
    ServerConfig,
    ShadowConfig,
    TelemetryConfig,
    UpdateConfig,
    load_config,
    parse_config,
)
from tests.support.agent_harness import REPO, Keys, toml_value

KEYS = Keys.generate()


def base() -> dict:
    return {
        "device_id": "dev-001",
        "hardware": "jetson-orin",
        "state_dir": "/var/lib/fleet-agent",
        "mqtt": {"host": "127.0.0.1", "port": 1883, "username": "dev-001", "password": "pw", "tls": False,
                 "ca_file": "", "topic_root": "fleet", "keepalive": 30},
        "server": {"url": "http://127.0.0.1:8000", "token": "mfd_abc"},
        "keys": {"release": [KEYS.release_pem], "rollout": [KEYS.rollout_pem]},
        "update": {"disk_reserve_mb": 100, "reload_command": "", "health_command": "", "trial_seconds": 30,
                   "health_interval_seconds": 5, "max_trial_restarts": 3, "max_error_rate": 0.05,
                   "max_latency_ms_p95": 0, "precheck_timeout_seconds": 60, "precheck_memory_mb": 2048},
        "telemetry": {"interval_seconds": 60},
        "metrics": {"statsd_listen": "127.0.0.1:8125", "min_trial_requests": 20},
        "shadow": {"spool_max_files": 200, "spool_max_file_mb": 16},
    }


def test_it_loads_the_enrollment_contract():
    cfg = parse_config(base())
    assert cfg.device_id == "dev-001" and cfg.state_dir == Path("/var/lib/fleet-agent")
    assert cfg.mqtt.username == "dev-001" and cfg.mqtt.ca_file is None and cfg.mqtt.port == 1883
    assert cfg.server.token == "mfd_abc" and cfg.keys.release == (KEYS.release_pem,)
    assert cfg.update.trial_seconds == 30 and cfg.update.max_latency_ms_p95 == 0
    assert cfg.telemetry.interval_seconds == 60
    assert cfg.metrics.statsd_listen == "127.0.0.1:8125" and cfg.metrics.min_trial_requests == 20
    assert parse_config(_with("metrics.statsd_listen", "")).metrics.statsd_listen == ""


def _with(path: str, value):
    data = base()
    *tables, key = path.split(".")
    target = data
    for t in tables:
        target = target[t]
    if value is KeyError:
        del target[key]
    else:
        target[key] = value
    return data


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("device_id", KeyError, "device_id is required"),
        ("device_id", "bad id/with slash", "device_id"),
        ("hardware", 3, "hardware must be a string"),
        ("state_dir", "relative/dir", "state_dir must be an absolute path"),
        ("mqtt.port", "1883", "mqtt.port must be an integer"),
        ("mqtt.port", 70000, "mqtt.port must be 1-65535"),
        ("mqtt.tls", "yes", "mqtt.tls must be true or false"),
        ("mqtt.ca_file", "/nonexistent/ca.pem", "mqtt.ca_file"),
        ("mqtt.topic_root", "fleet/#", "mqtt.topic_root"),
        ("mqtt.hots", "typo", "unknown key mqtt.hots"),
        ("server.url", "ftp://x", "server.url must start with http"),
        ("keys.release", ["not a pem"], "keys.release[0] is not an Ed25519 public key PEM"),
        ("keys.rollout", [], "keys.rollout must be a non-empty list"),
        ("keys.rollout", KeyError, "keys.rollout is required"),
        ("update.trial_seconds", -1, "update.trial_seconds must be >= 0"),
        ("update.health_interval_seconds", 0, "update.health_interval_seconds must be > 0"),
        ("update.max_error_rate", 2, "update.max_error_rate must be between 0 and 1"),
        ("update.max_trial_restarts", 1.5, "update.max_trial_restarts must be an integer"),
        ("update.precheck_memory_mb", 10, "update.precheck_memory_mb must be >= 64"),
        ("update.download_byte_budget_factor", 0.5, "update.download_byte_budget_factor"),
        ("update.reload_command", ["x"], "update.reload_command must be a string"),
        ("telemetry.interval_seconds", 0, "telemetry.interval_seconds must be > 0"),
        ("update.max_error_rate", float("nan"), "update.max_error_rate must be a finite number, got nan"),
        ("update.health_interval_seconds", float("inf"), "update.health_interval_seconds must be a finite number"),
        ("mqtt.reconnect_max_seconds", float("nan"), "mqtt.reconnect_max_seconds must be a finite number"),
        ("mqtt.failure_log_interval_seconds", 0, "mqtt.failure_log_interval_seconds must be > 0"),
        ("metrics.statsd_listen", "8125", "metrics.statsd_listen: '8125' is not host:port"),
        ("metrics.statsd_listen", "localhost:99999", "metrics.statsd_listen"),
        ("metrics.min_trial_requests", 0, "metrics.min_trial_requests must be >= 1"),
        ("metrics.port", 1, "unknown key metrics.port"),
        ("shadow.spool_max_files", 0, "shadow.spool_max_files must be 1-100000"),
        ("shadow.spool_max_file_mb", 0, "shadow.spool_max_file_mb must be > 0"),
    ],
)
def test_it_names_the_key_of_every_bad_value(path, value, message):
    with pytest.raises(ConfigError) as err:
        parse_config(_with(path, value))
    assert message in str(err.value)


def test_it_refuses_a_file_that_is_not_toml(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "x"\n[mqtt\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_it_exits_2_with_the_key_named_on_a_bad_config(tmp_path):
    data = _with("mqtt.port", "not-a-port")
    path = tmp_path / "agent.toml"
    lines = []
    for k, v in data.items():
        if not isinstance(v, dict):
            lines.append(f"{k} = {toml_value(v)}")
    for table, values in data.items():
        if isinstance(values, dict):
            lines.append(f"[{table}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
    path.write_text("\n".join(lines) + "\n")
    for command in ("run", "status"):
        proc = subprocess.run([sys.executable, "-m", "agent.cli", command, "--config", str(path)],
                              capture_output=True, text=True, cwd=REPO, timeout=30, check=False)
        assert proc.returncode == 2, proc
        assert "mqtt.port must be an integer" in proc.stderr


def test_it_documents_and_accepts_every_key_in_the_example_config():
    text = (REPO / "deploy" / "agent.example.toml").read_text()
    data = tomllib.loads(text)
    data["keys"] = {"release": [KEYS.release_pem], "rollout": [KEYS.rollout_pem]}
    data["mqtt"]["ca_file"] = ""
    cfg = parse_config(data)
    assert isinstance(cfg, Config)
    for name in [*Config.__dataclass_fields__, *MqttConfig.__dataclass_fields__, *UpdateConfig.__dataclass_fields__,
                 *ServerConfig.__dataclass_fields__, *TelemetryConfig.__dataclass_fields__,
                 *MetricsConfig.__dataclass_fields__, *ShadowConfig.__dataclass_fields__]:
        if name in ("mqtt", "server", "keys", "update", "telemetry", "metrics", "shadow", "path"):
            continue
        assert re.search(rf"^#?\s*{name}\s*=", text, re.MULTILINE), f"{name} missing from the example config"
