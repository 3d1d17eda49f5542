"""What the agent publishes over MQTT (through agent.mqtt.MqttLink, on `{root}/devices/{id}/...`).

- presence (retained, QoS 1): `presence()`, agent.protocol.presence_payload with the active models.
  The link sends it on every connect and leaves online=false as its last will; the run loop sends
  it again after each update (`publish_presence`).
- events (QoS 1): agent.protocol.Event payloads, written to the on-disk outbox with the journal
  write that caused them (Agent._commit); the outbox's sender thread hands them to
  `publish_event` in order and drops each once the broker acknowledged it.
- telemetry (QoS 0): `telemetry_loop`, agent.telemetry.collect every telemetry.interval_seconds.

No link (a CLI run without MQTT, or a test): nothing is published and events stay in the outbox.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from agent import __version__ as AGENT_VERSION
from agent.config import Config
from agent.journal import Journal
from agent.protocol import presence_payload

if TYPE_CHECKING:
    from agent.mqtt import MqttLink

log = logging.getLogger("fleet_agent")


def active_models(journal: Journal) -> dict[str, str]:
    """model -> the sha256 its `current` points at."""
    return {name: m["current"] for name, m in journal.data["models"].items() if m.get("current")}


def presence(online: bool, *, journal: Journal) -> bytes:
    return presence_payload(online=online, agent_version=AGENT_VERSION, active=active_models(journal))


def publish_presence(link: MqttLink | None, *, journal: Journal) -> None:
    if link and link.connected.is_set():
        link.publish("presence", presence(True, journal=journal), qos=1, retain=True, timeout=0)


def publish_event(link: MqttLink | None, payload: bytes) -> bool:
    """True once the broker acknowledged the event (PUBACK); False keeps it in the outbox."""
    return bool(link) and link.publish("events", payload, qos=1, timeout=10)


def telemetry_loop(link: MqttLink | None, *, cfg: Config, journal: Journal, stop: threading.Event) -> None:
    """Telemetry thread body: publish every interval while connected, until `stop` is set."""
    from agent.telemetry import collect

    collect(device_id=cfg.device_id, state_dir=cfg.state_dir, active={}, health=None)  # primes cpu_percent
    while not stop.wait(cfg.telemetry.interval_seconds):
        if not (link and link.connected.is_set()):
            continue
        try:
            payload = collect(device_id=cfg.device_id, state_dir=cfg.state_dir,
                              active=active_models(journal), health=journal.data.get("last_health"))
            link.publish("telemetry", payload, qos=0)
        except Exception:  # telemetry must never take the agent down
            log.exception("telemetry failed")
