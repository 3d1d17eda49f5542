"""Thin interface over paho-mqtt: one connection, the retained directive in, events out.

paho runs its own network thread (loop_start) and reconnects with its own backoff
(reconnect_delay_set); we subscribe in on_connect so a reconnect always re-receives the
retained directive. The presence topic carries a retained last will (online=false).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import paho.mqtt.client as paho

from agent.config import MqttConfig
from agent.protocol import Topics

log = logging.getLogger("fleet_agent.mqtt")


class MqttLink:
    def __init__(
        self,
        cfg: MqttConfig,
        *,
        device_id: str,
        on_directive: Callable[[bytes], None],
        presence: Callable[[bool], bytes],
    ):
        self.cfg = cfg
        self.device_id = device_id
        self.topics = Topics(cfg.topic_root)
        self.on_directive = on_directive
        self.presence = presence
        self.connected = threading.Event()
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=f"fleet-agent-{device_id}", clean_session=True
        )
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            client.tls_set(ca_certs=cfg.ca_file)
        client.will_set(self.topics.presence(device_id), presence(False), qos=1, retain=True)
        client.reconnect_delay_set(min_delay=max(1, int(cfg.reconnect_min_seconds)), max_delay=max(1, int(cfg.reconnect_max_seconds)))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self.client = client

    def start(self) -> None:
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self.client.loop_start()

    def stop(self) -> None:
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

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the connection: %s", reason_code)
            return
        log.info("connected to %s:%s", self.cfg.host, self.cfg.port)
        client.subscribe(self.topics.directive(self.device_id), qos=1)
        client.publish(self.topics.presence(self.device_id), self.presence(True), qos=1, retain=True)
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        log.warning("disconnected from broker (%s); paho reconnects with backoff", reason_code)

    def _on_message(self, client, userdata, message) -> None:
        if message.topic != self.topics.directive(self.device_id) or not message.payload:
            return  # an empty retained payload only clears the topic
        self.on_directive(bytes(message.payload))

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
