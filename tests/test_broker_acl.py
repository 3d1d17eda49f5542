"""Broker auth and ACL with the deploy/ config: real Mosquitto, real paho clients, real credentials
created by enrollment. With MQTT 3.1.1 Mosquitto may still grant a refused subscription's QoS
in some setups, so every denial is proven by what never arrives, next to a positive control."""

from __future__ import annotations

import pytest

from agent.protocol import Topics, client_id
from tests.support.broker_auth import MqttProbe
from tests.support.fleet import enroll_device

pytestmark = pytest.mark.django_db(transaction=True)
T = Topics("fleet")


@pytest.fixture
def probes():
    made = []

    def make(port, username, password, **kw):
        probe = MqttProbe(port, username, password, **kw)
        made.append(probe)
        return probe

    yield make
    for probe in made:
        probe.close()


def test_it_refuses_anonymous_and_wrong_password_connects(secure_broker, probes):
    assert probes(secure_broker.port, None, None).connect() is False
    assert probes(secure_broker.port, secure_broker.username, "not-the-password").connect() is False
    assert probes(secure_broker.port, "dev-nobody", "whatever").connect() is False
    assert probes(secure_broker.port, secure_broker.username, secure_broker.password).connect() is True


def device_probe(probes, port, enrolled):
    """A device's connection as the agent makes it: its credentials and its pinned client id."""
    return probes(port, enrolled.device.id, enrolled.mqtt_password, client_id=client_id(enrolled.device.id))


def test_it_keeps_device_a_out_of_device_b_directive(secure_broker, probes):
    a, b = enroll_device(), enroll_device()
    service = probes(secure_broker.port, secure_broker.username, secure_broker.password)
    assert service.connect()
    for model in ("detector", "classifier"):  # one retained directive per model
        service.publish(T.directive(a.device.id, model), f"{model}-for-a".encode(), retain=True)
    service.publish(T.directive(b.device.id, "detector"), b"directive-for-b", retain=True)

    device_a = device_probe(probes, secure_broker.port, a)
    assert device_a.connect()
    device_a.subscribe(T.directives(a.device.id))
    device_a.subscribe(T.directives(b.device.id))
    device_a.subscribe(T.directive(b.device.id, "detector"))
    device_a.subscribe("fleet/#")
    device_a.subscribe("#")
    got = device_a.received(wait=1.5)
    mine = {(T.directive(a.device.id, m), f"{m}-for-a".encode(), True) for m in ("detector", "classifier")}
    assert mine <= set(got)  # positive control: both models' directives
    assert all(topic.startswith(f"fleet/devices/{a.device.id}/models/") for topic, _, _ in got), got

    service.publish(T.directive(b.device.id, "detector"), b"live-directive-for-b", retain=True)
    assert device_a.received(wait=1.0) == []

    device_b = device_probe(probes, secure_broker.port, b)
    assert device_b.connect()
    device_b.subscribe(T.directives(b.device.id))
    assert [p for _, p, _ in device_b.received(wait=1.0)] == [b"live-directive-for-b"]


def test_it_refuses_a_device_connecting_with_another_client_id(secure_broker, probes):
    a, b = enroll_device(), enroll_device()
    assert probes(secure_broker.port, a.device.id, a.mqtt_password, client_id="anything-else").connect() is False
    # b's own id with a's credentials: no client can knock b off the broker.
    assert probes(secure_broker.port, a.device.id, a.mqtt_password, client_id=client_id(b.device.id)).connect() is False
    holder = device_probe(probes, secure_broker.port, b)
    assert holder.connect()
    assert not holder.disconnected.wait(1.0)


def test_it_drops_device_a_publishing_on_device_b_topics(secure_broker, probes):
    a, b = enroll_device(), enroll_device()
    service = probes(secure_broker.port, secure_broker.username, secure_broker.password)
    assert service.connect()
    service.subscribe("fleet/devices/+/+")
    service.subscribe("fleet/devices/+/models/+/directive")

    device_a = device_probe(probes, secure_broker.port, a)
    assert device_a.connect()
    device_a.publish(T.events(b.device.id), b"forged-event")
    device_a.publish(T.telemetry(b.device.id), b"forged-telemetry")
    device_a.publish(T.presence(b.device.id), b"forged-presence")
    device_a.publish(T.directive(b.device.id, "detector"), b"forged-directive", retain=True)
    device_a.publish(T.directive(a.device.id, "detector"), b"self-directive", retain=True)
    device_a.publish(T.events(a.device.id), b"own-event")

    got = service.received(wait=1.5)
    assert [(t, p) for t, p, _ in got] == [(T.events(a.device.id), b"own-event")]


def test_it_disconnects_a_revoked_device_and_refuses_it_afterwards(secure_broker, probes):
    from ota.fleet.revocation import device_revoke

    a = enroll_device()
    service = probes(secure_broker.port, secure_broker.username, secure_broker.password)
    assert service.connect()
    for model in ("detector", "classifier"):
        service.publish(T.directive(a.device.id, model), f"{model}-for-a".encode(), retain=True)

    device_a = device_probe(probes, secure_broker.port, a)
    assert device_a.connect()
    device_a.subscribe(T.directives(a.device.id))
    assert sorted(p for _, p, _ in device_a.received(wait=1.0)) == [b"classifier-for-a", b"detector-for-a"]

    device_revoke(device_id=a.device.id, actor="test")

    assert device_a.disconnected.wait(5), "revocation must drop the live session at once"
    assert device_probe(probes, secure_broker.port, a).connect() is False
    watcher = probes(secure_broker.port, secure_broker.username, secure_broker.password)
    assert watcher.connect()
    watcher.subscribe(T.directives(a.device.id))
    assert watcher.received(wait=1.0) == [], "every model's retained directive must be cleared"


def test_it_lets_devices_read_but_never_write_the_ingest_status(secure_broker, probes):
    device = enroll_device()
    service = probes(secure_broker.port, secure_broker.username, secure_broker.password)
    assert service.connect()
    probe = device_probe(probes, secure_broker.port, device)
    assert probe.connect()
    probe.subscribe(T.ingest_status())
    probe.publish(T.ingest_status(), b"forged-epoch", retain=True)  # would have every box resend
    service.publish(T.ingest_status(), b"server-epoch", retain=True)
    got = probe.received(wait=1.5)
    assert [(t, p) for t, p, _ in got] == [(T.ingest_status(), b"server-epoch")]
