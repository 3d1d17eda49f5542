"""Thin interface over paho-mqtt: one connection, the retained directive in, events out.

paho runs its own network thread (loop_start) and reconnects with its own backoff
(reconnect_delay_set); we subscribe in on_connect so a reconnect always re-receives the
retained directive. The presence topic carries a retained last will (online=false). It also
subscribes to the server's retained ingest status: a new ingest session means the broker may
have lost events it acknowledged, and `on_ingest_reset` has the outbox send its recent ones again.

Every failed connection attempt (refused, DNS, TLS, a CONNACK refusal, the broker hanging up
before its CONNACK) goes to `ConnectLog`, which logs the first one of an outage at once and then
at most one line per `mqtt.failure_log_interval_seconds`, with the broker address, the reason
and the number of attempts since its last line; each attempt is logged at DEBUG. The recovery
is logged with the count and the length of the outage.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as paho

from agent.config import MqttConfig
from agent.protocol import ProtocolError, Topics, client_id, parse_ingest_status

log = logging.getLogger("fleet_agent.mqtt")

# CONNACK refusals (paho hands MQTT 3.1.1 return codes 1-5 over as these MQTT 5 reason codes).
_CONNACK_REASONS = {
    132: "unsupported protocol version",
    133: "client identifier rejected",
    134: "bad username or password",
    135: "not authorised",
    136: "server unavailable",
    138: "client banned",
}
_LOGIN_CODES = (134, 135)


def broker_address(cfg: MqttConfig) -> str:
    """host:port (TLS on|off), as every connection log line names the broker."""
    return f"{cfg.host}:{cfg.port} (TLS {'on' if cfg.tls else 'off'})"


def describe_connect_error(exc: BaseException | None, cfg: MqttConfig) -> str:
    """Why a connection attempt failed before any MQTT was spoken (paho raised `exc`)."""
    if exc is None:
        return "connection failed (no detail from paho)"
    if isinstance(exc, socket.gaierror):
        return f"DNS lookup of {cfg.host!r} failed: {exc.strerror or exc}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = f"certificate verify failed: {exc.verify_message}" if exc.verify_message else str(exc)
        return f"TLS handshake failed: {why} (mqtt.ca_file: {cfg.ca_file or 'system CAs'})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.strerror or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listening on that port?)"
    if isinstance(exc, ConnectionResetError):
        hint = " during the TLS handshake (is that port a TLS listener?)" if cfg.tls else ""
        return f"connection reset by the broker{hint}"
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError
        return "connection timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def describe_connack(reason_code) -> str:
    """Why the broker refused our CONNECT (its CONNACK reason code)."""
    value = getattr(reason_code, "value", None)
    name = reason_code.getName() if hasattr(reason_code, "getName") else str(reason_code)
    text = _CONNACK_REASONS.get(value, name)
    detail = f"the broker refused the connection: {text} (CONNACK {name!r})"
    if value in _LOGIN_CODES:
        detail += "; check mqtt.username and mqtt.password"
    return detail


class ConnectLog:
    """The connection log, rate-limited: the first failed attempt of an outage at once, then at
    most one line per `interval` seconds counting the attempts since the previous line; every
    attempt at DEBUG; the recovery with the number of failed attempts and the outage's length."""

    def __init__(self, address: str, interval: float, *, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log):
        self.address = address
        self.interval = interval
        self.clock = clock
        self.log = logger
        self.attempts = 0  # failed attempts in this outage
        self.first_failure: float | None = None
        self.last_line: float | None = None
        self.since_line = 0  # failed attempts not yet counted in a line

    def failed(self, reason: str) -> None:
        now = self.clock()
        self.attempts += 1
        self.since_line += 1
        self.log.debug("connection attempt %d to MQTT broker %s failed: %s", self.attempts, self.address, reason)
        if self.first_failure is None:
            self.first_failure = now
        if self.last_line is None:
            self.log.warning("cannot connect to MQTT broker %s: %s; retrying with backoff", self.address, reason)
        elif now - self.last_line >= self.interval:
            self.log.warning(
                "still cannot connect to MQTT broker %s: %s; %d failed attempts in the last %.0f s "
                "(%d since the first, %.0f s ago)",
                self.address, reason, self.since_line, now - self.last_line, self.attempts, now - self.first_failure,
            )
        else:
            return
        self.last_line = now
        self.since_line = 0

    def connected(self) -> None:
        if self.attempts:
            self.log.info("connected to MQTT broker %s after %d failed attempts over %.0f s", self.address,
                          self.attempts, self.clock() - self.first_failure)
        else:
            self.log.info("connected to MQTT broker %s", self.address)
        self.attempts, self.since_line = 0, 0
        self.first_failure = self.last_line = None


class _Client(paho.Client):
    """paho's client, keeping the exception of the last failed connection attempt: paho calls
    on_connect_fail without saying why (the reason is what an operator needs)."""

    last_connect_error: OSError | None = None

    def reconnect(self):
        self.last_connect_error = None
        try:
            return super().reconnect()
        except OSError as exc:
            self.last_connect_error = exc
            raise


