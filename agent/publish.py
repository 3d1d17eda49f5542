"""What the agent publishes over MQTT (through agent.mqtt.MqttLink, on `{root}/devices/{id}/...`).

- presence (retained, QoS 1): `presence()`, agent.protocol.presence_payload: the active models,
  and for a server-side reconciler, per model the release running and the last directive seq
  handled, and the update in flight (model, seq, phase). The link sends it on every connect and
  leaves online=false as its last will; every journal write that moves an update or reports a
  directive sends it again (`publish_presence`, from Agent._commit).
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
from agent.protocol import FEATURES, presence_payload

if TYPE_CHECKING:
    from agent.metrics.book import MetricsBook
    from agent.mqtt import MqttLink

log = logging.getLogger("fleet_agent")


def active_models(journal: Journal) -> dict[str, str]:
    """model -> the sha256 its `current` points at."""
    return {name: m["current"] for name, m in journal.data["models"].items() if m.get("current")}


def reported_models(journal: Journal) -> dict[str, dict]:
    """model -> {sha256, version, committed, seq}: what runs (sha256 None: nothing installed) and the
    last directive seq handled for the model (a journal from before per-model seqs bounds every
    model by its one last_seq, `seq_floor`, as admission does); with `waiting` ({seq, sha256,
    next_opening}) when an update of it is parked until a maintenance window opens."""
    data = journal.data
    seqs = data.get("seqs") or {}
    floor = data.get("seq_floor", 0)
    models = data["models"]
    parked = data.get("waiting") or {}
    out = {}
    for name in sorted(set(models) | set(seqs)):
        m = models.get(name) or {}
        out[name] = {"sha256": m.get("current"), "version": m.get("version"), "committed": bool(m.get("committed")),
                     "seq": max(seqs.get(name, 0), floor)}
        if name in parked:
            p = parked[name]
            out[name]["waiting"] = {"seq": p["seq"], "sha256": p["sha"], "next_opening": p.get("next_opening")}
    return out


def in_flight(journal: Journal) -> dict | None:
    """The update in flight as {model, seq, phase} (seq 0: a local rollback), or None."""
    upd = journal.data.get("update")
    return {"model": upd["model"], "seq": upd["seq"], "phase": upd["phase"]} if upd else None


def presence(online: bool, *, journal: Journal) -> bytes:
    """The presence payload. models and update only when online: the offline one is also the last
    will, fixed when the link is made, so it would carry stale figures (agent/README.md)."""
    if not online:
        return presence_payload(online=False, agent_version=AGENT_VERSION, active=active_models(journal))
    return presence_payload(online=True, agent_version=AGENT_VERSION, active=active_models(journal),
                            models=reported_models(journal), update=in_flight(journal), trust=trust(journal),
                            features=FEATURES)


def trust(journal: Journal) -> dict | None:
    """presence.trust (agent.trust): only a device that pins a root key journals `trust`."""
    held = journal.data.get("trust")
    if not held:
        return None
    return {"keyring_version": int(held.get("keyring_version") or 0),
            "timestamp": held.get("timestamp"), "error_code": held.get("error_code"), "refused": held.get("refused"),
            "keyring_expired": bool(held.get("keyring_expired"))}


def publish_presence(link: MqttLink | None, *, journal: Journal) -> None:
    if link and link.connected.is_set():
        link.publish("presence", presence(True, journal=journal), qos=1, retain=True, timeout=0)


def publish_event(link: MqttLink | None, payload: bytes) -> bool:
    """True once the broker acknowledged the event (PUBACK); False keeps it in the outbox."""
    return bool(link) and link.publish("events", payload, qos=1, timeout=10)


def telemetry_loop(link: MqttLink | None, *, cfg: Config, journal: Journal, stop: threading.Event,
                   metrics: MetricsBook | None = None) -> None:
    """Telemetry thread body: publish every interval while connected, until `stop` is set. The
    model metrics window is taken only when the report can go out: an offline spell makes one long
    window rather than lost ones."""
    from agent.telemetry import collect

    collect(device_id=cfg.device_id, state_dir=cfg.state_dir, active={}, health=None)  # primes cpu_percent
    while not stop.wait(cfg.telemetry.interval_seconds):
        if not (link and link.connected.is_set()):
            continue
        try:
            payload = collect(device_id=cfg.device_id, state_dir=cfg.state_dir,
                              active=active_models(journal), health=journal.data.get("last_health"),
                              model_metrics=metrics.take_window() if metrics else None)
            link.publish("telemetry", payload, qos=0)
        except Exception:  # telemetry must never take the agent down
            log.exception("telemetry failed")
