"""Ingest: the real `manage.py mqtt_ingest` process on the secure broker and PostgreSQL, fed by
real device clients; plus the batch logic (ordering, dedupe, garbage) on the real database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
from django.conf import settings as django_settings

from agent.protocol import Event, Topics, encode_json, format_time, presence_payload, utcnow
from ota.fleet.broker import BrokerAdmin
from ota.models import ActiveRelease, Device, DeviceEvent, DeviceModelState
from ota.transport import hooks
from ota.transport.ingest import Ingestor, Message
from ota.transport.mqtt import BrokerSettings
from tests.support.broker_auth import MqttProbe
from tests.support.fleet import enroll_device, release_rows
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]
T = Topics("fleet")
STEPS = ["received", "downloading", "verifying", "prechecking", "activating", "trial", "committed"]


def update_events(device_id: str, *, seq: int, first_no: int, old: str, new: str, rollout="r1") -> list[Event]:
    events = []
    for i, state in enumerate(STEPS):
        active = new if state in ("activating", "trial", "committed") else old
        events.append(Event(device_id=device_id, event_no=first_no + i, seq=seq, model="detector", state=state,
                            sha256=new, active_sha256=active, rollout_id=rollout, ts=format_time(utcnow())))
    return events


class IngestProcess:
    def __init__(self, broker, workdir: Path, *extra: str):
        db = django_settings.DATABASES["default"]
        env = {
            **os.environ,
            **broker.env,
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
            "SECRET_KEY": "test-only",
            "CELERY_BROKER_URL": os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/3"),
            "LOG_LEVEL": "INFO",
        }
        self.log = workdir / f"ingest-{time.monotonic_ns()}.log"
        self.out = workdir / f"ingest-{time.monotonic_ns()}.out"
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "mqtt_ingest", "--stats-interval", "3600", *extra],
            env=env, stdout=self.out.open("w"), stderr=self.log.open("w"), cwd=ROOT,
        )
        wait_for(lambda: "ingest: subscribed" in self.log.read_text() or self.process.poll() is not None,
                 timeout=20, what="ingest to subscribe")
        assert self.process.poll() is None, self.log.read_text()

    def stop(self) -> dict:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(20) == 0, self.log.read_text()
        return json.loads(self.out.read_text().strip().splitlines()[-1])["ingest_stats"]

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def ingest_processes(secure_broker, tmp_path):
    started = []

    def start(*extra):
        proc = IngestProcess(secure_broker, tmp_path, *extra)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


@pytest.mark.django_db(transaction=True)
def test_it_ingests_a_real_device_update_and_drops_repeats_and_forgeries(secure_broker, ingest_processes):
    v1, a1 = release_rows(version="1.0", counter=1)
    v2, a2 = release_rows(version="2.0", counter=2)
    enrolled = enroll_device()
    device_id = enrolled.device.id
    ingest = ingest_processes()
    device = MqttProbe(secure_broker.port, device_id, enrolled.mqtt_password)
    assert device.connect()
    try:
        device.publish(T.presence(device_id), presence_payload(online=True, agent_version="0.3.1",
                                                               active={"detector": a1.sha256}), retain=True)
        device.publish(T.telemetry(device_id), encode_json({"cpu_percent": 12.5, "temperature_c": 48}))
        events = update_events(device_id, seq=1, first_no=10, old=a1.sha256, new=a2.sha256)
        for event in events:
            device.publish(T.events(device_id), event.to_payload())

        wait_for(lambda: DeviceModelState.objects.filter(device_id=device_id, last_state="committed").exists(),
                 timeout=20, what="the committed state")
        state = DeviceModelState.objects.get(device_id=device_id)
        assert (state.active_version_id, state.active_sha256, state.last_seq, state.last_rollout_id) == (
            v2.pk, a2.sha256, 1, "r1")
        row = Device.objects.get(pk=device_id)
        assert row.online and row.agent_version == "0.3.1" and row.last_event_no == 16
        assert row.last_telemetry == {"cpu_percent": 12.5, "temperature_c": 48}
        history = list(ActiveRelease.objects.filter(device_id=device_id).order_by("from_time", "id"))
        assert [(h.version_id, h.to_time is None) for h in history] == [(v1.pk, False), (v2.pk, True)]
        assert [e.state for e in DeviceEvent.objects.filter(device_id=device_id).order_by("event_no")] == STEPS

        for event in events:  # an agent's outbox re-sending after a reconnect
            device.publish(T.events(device_id), event.to_payload())
        device.publish(T.events(device_id), b"{not json")
        forged = Event(device_id="dev-someone-else", event_no=99, seq=1, model="detector", state="committed")
        device.publish(T.events(device_id), forged.to_payload())
        device.publish(T.events(device_id), encode_json({"device_id": device_id, "state": "exploded"}))
        # LWT-style offline presence last
        device.publish(T.presence(device_id), presence_payload(online=False, agent_version="0.3.1"))
        wait_for(lambda: not Device.objects.get(pk=device_id).online, timeout=20, what="offline presence")
    finally:
        device.close()

    stats = ingest.stop()
    assert DeviceEvent.objects.filter(device_id=device_id).count() == len(STEPS)
    assert stats["events_stored"] == 7 and stats["duplicates"] == 7
    assert stats["malformed"] == 2 and stats["wrong_device"] == 1
    assert DeviceModelState.objects.get(device_id=device_id).last_state == "committed"


@pytest.mark.django_db(transaction=True)
def test_it_counts_unknown_devices_and_shares_the_load_between_two_processes(secure_broker, ingest_processes):
    release_rows(version="1.0", counter=1)
    first, second = ingest_processes(), ingest_processes()
    enrolled = [enroll_device() for _ in range(4)]
    # Broker credentials for a device the database has never heard of.
    with BrokerAdmin(BrokerSettings.from_settings()) as admin:
        admin.device_add(device_id="dev-ghost", password="ghost-pw", topic_root="fleet")
    clients = []
    try:
        for e in enrolled:
            probe = MqttProbe(secure_broker.port, e.device.id, e.mqtt_password)
            assert probe.connect()
            clients.append((e.device.id, probe))
        ghost = MqttProbe(secure_broker.port, "dev-ghost", "ghost-pw")
        assert ghost.connect()
        clients.append(("dev-ghost", ghost))
        for device_id, probe in clients:
            for n in range(50):
                event = Event(device_id=device_id, event_no=n, seq=1, model="detector", state="downloading")
                probe.publish(T.events(device_id), event.to_payload())
        wait_for(lambda: DeviceEvent.objects.count() == 200, timeout=20, what="200 stored events")
    finally:
        for _, probe in clients:
            probe.close()
    one, two = first.stop(), second.stop()
    assert DeviceEvent.objects.count() == 200
    logs = "\n".join(proc.log.read_text()[-3000:] for proc in (first, second))
    assert one["events_stored"] + two["events_stored"] == 200, (one, two, logs)
    assert one["events_stored"] > 0 and two["events_stored"] > 0, (one, two)
    assert one["unknown_device"] + two["unknown_device"] == 50


# --- batch logic on the real database (no broker needed) --------------------------------------


def _msg(device_id: str, kind: str, payload: bytes) -> Message:
    return Message(topic=T.device(device_id, kind), payload=payload, qos=1)


def test_it_never_moves_state_backwards_for_late_events(db, settings):
    settings.MQTT_BROKER_AUTH = "none"
    _v1, a1 = release_rows(version="1.0", counter=1)
    v2, a2 = release_rows(version="2.0", counter=2)
    device_id = enroll_device().device.id
    events = update_events(device_id, seq=4, first_no=0, old=a1.sha256, new=a2.sha256)
    ingestor = Ingestor()
    ingestor.process([_msg(device_id, "events", e.to_payload()) for e in events[3:]])
    ingestor.process([_msg(device_id, "events", e.to_payload()) for e in events[:3]])  # late arrivals
    state = DeviceModelState.objects.get(device_id=device_id)
    assert (state.last_state, state.active_version_id, state.last_event_no) == ("committed", v2.pk, 6)
    assert ActiveRelease.objects.filter(device_id=device_id, to_time__isnull=True).get().sha256 == a2.sha256
    assert DeviceEvent.objects.filter(device_id=device_id).count() == 7


def test_it_hands_only_new_event_ids_to_the_engine_hook(db, settings):
    settings.MQTT_BROKER_AUTH = "none"
    release_rows(version="1.0", counter=1)
    device_id = enroll_device().device.id
    patcher = mock.patch.object(hooks, "on_device_events", autospec=True)
    hook = patcher.start()
    payloads = [Event(device_id=device_id, event_no=n, seq=1, model="detector", state="received").to_payload()
                for n in range(3)]
    new_ids = Ingestor().process([_msg(device_id, "events", p) for p in payloads + payloads[:1]])
    assert sorted(new_ids) == sorted(DeviceEvent.objects.values_list("id", flat=True)) and len(new_ids) == 3
    hook.assert_called_once_with(new_ids)
    hook.reset_mock()
    assert Ingestor().process([_msg(device_id, "events", p) for p in payloads]) == []
    hook.assert_called_once_with([])
    patcher.stop()


def test_it_counts_a_retried_batch_once(db, settings):
    # A batch whose transaction fails (a deadlock with another ingest process, say) is retried;
    # the failed attempt must leave no trace in the figures, as it leaves none in the database.
    from django.db import OperationalError

    settings.MQTT_BROKER_AUTH = "none"
    release_rows(version="1.0", counter=1)
    device_id = enroll_device().device.id
    batch = [_msg(device_id, "events", Event(device_id=device_id, event_no=n, seq=1, model="detector",
                                              state="received").to_payload()) for n in range(3)]
    ingestor = Ingestor()
    with mock.patch.object(hooks, "on_device_events", autospec=True, side_effect=[OperationalError("deadlock"), None]):
        with pytest.raises(OperationalError):
            ingestor.process(batch)
        assert DeviceEvent.objects.count() == 0
        assert (ingestor.stats.received, ingestor.stats.events_stored, ingestor.stats.batches) == (0, 0, 0)

        ingestor.process(batch)

    assert DeviceEvent.objects.count() == 3
    assert (ingestor.stats.received, ingestor.stats.events_stored, ingestor.stats.duplicates) == (3, 3, 0)


def test_it_counts_garbage_and_revoked_devices_without_crashing(db, settings):
    settings.MQTT_BROKER_AUTH = "none"
    live = enroll_device().device.id
    revoked = enroll_device().device
    Device.objects.filter(pk=revoked.pk).update(state="revoked")
    good = Event(device_id=live, event_no=1, seq=1, model="unregistered-model", state="received").to_payload()
    ingestor = Ingestor()
    ingestor.process([
        Message("not/a/device/topic", b"{}"),
        Message("fleet/devices/../events", b"{}"),
        _msg(live, "events", b"\xff\xfe"),
        _msg(live, "events", b"[1, 2]"),
        _msg(live, "events", b"{" + b" " * 70_000 + b"}"),
        _msg(live, "events", encode_json({"device_id": live, "event_no": -1, "seq": 1, "model": "m",
                                          "state": "received"})),
        _msg(live, "events", encode_json({"device_id": live, "event_no": 2, "seq": 1, "model": "m",
                                          "state": "failed"})),  # failed without an error code
        _msg(live, "telemetry", encode_json({"cpu_percent": "hot"})),
        _msg(live, "presence", encode_json({"online": "yes"})),
        _msg(revoked.id, "events", Event(device_id=revoked.id, event_no=1, seq=1, model="m",
                                         state="received").to_payload()),
        _msg("dev-unknown", "telemetry", encode_json({"cpu_percent": 1})),
        _msg(live, "events", good),
    ])
    stats = ingestor.stats.as_dict()
    assert (stats["malformed"], stats["revoked_device"], stats["unknown_device"]) == (9, 1, 1), stats
    assert stats["events_stored"] == 1  # an unknown model's event is still kept, with no model state
    assert DeviceEvent.objects.get().model == "unregistered-model"
    assert not DeviceModelState.objects.exists()
