"""The ingest process's MQTT side: a paho subscriber on a shared subscription feeding batches to
ota.transport.ingest.Ingestor, acknowledging each message only after its batch committed.

Durable by default. Each ingest process connects with MQTT 5, a fixed client id
(`ingest_client_id`: MQTT_INGEST_CLIENT_ID, else `modelfleet-ingest-<hostname>`, plus `-N` for the
N-th process side by side) and a session the broker keeps for MQTT_INGEST_SESSION_EXPIRY seconds
(a day) after it disconnects, however it went (SIGKILL included). Mosquitto 2.0 hands each
message of a shared subscription to the next member of the group in turn, whether that member
is connected or not: while a process is down, its turn's QoS 1 messages queue in its session
(with the ones it had received but not acknowledged) and arrive when it connects again under the
same id, and a clean session would have discarded both. So the id must stay the same across
restarts, differ between processes, and a process that leaves for good must end its session
(`mqtt_ingest --retire`), or its turn's messages queue for it until the session expires.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import queue
import re
import socket
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from django.conf import settings
from django.db import close_old_connections, connections
from django.utils import timezone
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.protocol import Topics, ingest_status_payload
from ota.transport.ingest import Ingestor, IngestStats, Message
from ota.transport.mqtt import BrokerSettings, new_client

logger = logging.getLogger(__name__)

INGEST_SHARE_GROUP = "modelfleet-ingest"
SESSION_TAKEN_OVER = 142  # MQTT 5 DISCONNECT reason code (Mosquitto sends it from 2.0.15 on)


class ClientIdInUse(Exception):
    """Another ingest process on this host is connected to the same broker with the same client id."""


def ingest_client_id(instance: int = 1) -> str:
    """The MQTT client id of the `instance`-th ingest process on this host: stable across restarts
    (the broker keeps its session under it) and distinct for processes side by side."""
    if instance < 1:
        raise ValueError("the ingest instance number starts at 1")
    base = settings.MQTT_INGEST_CLIENT_ID or "modelfleet-ingest-" + re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())
    return base if instance == 1 else f"{base}-{instance}"


class _HostGuard:
    """One process per (broker, client id) on this host. Two clients with one id take the session
    from each other in turn (each connect closes the other's connection), halving throughput
    and redelivering in-flight messages, with nothing but a line in the broker's log to show for it.
    An abstract Unix socket named after the pair is held while the process runs: the kernel frees
    it when the process dies, however it dies, and it needs no file (systemd's PrivateTmp and a
    read-only file system do not matter). Linux only; elsewhere nothing is checked here."""

    def __init__(self, broker: BrokerSettings, client_id: str):
        digest = hashlib.sha256(f"{broker.host}:{broker.port}/{client_id}".encode()).hexdigest()[:32]
        self.address = f"\0modelfleet-ingest-{digest}"
        self.client_id = client_id
        self.broker = broker
        self.sock: socket.socket | None = None

    def acquire(self) -> None:
        if not sys.platform.startswith("linux"):
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.address)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise ClientIdInUse(
                    f"another ingest process on this host is connected to {self.broker.host}:{self.broker.port} as "
                    f"MQTT client {self.client_id!r}; give each process its own id (mqtt_ingest --instance N, "
                    f"or --client-id)"
                ) from None
            logger.debug("ingest: cannot hold the per-host client id guard: %s", exc)
            return
        self.sock = sock

    def release(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class IngestRunner:
    """The long-running loop: paho subscriber → queue → batched, acknowledged database writes."""

    def __init__(
        self,
        broker: BrokerSettings | None = None,
        *,
        share_group: str = INGEST_SHARE_GROUP,
        client_id: str | None = None,
        session_expiry: int | None = None,
        batch_size: int = 500,
        flush_interval: float = 0.2,
        idle_flush: float = 0.02,
        stats_interval: float = 30.0,
    ):
        self.broker = broker or BrokerSettings.from_settings()
        self.topics = Topics(self.broker.topic_root)
        self.share_group = share_group
        self.client_id = client_id or ingest_client_id()
        self.session_expiry = settings.MQTT_INGEST_SESSION_EXPIRY if session_expiry is None else session_expiry
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.idle_flush = idle_flush
        self.stats_interval = stats_interval
        self.ingestor = Ingestor(self.broker.topic_root)
        self.queue: queue.Queue[Message] = queue.Queue()
        self.subscribed = threading.Event()
        self._new_session = False
        self.unsubscribed = threading.Event()
        self.retiring = False
        self.fatal: str | None = None  # set when this process must stop (its session was taken over)
        self._guard = _HostGuard(self.broker, self.client_id)
        self._connected_at = 0.0
        self._short_connections: list[float] = []
        self.client = new_client(self.broker, client_id=self.client_id, protocol=mqtt.MQTTv5, manual_ack=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_unsubscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    @property
    def stats(self) -> IngestStats:
        return self.ingestor.stats

    def subscriptions(self) -> list[str]:
        root = self.topics.root
        return [f"$share/{self.share_group}/{root}/devices/+/{kind}" for kind in ("events", "telemetry", "presence")]

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry
        # How many unacknowledged messages the broker may send us at once (MQTT 5 Receive
        # Maximum; Mosquitto's own max_inflight_messages applies to MQTT 3.1.1 clients only):
        # one batch's worth, acknowledged when the batch commits.
        props.ReceiveMaximum = max(1, min(self.batch_size, 65535))
        return props

    # --- paho callbacks (network thread) --------------------------------------------------------

    def _on_connect(self, client, _userdata, flags, reason_code, _properties):
        if reason_code.is_failure:
            logger.error("ingest: broker refused the connection as %s: %s", self.client_id, reason_code)
            return
        self._connected_at = time.monotonic()
        self._new_session = not flags.session_present
        logger.info(
            "ingest: connected as %s (%s; the broker keeps it %ss after a disconnect)",
            self.client_id,
            "session resumed: what queued meanwhile follows" if flags.session_present else "new session",
            self.session_expiry,
        )
        if self.retiring:
            # No new messages for this session; what already queued in it still arrives.
            client.unsubscribe(self.subscriptions())
            return
        # Retained presence is sent only when the subscription is new: a resumed session got every
        # live message meanwhile, and replaying a whole fleet's presence on each reconnect would
        # only mark every device as seen now.
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        client.subscribe([(topic, options) for topic in self.subscriptions()])

    def _on_subscribe(self, _client, _userdata, _mid, reason_codes, _properties):
        refused = [rc for rc in reason_codes if rc.is_failure]
        if refused:
            logger.error("ingest: broker refused the subscriptions: %s", refused)
        else:
            logger.info("ingest: subscribed to %s", ", ".join(self.subscriptions()))
            if self._new_session:
                self._announce_session()
            self.subscribed.set()

    def _announce_session(self) -> None:
        """A new session: whatever the broker queued for an earlier one (and events devices sent
        while nothing was subscribed) may be gone. Devices that see this new epoch on the
        retained ingest status send their recently acknowledged events again; duplicates are
        dropped on (device, seq, event_no). Published only now that the subscription exists."""
        epoch = f"{self.client_id}:{uuid.uuid4().hex}"
        self.client.publish(self.topics.ingest_status(), ingest_status_payload(epoch=epoch), qos=1, retain=True)
        logger.info("ingest: new broker session; asked devices to send recent events again (epoch %s)", epoch)

    def _on_unsubscribe(self, _client, _userdata, _mid, _reason_codes, _properties):
        logger.info("ingest: unsubscribed; taking what is left in session %s", self.client_id)
        self.unsubscribed.set()

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _properties):
        self.subscribed.clear()
        if reason_code == SESSION_TAKEN_OVER:
            self.fatal = (
                f"another client connected to the broker as {self.client_id!r} and took this process's session; "
                f"two ingest processes must never share a client id (mqtt_ingest --instance N, or --client-id)"
            )
            logger.error("ingest: %s", self.fatal)
            return
        now = time.monotonic()
        if self._connected_at and now - self._connected_at < 5:
            self._short_connections = [t for t in self._short_connections if now - t < 60] + [now]
            if len(self._short_connections) == 5:
                logger.error(
                    "ingest: the broker closed 5 connections within a minute, each within 5 s: is another "
                    "process connected as %s? (Mosquitto logs 'Client %s already connected, closing old connection')",
                    self.client_id, self.client_id,
                )
        logger.warning("ingest: disconnected from the broker (%s); paho reconnects", reason_code)

    def _on_message(self, _client, _userdata, message):
        self.queue.put(
            Message(message.topic, message.payload, timezone.now(), message.mid, message.qos, bool(message.retain))
        )

    # --- batches (main thread) ------------------------------------------------------------------

    def _next_batch(self, stop: threading.Event) -> list[Message]:
        try:
            first = self.queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.flush_interval
        while len(batch) < self.batch_size and not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(self.queue.get(timeout=min(self.idle_flush, remaining)))
            except queue.Empty:
                break
        return batch

    def _process(self, batch: list[Message], stop: threading.Event) -> None:
        """Store a batch, however long the database is away. `Ingestor.store` sets aside whatever
        fails on its own (the dead-letter table), so what is retried here is only the database
        being unavailable: the same batch again, unacknowledged, every second."""
        while True:
            close_old_connections()
            try:
                self.ingestor.store(batch)
                return
            except Exception as exc:
                if stop.is_set():
                    logger.error("ingest: database error while stopping; %d messages left unacknowledged "
                                 "(the broker redelivers them to this session)", len(batch))
                    raise
                logger.error("ingest: database unavailable, retrying the batch of %d in 1s: %s: %s",
                             len(batch), type(exc).__name__, exc)
                close_old_connections()
                time.sleep(1)

    def _ack(self, batch: list[Message]) -> None:
        for message in batch:
            if message.qos > 0:
                self.client.ack(message.mid, message.qos)

    def _drain(self, stop: threading.Event) -> None:
        while not self.queue.empty():
            batch = self._next_batch(stop)
            if batch:
                self._process(batch, stop)
                self._ack(batch)

    def run(self, stop: threading.Event, *, retire_idle: float | None = None) -> IngestStats:
        """Ingest until `stop` is set. With `retire_idle` (seconds), retire instead: take only what
        is queued in this process's session, stop once nothing came for that long, and end the
        session so the broker stops keeping messages for it."""
        self.retiring = retire_idle is not None
        self._guard.acquire()
        self.client.connect_async(
            self.broker.host, self.broker.port, keepalive=30, clean_start=False, properties=self._connect_properties()
        )
        self.client.loop_start()
        last_stats = last_message = time.monotonic()
        try:
            while not stop.is_set() and self.fatal is None:
                batch = self._next_batch(stop)
                if batch:
                    self._process(batch, stop)
                    self._ack(batch)
                    last_message = time.monotonic()
                elif self.retiring and self.unsubscribed.is_set() and time.monotonic() - last_message >= retire_idle:
                    break
                if self.retiring and not self.unsubscribed.is_set():
                    last_message = time.monotonic()
                if time.monotonic() - last_stats >= self.stats_interval:
                    logger.info("ingest: %s", self.stats.as_dict())
                    last_stats = time.monotonic()
            # Drain what already arrived so a clean stop loses nothing it could have stored.
            if self.fatal is None:
                self._drain(stop)
        finally:
            if self.retiring and self.fatal is None and self.client.is_connected():
                props = Properties(PacketTypes.DISCONNECT)
                props.SessionExpiryInterval = 0  # the broker discards the session now
                self.client.disconnect(properties=props)
                logger.info("ingest: retired: session %s ended", self.client_id)
            else:
                self.client.disconnect()  # the session stays for session_expiry seconds
            self.client.loop_stop()
            self._guard.release()
            connections.close_all()  # this thread's connections only (they are thread-local)
            logger.info("ingest: stopped: %s", self.stats.as_dict())
        return self.stats
