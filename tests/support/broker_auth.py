"""A private Mosquitto running the deploy/ security config (dynamic security, anonymous off),
with a freshly written dynamic-security.json holding only the service account."""

from __future__ import annotations

import glob
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ota.broker import write_initial_config
from tests.support.mosquitto import Mosquitto

DEPLOY_CONF = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "mosquitto.conf"
# Lines the test harness owns: its own listener, no persistence, logs in the temp dir.
_HARNESS_KEYS = ("listener", "persistence", "persistence_location", "log_dest", "log_type", "user", "pid_file")


def deploy_config_for(dynsec_path: Path) -> str:
    lines = []
    for line in DEPLOY_CONF.read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key in _HARNESS_KEYS or key == "max_packet_size":
            continue
        if key == "plugin":
            plugin = line.split(" ", 1)[1]
            if not Path(plugin).exists():
                found = glob.glob("/usr/lib/**/mosquitto_dynamic_security.so", recursive=True)
                if found:
                    line = f"plugin {found[0]}"
        if key == "plugin_opt_config_file":
            line = f"plugin_opt_config_file {dynsec_path}"
        lines.append(line)
    # Running as root, Mosquitto would drop to the `mosquitto` user and could not save the
    # dynsec file into a root-owned temp dir.
    lines.append("user root")
    return "\n".join(lines) + "\n"


@dataclass
class SecureBroker:
    broker: Mosquitto
    username: str
    password: str
    host: str = "127.0.0.1"
    topic_root: str = "fleet"
    dynsec_path: Path = field(default=None)

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def settings(self) -> dict:
        """Django settings overrides pointing the server at this broker."""
        return {
            "MQTT_HOST": self.host,
            "MQTT_PORT": self.port,
            "MQTT_USERNAME": self.username,
            "MQTT_PASSWORD": self.password,
            "MQTT_TLS": False,
            "MQTT_TOPIC_ROOT": self.topic_root,
            "MQTT_PUBLIC_HOST": self.host,
            "MQTT_PUBLIC_PORT": self.port,
            "MQTT_PUBLIC_TLS": False,
            "MQTT_BROKER_AUTH": "dynsec",
        }

    @property
    def env(self) -> dict[str, str]:
        """The same overrides as environment variables, for server subprocesses."""
        return {k: ("false" if v is False else str(v)) for k, v in self.settings.items()}

    def apply(self, settings) -> None:
        for key, value in self.settings.items():
            setattr(settings, key, value)

    def stop(self) -> None:
        self.broker.stop()

    def start(self) -> None:
        self.broker.start()


def start_secure_broker(workdir: Path, *, topic_root: str = "fleet") -> SecureBroker:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dynsec_path = workdir / "dynamic-security.json"
    username = "modelfleet-server"
    password = secrets.token_urlsafe(24)
    write_initial_config(dynsec_path, service_username=username, service_password=password, topic_root=topic_root)
    broker = Mosquitto(workdir, config=deploy_config_for(dynsec_path)).start()
    return SecureBroker(broker=broker, username=username, password=password, topic_root=topic_root, dynsec_path=dynsec_path)


def log_mentions(broker: SecureBroker, pattern: str) -> bool:
    return re.search(pattern, broker.broker.log_text()) is not None
