"""The ingest process's MQTT side: a paho subscriber on a shared subscription feeding batches to
ota.transport.ingest.Ingestor, acknowledging each message only after its batch committed."""

from __future__ import annotations

import logging
import queue
import threading
import time

from django.db import DatabaseError, close_old_connections, connections
from django.utils import timezone

from agent.protocol import Topics
from ota.transport.ingest import Ingestor, IngestStats, Message
from ota.transport.mqtt import BrokerSettings, new_client

logger = logging.getLogger(__name__)

INGEST_SHARE_GROUP = "modelfleet-ingest"


class IngestRunner:
    """The long-running loop: paho subscriber → queue → batched, acknowledged database writes."""

    def __init__(
        self,
        broker: BrokerSettings | None = None,
        *,
        share_group: str = INGEST_SHARE_GROUP,
        client_id: str | None = None,
        batch_size: int = 500,
        flush_interval: float = 0.2,
        idle_flush: float = 0.02,
        stats_interval: float = 30.0,
    ):
        self.broker = broker or BrokerSettings.from_settings()
        self.topics = Topics(self.broker.topic_root)
        self.share_group = share_group
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.idle_flush = idle_flush
        self.stats_interval = stats_interval
        self.ingestor = Ingestor(self.broker.topic_root)
        self.queue: queue.Queue[Message] = queue.Queue()
        self.subscribed = threading.Event()
        # A named client keeps a persistent session, so QoS 1 events queue at the broker
        # while this process restarts; an anonymous one must not leave sessions behind.
        self.client = new_client(
            self.broker, client_id=client_id, clean_session=client_id is None, manual_ack=True
        )
        self.client.max_inflight_messages_set(batch_size)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    @property
    def stats(self) -> IngestStats:
        return self.ingestor.stats

    def subscriptions(self) -> list[tuple[str, int]]:
        root = self.topics.root
        return [(f"$share/{self.share_group}/{root}/devices/+/{kind}", 1) for kind in ("events", "telemetry", "presence")]

    def _on_connect(self, client, _userdata, _flags, reason_code, _properties):
        if reason_code.is_failure:
            logger.error("ingest: broker refused the connection: %s", reason_code)
            return
        client.subscribe(self.subscriptions())

    def _on_subscribe(self, _client, _userdata, _mid, reason_codes, _properties):
        refused = [rc for rc in reason_codes if rc.is_failure]
        if refused:
            logger.error("ingest: broker refused the subscriptions: %s", refused)
        else:
            logger.info("ingest: subscribed to %s", ", ".join(t for t, _ in self.subscriptions()))
            self.subscribed.set()

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _properties):
        self.subscribed.clear()
        logger.warning("ingest: disconnected from the broker (%s); paho reconnects", reason_code)

    def _on_message(self, _client, _userdata, message):
        self.queue.put(Message(message.topic, message.payload, timezone.now(), message.mid, message.qos))

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
        while True:
            close_old_connections()
            try:
                self.ingestor.process(batch)
                return
            except DatabaseError as exc:
                if stop.is_set():
                    logger.error("ingest: database error while stopping; %d messages left unacknowledged", len(batch))
                    raise
                logger.error("ingest: database error, retrying the batch of %d in 1s: %s", len(batch), exc)
                close_old_connections()
                time.sleep(1)
            except Exception:
                logger.exception("ingest: batch of %d failed; retrying message by message", len(batch))
                break
        for message in batch:
            try:
                self.ingestor.process([message])
            except Exception:
                self.stats.failed += 1
                logger.exception("ingest: dropped a message on %s that could not be stored", message.topic)

    def _ack(self, batch: list[Message]) -> None:
        for message in batch:
            if message.qos > 0:
                self.client.ack(message.mid, message.qos)

    def run(self, stop: threading.Event) -> IngestStats:
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        last_stats = time.monotonic()
        try:
            while not stop.is_set():
                batch = self._next_batch(stop)
                if batch:
                    self._process(batch, stop)
                    self._ack(batch)
                if time.monotonic() - last_stats >= self.stats_interval:
                    logger.info("ingest: %s", self.stats.as_dict())
                    last_stats = time.monotonic()
            # Drain what already arrived so a clean stop loses nothing it could have stored.
            while not self.queue.empty():
                batch = self._next_batch(stop)
                if batch:
                    self._process(batch, stop)
                    self._ack(batch)
        finally:
            self.client.disconnect()
            self.client.loop_stop()
            connections.close_all()  # this thread's connections only (they are thread-local)
            logger.info("ingest: stopped: %s", self.stats.as_dict())
        return self.stats
