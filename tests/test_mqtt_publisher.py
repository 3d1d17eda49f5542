"""ota.transport.mqtt: the server's batched QoS 1 retained publisher, against the secure broker."""

from __future__ import annotations

import pytest

from agent.protocol import Topics
from ota.transport import mqtt as ota_mqtt
from ota.transport.mqtt import BrokerSettings, MqttError, Publisher
from tests.support.broker_auth import MqttProbe

T = Topics("fleet")


def test_it_publishes_many_retained_messages_and_clears_one(secure_broker):
    with Publisher() as publisher:
        sent = publisher.publish_many([(T.directive(f"dev-{i:04d}", "detector"), f"d{i}".encode()) for i in range(1500)])
        assert sent == 1500
        publisher.clear_retained(T.directive("dev-0007", "detector"))
    watcher = MqttProbe(secure_broker.port, secure_broker.username, secure_broker.password)
    try:
        assert watcher.connect()
        watcher.subscribe("fleet/devices/+/models/+/directive")
        got = {topic: payload for topic, payload, retained in watcher.received(wait=2.0) if retained}
    finally:
        watcher.close()
    assert len(got) == 1499
    assert got[T.directive("dev-1499", "detector")] == b"d1499" and T.directive("dev-0007", "detector") not in got


def test_it_says_why_the_broker_refused(secure_broker):
    bad = BrokerSettings(host="127.0.0.1", port=secure_broker.port, username=secure_broker.username, password="wrong")
    with pytest.raises(MqttError, match="refused user 'modelfleet-server'"):
        Publisher(bad).connect(timeout=5)
    secure_broker.stop()
    with pytest.raises(MqttError, match=f"cannot reach the MQTT broker at 127.0.0.1:{secure_broker.port}"):
        Publisher().connect(timeout=5)


def test_it_shares_one_connection_per_process_and_follows_settings(secure_broker, settings, tmp_path):
    from tests.support.broker_auth import start_secure_broker

    ota_mqtt.reset_publisher()
    first = ota_mqtt.get_publisher()
    assert ota_mqtt.get_publisher() is first
    other = start_secure_broker(tmp_path / "other")
    try:
        other.apply(settings)
        second = ota_mqtt.get_publisher()
        assert second is not first and second.broker.port == other.port
        ota_mqtt.publish_many([(T.directive("dev-x", "detector"), b"x")])
    finally:
        ota_mqtt.reset_publisher()
        other.stop()