class MqttLink:
    def __init__(
        self,
        cfg: MqttConfig,
        *,
        device_id: str,
        on_directive: Callable[[bytes], None],
        presence: Callable[[bool], bytes],
        on_ingest_reset: Callable[[], None] | None = None,
        on_trust: Callable[[str, bytes], None] | None = None,
    ):
        self.cfg = cfg
        self.device_id = device_id
        self.topics = Topics(cfg.topic_root)
        self.on_directive = on_directive
        self.presence = presence
        self.on_ingest_reset = on_ingest_reset
        self.on_trust = on_trust  # ("keyring" | "timestamp", payload), agent.trust; None: not subscribed
        self.ingest_epoch: str | None = None  # the server's ingest session last seen (Topics.ingest_status)
        self.connected = threading.Event()
        self.connect_log = ConnectLog(broker_address(cfg), cfg.failure_log_interval_seconds)
        self._attempting = False  # a connection attempt is under way (no outcome yet)
        self._stopping = False
        client = _Client(
            paho.CallbackAPIVersion.VERSION2, client_id=client_id(device_id), clean_session=True
        )
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            client.tls_set(ca_certs=cfg.ca_file)
        client.will_set(self.topics.presence(device_id), presence(False), qos=1, retain=True)
        client.reconnect_delay_set(min_delay=max(1, int(cfg.reconnect_min_seconds)), max_delay=max(1, int(cfg.reconnect_max_seconds)))
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self.client = client

    def start(self) -> None:
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self.client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        if self.connected.is_set():
            info = self.client.publish(
                self.topics.presence(self.device_id), self.presence(False), qos=1, retain=True
            )
            try:
                info.wait_for_publish(2)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()

    def _failed(self, reason: str) -> None:
        self._attempting = False
        self.connect_log.failed(reason)

    def _on_pre_connect(self, client, userdata) -> None:
        self._attempting = True

    def _on_connect_fail(self, client, userdata) -> None:
        self._failed(describe_connect_error(client.last_connect_error, self.cfg))

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._failed(describe_connack(reason_code))
            return
        self._attempting = False
        self.connect_log.connected()
        # The keyring first: the broker sends retained messages in subscription order, so a
        # directive signed by a rotated-in rollout key meets the keyring that lists it.
        trust = [(self.topics.keyring(), 1), (self.topics.timestamp(self.device_id), 1)] if self.on_trust else []
        client.subscribe([*trust, (self.topics.directives(self.device_id), 1), (self.topics.ingest_status(), 1)])
        client.publish(self.topics.presence(self.device_id), self.presence(True), qos=1, retain=True)
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._stopping:
            self.connected.clear()
            log.info("disconnected from MQTT broker %s", broker_address(self.cfg))
        elif self.connected.is_set():
            self.connected.clear()
            log.warning("disconnected from MQTT broker %s (%s); reconnecting with backoff",
                        broker_address(self.cfg), reason_code)
        elif self._attempting:  # the broker hung up before its CONNACK
            hint = "" if self.cfg.tls else " (a TLS listener, while mqtt.tls is off?)"
            self._failed(f"the broker closed the connection before answering CONNECT{hint}")

    def _on_message(self, client, userdata, message) -> None:
        if message.topic == self.topics.ingest_status():
            self._ingest_status(bytes(message.payload))
            return
        if self.on_trust is not None and message.topic in (self.topics.keyring(), self.topics.timestamp(self.device_id)):
            if message.payload:
                self.on_trust("keyring" if message.topic == self.topics.keyring() else "timestamp",
                              bytes(message.payload))
            return
        if not paho.topic_matches_sub(self.topics.directives(self.device_id), message.topic) or not message.payload:
            return  # an empty retained payload only clears the topic
        self.on_directive(bytes(message.payload))

    def _ingest_status(self, payload: bytes) -> None:
        """A new ingest session (the first seen since this agent started, too): the broker may have
        lost events it acknowledged, so the outbox sends its recent ones again (agent.outbox)."""
        try:
            epoch = parse_ingest_status(payload)
        except ProtocolError as exc:
            log.debug("ignoring an ingest status message: %s", exc)
            return
        if epoch == self.ingest_epoch:
            return
        self.ingest_epoch = epoch
        if self.on_ingest_reset is not None:
            self.on_ingest_reset()

    def resubscribe_directives(self) -> None:
        """Subscribe to this device's directives again: the broker re-sends the retained ones (after
        a new keyring, those refused under the old keys are judged again)."""
        if self.connected.is_set():
            self.client.subscribe(self.topics.directives(self.device_id), 1)

    def publish(self, kind: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout: float = 10) -> bool:
        """Publish on this device's `kind` topic; with qos 1 wait for the PUBACK. False if offline."""
        if not self.connected.is_set():
            return False
        info = self.client.publish(self.topics.device(self.device_id, kind), payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            return False
        if qos == 0:
            return True
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):
            return False
        return info.is_published()
