"""Server-side MQTT: one paho connection per process for publishing, used by web and Celery.

Why a wrapper: directives go out retained with QoS 1, thousands at a time, and the caller must
know they reached the broker before it records them as sent. `publish_many` pushes every
message into paho's window at once and then waits for all PUBACKs, so a wave costs one round
trip of latency instead of one per device.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from django.conf import settings

logger = logging.getLogger(__name__)


class MqttError(Exception):
    pass


@dataclass(frozen=True)
class BrokerSettings:
    host: str
    port: int
    username: str
    password: str
    tls: bool = False
    topic_root: str = "fleet"

    @classmethod
    def from_settings(cls) -> BrokerSettings:
        return cls(
            host=settings.MQTT_HOST,
            port=settings.MQTT_PORT,
            username=settings.MQTT_USERNAME,
            password=settings.MQTT_PASSWORD,
            tls=settings.MQTT_TLS,
            topic_root=settings.MQTT_TOPIC_ROOT,
        )


def new_client(
    broker: BrokerSettings,
    *,
    client_id: str | None = None,
    clean_session: bool = True,
    protocol: int = mqtt.MQTTv311,
    **kwargs,
) -> mqtt.Client:
    """A paho client (callback API v2; MQTT 3.1.1 unless `protocol` says otherwise) configured from
    broker settings, not yet connected. MQTT 5 has no clean-session flag: clean start and the
    session expiry interval go to connect() (see ota.transport.subscriber)."""
    session = {} if protocol == mqtt.MQTTv5 else {"clean_session": clean_session}
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id or f"modelfleet-{uuid.uuid4().hex[:12]}",
        protocol=protocol,
        **session,
        **kwargs,
    )
    if broker.username:
        client.username_pw_set(broker.username, broker.password or None)
    if broker.tls:
        client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
    return client


def connect_blocking(client: mqtt.Client, broker: BrokerSettings, *, timeout: float = 10.0, keepalive: int = 30):
    """Connect and start paho's network thread; raise MqttError with the broker's reason on refusal."""
    done = threading.Event()
    outcome: dict = {}

    def on_connect(_client, _userdata, _flags, reason_code, _properties):
        outcome["rc"] = reason_code
        done.set()

    previous = client.on_connect
    client.on_connect = on_connect
    try:
        client.connect(broker.host, broker.port, keepalive=keepalive)
    except OSError as exc:
        raise MqttError(f"cannot reach the MQTT broker at {broker.host}:{broker.port}: {exc}") from None
    client.loop_start()
    if not done.wait(timeout):
        client.loop_stop()
        raise MqttError(f"no CONNACK from the MQTT broker at {broker.host}:{broker.port} within {timeout:.0f}s")
    client.on_connect = previous
    rc = outcome["rc"]
    if rc.is_failure:
        client.loop_stop()
        client.disconnect()
        raise MqttError(
            f"the MQTT broker at {broker.host}:{broker.port} refused user {broker.username or '(anonymous)'!r}: {rc}"
        )
    return client


class Publisher:
    """A connected publisher. Thread-safe: paho serialises publish calls internally."""

    def __init__(self, broker: BrokerSettings | None = None, *, max_inflight: int = 1000, client_id: str | None = None):
        self.broker = broker or BrokerSettings.from_settings()
        self.client = new_client(self.broker, client_id=client_id)
        # paho's default window of 20 unacknowledged messages would make a wave of thousands
        # wait for round trip after round trip.
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._connected = False

    def connect(self, timeout: float = 10.0) -> Publisher:
        connect_blocking(self.client, self.broker, timeout=timeout)
        self._connected = True
        return self

    def publish_many(
        self, messages: Iterable[tuple[str, bytes]], *, qos: int = 1, retain: bool = True, timeout: float = 60.0
    ) -> int:
        """Publish (topic, payload) pairs and wait until the broker has acknowledged each.

        Returns how many were published. Raises MqttError naming the topics left unacknowledged
        when `timeout` passes; the caller may safely publish them again (directives carry a seq,
        retained messages replace each other).
        """
        infos = []
        for topic, payload in messages:
            info = self.client.publish(topic, payload, qos=qos, retain=retain)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                raise MqttError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
            infos.append((topic, info))
        deadline = time.monotonic() + timeout
        for topic, info in infos:
            remaining = deadline - time.monotonic()
            if qos == 0:
                break
            try:
                info.wait_for_publish(max(remaining, 0.001))
            except (RuntimeError, ValueError) as exc:
                raise MqttError(f"publish to {topic} failed: {exc}") from None
            if not info.is_published():
                pending = [t for t, i in infos if not i.is_published()]
                raise MqttError(
                    f"{len(pending)} of {len(infos)} messages not acknowledged by the broker within "
                    f"{timeout:.0f}s (first: {pending[0]})"
                )
        return len(infos)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = True, timeout: float = 10.0) -> None:
        self.publish_many([(topic, payload)], qos=qos, retain=retain, timeout=timeout)

    def clear_retained(self, topic: str, *, timeout: float = 10.0) -> None:
        """An empty retained message deletes the broker's retained copy (MQTT 3.1.1 §3.3.1.3)."""
        self.publish(topic, b"", qos=1, retain=True, timeout=timeout)

    def close(self) -> None:
        if self._connected:
            self.client.disconnect()
            self.client.loop_stop()
            self._connected = False

    def __enter__(self) -> Publisher:
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()


