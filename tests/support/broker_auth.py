"""A private Mosquitto running the deploy/ security config (dynamic security, anonymous off),
with a freshly written dynamic-security.json holding only the service account."""

from __future__ import annotations

import glob
import queue
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt

from ota.fleet.broker import write_initial_config
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

    def kill(self) -> None:
        self.broker.kill()


def start_secure_broker(workdir: Path, *, topic_root: str = "fleet", persistent: bool = False) -> SecureBroker:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dynsec_path = workdir / "dynamic-security.json"
    username = "modelfleet-server"
    password = secrets.token_urlsafe(24)
    write_initial_config(dynsec_path, service_username=username, service_password=password, topic_root=topic_root)
    broker = Mosquitto(workdir, config=deploy_config_for(dynsec_path), persistent=persistent).start()
    return SecureBroker(broker=broker, username=username, password=password, topic_root=topic_root, dynsec_path=dynsec_path)


def log_mentions(broker: SecureBroker, pattern: str) -> bool:
    return re.search(pattern, broker.broker.log_text()) is not None


class MqttProbe:
    """A real paho client for assertions: records what it receives, reports refusals."""

    def __init__(self, port: int, username: str | None, password: str | None, *, host: str = "127.0.0.1",
                 client_id: str | None = None):
        self.messages: queue.Queue = queue.Queue()
        self.connack = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.subacks: dict[int, list] = {}
        self._suback = threading.Condition()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"probe-{secrets.token_hex(4)}",
            protocol=mqtt.MQTTv311,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.disconnected.set()
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload, m.retain))
        self.client.on_subscribe = self._on_subscribe
        self.host, self.port = host, port

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = reason_code
        if not reason_code.is_failure:
            self.connected.set()
        else:
            self.disconnected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._suback:
            self.subacks[mid] = reason_codes
            self._suback.notify_all()

    def connect(self, timeout: float = 5.0) -> bool:
        """True when the broker accepted the connection, False when it refused."""
        self.client.reconnect_delay_set(min_delay=30, max_delay=30)  # a probe never retries on its own
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connected.is_set():
                return True
            if self.connack is not None and self.connack.is_failure:
                return False
            time.sleep(0.01)
        raise TimeoutError("no CONNACK")

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> list:
        _rc, mid = self.client.subscribe(topic, qos)
        deadline = time.monotonic() + timeout
        with self._suback:
            while mid not in self.subacks:
                if not self._suback.wait(max(deadline - time.monotonic(), 0.01)) and time.monotonic() > deadline:
                    raise TimeoutError(f"no SUBACK for {topic}")
            return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(5)

    def received(self, wait: float = 1.0) -> list[tuple[str, bytes, bool]]:
        """Everything received within `wait` seconds from now."""
        out = []
        deadline = time.monotonic() + wait
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                out.append(self.messages.get(timeout=remaining))
            except queue.Empty:
                break
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