_lock = threading.Lock()
_shared: tuple[int, BrokerSettings, Publisher] | None = None


def get_publisher() -> Publisher:
    """The process's shared publisher, connected on first use.

    Keyed by pid (a Celery prefork child must never reuse its parent's socket) and by broker
    settings (tests point settings at a private broker).
    """
    global _shared
    broker = BrokerSettings.from_settings()
    with _lock:
        if _shared is not None:
            pid, shared_broker, publisher = _shared
            if pid == os.getpid() and shared_broker == broker and publisher.client.is_connected():
                return publisher
            if pid == os.getpid():
                try:
                    publisher.close()
                except Exception:  # a dead connection has nothing left to close
                    pass
            _shared = None
        publisher = Publisher(broker).connect()
        _shared = (os.getpid(), broker, publisher)
        return publisher


def reset_publisher() -> None:
    global _shared
    with _lock:
        if _shared is not None and _shared[0] == os.getpid():
            _shared[2].close()
        _shared = None


def publish_many(messages: Iterable[tuple[str, bytes]], *, qos: int = 1, retain: bool = True, timeout: float = 60.0) -> int:
    return get_publisher().publish_many(messages, qos=qos, retain=retain, timeout=timeout)


def clear_retained(topic: str, *, timeout: float = 10.0) -> None:
    get_publisher().clear_retained(topic, timeout=timeout)


def retained_topics(topic_filter: str, *, settle: float = 0.5, timeout: float = 10.0) -> list[str]:
    """The topics under `topic_filter` that hold a retained message now. A broker sends every
    matching retained message right after the SUBACK; a short quiet `settle` after the last one
    ends the listening."""
    broker = BrokerSettings.from_settings()
    client = new_client(broker)
    found: list[str] = []
    subscribed = threading.Event()
    last = [time.monotonic()]

    def on_message(_client, _userdata, message):
        if message.retain and message.payload:
            found.append(message.topic)
        last[0] = time.monotonic()

    client.on_message = on_message
    client.on_subscribe = lambda *args: subscribed.set()
    connect_blocking(client, broker, timeout=timeout)
    try:
        client.subscribe(topic_filter, qos=1)
        if not subscribed.wait(timeout):
            raise MqttError(f"no SUBACK for {topic_filter} within {timeout:.0f}s")
        last[0] = time.monotonic()
        while time.monotonic() - last[0] < settle:
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
    return sorted(set(found))
