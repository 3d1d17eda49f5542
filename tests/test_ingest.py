"""Ingest: the real `manage.py mqtt_ingest` process on the secure broker and PostgreSQL, fed by
real device clients; plus the batch logic (ordering, dedupe, garbage) on the real database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import pytest
from django.conf import settings as django_settings

from agent.protocol import Event, Topics, encode_json, format_time, presence_payload, utcnow
from ota.fleet.broker import BrokerAdmin
from ota.models import ActiveRelease, DeadLetter, Device, DeviceEvent, DeviceModelState
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


def device_probe(broker, device_id: str, password: str) -> MqttProbe:
    """A real MQTT client for one device, with the agent's client id (the broker may pin it)."""
    return MqttProbe(broker.port, device_id, password, client_id=f"fleet-agent-{device_id}")


def ingest_env(broker) -> dict[str, str]:
    db = django_settings.DATABASES["default"]
    return {
        **os.environ,
        **broker.env,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "SECRET_KEY": "test-only",
        "CELERY_BROKER_URL": os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/3"),
        "LOG_LEVEL": "INFO",
    }


def run_ingest(broker, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`manage.py mqtt_ingest ARGS` to its end (--retire, or a refusal)."""
    return subprocess.run([sys.executable, str(ROOT / "manage.py"), "mqtt_ingest", *args], env=ingest_env(broker),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)


class IngestProcess:
    def __init__(self, broker, workdir: Path, *extra: str):
        self.log = workdir / f"ingest-{time.monotonic_ns()}.log"
        self.out = workdir / f"ingest-{time.monotonic_ns()}.out"
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "mqtt_ingest", "--stats-interval", "3600", *extra],
            env=ingest_env(broker), stdout=self.out.open("w"), stderr=self.log.open("w"), cwd=ROOT,
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
    device = device_probe(secure_broker, device_id, enrolled.mqtt_password)
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
    first, second = ingest_processes(), ingest_processes("--instance", "2")  # one session each
    enrolled = [enroll_device() for _ in range(4)]
    # Broker credentials for a device the database has never heard of.
    with BrokerAdmin(BrokerSettings.from_settings()) as admin:
        admin.device_add(device_id="dev-ghost", password="ghost-pw", topic_root="fleet")
    clients = []
    try:
        for e in enrolled:
            probe = device_probe(secure_broker, e.device.id, e.mqtt_password)
            assert probe.connect()
            clients.append((e.device.id, probe))
        ghost = device_probe(secure_broker, "dev-ghost", "ghost-pw")
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


def test_it_keeps_what_a_device_reports_per_model_in_its_presence(db, settings):
    settings.MQTT_BROKER_AUTH = "none"
    v1, a1 = release_rows(version="1.0", counter=1)
    device_id = enroll_device().device.id
    online = presence_payload(online=True, agent_version="1.2", active={"detector": a1.sha256},
                              models={"detector": {"sha256": a1.sha256, "version": "1.0", "committed": True, "seq": 7}},
                              update={"model": "detector", "seq": 8, "phase": "downloading"})
    ingestor = Ingestor()
    ingestor.process([_msg(device_id, "presence", online)])
    state = DeviceModelState.objects.get(device_id=device_id)
    assert (state.reported_seq, state.reported_committed, state.reported_update_seq) == (7, True, 8)
    assert (state.active_version_id, state.reported_at is not None) == (v1.pk, True)
    assert Device.objects.get(pk=device_id).reported_at == state.reported_at
    # The last will (online=false) carries no per-model figures: what the device said last stands.
    ingestor.process([_msg(device_id, "presence", presence_payload(online=False, agent_version="1.2",
                                                                   active={"detector": a1.sha256}))])
    state.refresh_from_db()
    assert (state.reported_seq, state.reported_update_seq) == (7, 8)
    assert Device.objects.get(pk=device_id).online is False


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


# --- durable sessions: nothing the broker accepted is lost when ingest dies --------------------


@pytest.mark.django_db(transaction=True)
def test_it_loses_no_event_when_ingest_is_killed_while_devices_publish(secure_broker, tmp_path):
    """SIGKILL the real `manage.py mqtt_ingest`, started as the end-to-end platform starts it (no
    client id given: the default), while devices go on publishing QoS 1 events, and a wave's
    worth more arrives while it is down; start it again: every event the broker acknowledged is
    stored. A clean session (what ingest used by default) loses whatever the broker received while
    it was down and whatever it had handed over unacknowledged; Mosquitto's old per-client queue
    limit (10,000) dropped the rest of a 12,000-event burst."""
    from tests.support.platform import Platform

    enrolled = [enroll_device() for _ in range(5)]
    probes = {}
    for e in enrolled:
        probes[e.device.id] = device_probe(secure_broker, e.device.id, e.mqtt_password)
        probes[e.device.id].client.max_inflight_messages_set(1000)  # the burst below: one round trip, not 600
        assert probes[e.device.id].connect()
    steady, (burst_id,) = list(probes)[:4], list(probes)[4:]
    acknowledged: dict[str, int] = defaultdict(int)  # per device: events 0..n-1 acknowledged by the broker
    stop = threading.Event()

    def keep_publishing(device_id: str) -> None:
        n = 0
        while not stop.is_set():
            probes[device_id].publish(T.events(device_id), Event(
                device_id=device_id, event_no=n, seq=1, model="detector", state="downloading").to_payload())
            n += 1
            acknowledged[device_id] = n
            time.sleep(0.005)

    publishers = [threading.Thread(target=keep_publishing, args=(d,), daemon=True) for d in steady]
    try:
        with Platform(tmp_path, broker=secure_broker) as platform:
            ingest = platform.start_ingest()
            platform.wait_for_log(ingest, "ingest: subscribed")
            for thread in publishers:
                thread.start()
            wait_for(lambda: DeviceEvent.objects.count() >= 100, timeout=20, what="ingest storing events")

            platform.kill(ingest)  # SIGKILL: no DISCONNECT, received-but-unacknowledged messages in hand
            at_kill = sum(acknowledged.values())
            burst = probes[burst_id].client
            infos = [burst.publish(T.events(burst_id), Event(device_id=burst_id, event_no=n, seq=1, model="detector",
                                                             state="received").to_payload(), qos=1)
                     for n in range(12_000)]
            for info in infos:
                info.wait_for_publish(60)
            assert all(info.is_published() for info in infos)
            acknowledged[burst_id] = len(infos)
            time.sleep(0.5)
            while_down = sum(acknowledged.values()) - at_kill
            assert while_down > 12_000

            ingest = platform.start_ingest()
            platform.wait_for_log(ingest, "ingest: subscribed")
            time.sleep(1)  # the devices go on publishing while it catches up
            stop.set()
            for thread in publishers:
                thread.join(10)
            expected = {(d, n) for d, count in acknowledged.items() for n in range(count)}
            wait_for(lambda: DeviceEvent.objects.count() >= len(expected), timeout=90,
                     what=f"all {len(expected)} acknowledged events stored",
                     diagnostics=lambda: f"stored {DeviceEvent.objects.count()}\n{platform.logs()}")
            stored = set(DeviceEvent.objects.values_list("device_id", "event_no"))
            assert stored == expected, f"missing {len(expected - stored)}, e.g. {sorted(expected - stored)[:5]}"
            log = ingest.log_path.read_text()
            assert "session resumed" in log, log[-3000:]
            assert "being dropped" not in secure_broker.broker.log_text()
    finally:
        stop.set()
        for probe in probes.values():
            probe.close()


@pytest.mark.django_db(transaction=True)
def test_it_refuses_a_second_ingest_process_with_the_same_client_id(secure_broker, ingest_processes):
    # Two clients with one id would take the session from each other in turn, forever.
    ingest_processes()
    second = run_ingest(secure_broker, timeout=30)
    assert second.returncode == 1
    assert "another ingest process on this host" in second.stderr and "--instance" in second.stderr
    ingest_processes("--instance", "2")  # its own id: welcome


# --- poisoned messages: isolated, dead-lettered, never stalling the rest -----------------------


@pytest.mark.django_db(transaction=True)
def test_a_poisoned_message_goes_to_the_dead_letter_table_without_delaying_other_devices(
    secure_broker, ingest_processes
):
    """NUL (U+0000) is legal in JSON but PostgreSQL stores it in neither text nor jsonb: one such
    message used to make every batch it was in fail, retried every second forever, while every
    other device's reports froze (and a retained one did it again after each restart)."""
    release_rows(version="1.0", counter=1)
    healthy = [enroll_device() for _ in range(2)]
    bad = enroll_device()
    bad_id = bad.device.id
    ingest = ingest_processes()
    clients = {}
    for e in [*healthy, bad]:
        clients[e.device.id] = device_probe(secure_broker, e.device.id, e.mqtt_password)
        assert clients[e.device.id].connect()
    next_no: dict[str, int] = defaultdict(int)

    def healthy_reports_arrive(what: str) -> float:
        sent = []
        for e in healthy:
            device_id = e.device.id
            next_no[device_id] += 1
            sent.append((device_id, next_no[device_id]))
            clients[device_id].publish(T.events(device_id), Event(
                device_id=device_id, event_no=next_no[device_id], seq=1, model="detector", state="received").to_payload())
        started = time.monotonic()
        wait_for(lambda: all(DeviceEvent.objects.filter(device_id=d, event_no=n).exists() for d, n in sent),
                 timeout=3, what=f"the other devices' events, {what}",
                 diagnostics=lambda: "\n".join(p.log.read_text()[-3000:] for p in started_processes))
        return time.monotonic() - started

    started_processes = [ingest]
    poisons = [  # (kind, payload, retain, what happens)
        ("events", Event(device_id=bad_id, event_no=1, seq=1, model="detector", state="failed",
                         error_code="PRECHECK_FAILED", detail="onnxruntime: bad\x00input").to_payload(), False, "repaired"),
        ("telemetry", encode_json({"cpu_percent": 10.0, "sensor": "cpu\x00temp"}), False, "repaired"),
        ("presence", presence_payload(online=True, agent_version="0.3.1\x00evil"), True, "repaired"),
        ("events", Event(device_id=bad_id, event_no=2, seq=1, model="detector", state="received",
                         rollout_id="r1\x00").to_payload(), False, "dropped"),
        # Not a NUL, but refused by PostgreSQL all the same (bigint out of range): isolated in the batch.
        ("events", Event(device_id=bad_id, event_no=2**63, seq=1, model="detector", state="received").to_payload(),
         False, "dropped"),
    ]
    waits = []
    for kind, payload, retain, _outcome in poisons:
        clients[bad_id].publish(T.device(bad_id, kind), payload, retain=retain)
        waits.append(healthy_reports_arrive(f"after a poisoned {kind} message"))
    assert max(waits) < 3, waits

    wait_for(lambda: DeadLetter.objects.count() == len(poisons), timeout=5, what="five dead letters")
    letters = list(DeadLetter.objects.order_by("id"))
    assert [(r.device_id, r.kind, r.outcome) for r in letters] == [(bad_id, k, o) for k, _p, _r, o in poisons]
    assert [bytes(r.payload) for r in letters] == [p for _k, p, _r, _o in poisons]
    assert all(b"\\u0000" in bytes(r.payload) for r in letters[:4])
    assert "rollout_id" in letters[3].error and "out of range" in letters[4].error
    assert not DeadLetter.objects.exclude(device_id=bad_id).exists()
    # What could be repaired is stored, without the NUL.
    assert DeviceEvent.objects.get(device_id=bad_id).detail == "onnxruntime: badinput"
    device = Device.objects.get(pk=bad_id)
    assert (device.agent_version, device.last_telemetry) == ("0.3.1evil", {"cpu_percent": 10.0, "sensor": "cputemp"})

    stats = ingest.stop()
    assert (stats["repaired"], stats["dead_lettered"]) == (3, 2), stats
    assert "dead_lettered" in ingest.log.read_text()  # the stats log line counts them

    # Restarted under its own id: its session resumes, the retained presence is not replayed.
    started_processes.append(ingest := ingest_processes())
    healthy_reports_arrive("after a restart")
    assert not DeadLetter.objects.filter(retained=True).exists()
    ingest.stop()
    # Gone for good: --retire takes what is queued for it and ends its session. A new session
    # (another id) is sent every retained presence, the poisoned one included: it does not stall.
    retired = run_ingest(secure_broker, "--retire")
    assert retired.returncode == 0 and "retired: session" in retired.stderr, retired.stderr
    started_processes.append(ingest_processes("--instance", "2"))
    wait_for(lambda: DeadLetter.objects.filter(device_id=bad_id, kind="presence", retained=True).exists(),
             timeout=5, what="the retained poisoned presence, replayed and repaired again")
    healthy_reports_arrive("with the poisoned presence replayed to a new session")
    for client in clients.values():
        client.close()


# --- the dead-letter policy on the real database (no broker needed) ----------------------------


def test_it_repairs_free_text_and_dead_letters_identifiers_holding_a_nul(db, settings):
    settings.MQTT_BROKER_AUTH = "none"
    release_rows(version="1.0", counter=1)
    device_id = enroll_device().device.id

    def event(n: int, **fields) -> bytes:
        return Event(**{"device_id": device_id, "event_no": n, "seq": 1, "model": "detector", "state": "received",
                        **fields}).to_payload()

    ingestor = Ingestor()
    ingestor.store([
        _msg(device_id, "events", event(1, detail="a\x00b\ud800", ts="2026-01-01T00:00:00Z\x00",
                                        health={"latency\x00ms": "x\x00", "runs": [1, "\x00"]})),
        _msg(device_id, "events", event(2, rollout_id="r\x001")),
        _msg(device_id, "events", event(3, model="detec\x00tor")),
        _msg(device_id, "events", event(4, state="failed", error_code="E\x00")),
        _msg(device_id, "telemetry", encode_json({"cpu_percent": 1.0, "disks": {"sd\x00a": ["ok\x00"]}})),
        _msg(device_id, "presence", presence_payload(online=True, agent_version="0.1\x00",
                                                     active={"detector\x00": "a" * 64, "other": "b" * 64})),
        _msg(device_id, "events", event(5)),
    ])
    stored = {e.event_no: e for e in DeviceEvent.objects.filter(device_id=device_id)}
    assert sorted(stored) == [1, 5]
    assert (stored[1].detail, stored[1].device_ts) == ("ab", "2026-01-01T00:00:00Z")
    assert stored[1].health == {"latencyms": "x", "runs": [1, ""]}
    device = Device.objects.get(pk=device_id)
    assert device.last_telemetry == {"cpu_percent": 1.0, "disks": {"sda": ["ok"]}}
    assert device.agent_version == "0.1"
    letters = list(DeadLetter.objects.order_by("id"))
    assert sorted((r.outcome, r.kind) for r in letters) == [
        ("dropped", "events"), ("dropped", "events"), ("dropped", "events"),
        ("repaired", "events"), ("repaired", "presence"), ("repaired", "telemetry")]
    assert {r.device_id for r in letters} == {device_id}
    dropped = " ".join(r.error for r in letters if r.outcome == "dropped")
    assert "event.rollout_id" in dropped and "event.model" in dropped and "event.error_code" in dropped
    assert (ingestor.stats.repaired, ingestor.stats.dead_lettered, ingestor.stats.events_stored) == (3, 3, 2)


def test_it_stores_a_batch_without_the_one_message_the_database_refuses(db, settings):
    settings.MQTT_BROKER_AUTH = "none"
    release_rows(version="1.0", counter=1)
    good, bad = enroll_device().device.id, enroll_device().device.id

    def event(device_id: str, n: int) -> Message:
        return _msg(device_id, "events", Event(device_id=device_id, event_no=n, seq=1, model="detector",
                                               state="received").to_payload())

    batch = [_msg(good, "presence", presence_payload(online=True, agent_version="1"))]
    batch += [event(good, n) for n in range(10)] + [event(bad, 2**63)] + [event(good, n) for n in range(10, 20)]
    batch += [_msg(good, "presence", presence_payload(online=False, agent_version="1"))]
    ingestor = Ingestor()
    new_ids = ingestor.store(batch)

    assert sorted(DeviceEvent.objects.filter(device_id=good).values_list("event_no", flat=True)) == list(range(20))
    assert len(new_ids) == 20 and not DeviceEvent.objects.filter(device_id=bad).exists()
    assert Device.objects.get(pk=good).online is False  # arrival order kept across the halves
    letter = DeadLetter.objects.get()
    assert (letter.device_id, letter.outcome, bytes(letter.payload)) == (bad, "dropped", batch[11].payload)
    assert "DataError" in letter.error and "out of range" in letter.error
    assert (ingestor.stats.events_stored, ingestor.stats.dead_lettered, ingestor.stats.received) == (20, 1, 23)


def test_it_never_dead_letters_what_fails_because_the_database_is_unavailable(db, settings):
    from django.db import OperationalError

    settings.MQTT_BROKER_AUTH = "none"
    release_rows(version="1.0", counter=1)
    device_id = enroll_device().device.id
    batch = [_msg(device_id, "events", Event(device_id=device_id, event_no=n, seq=1, model="detector",
                                              state="received").to_payload()) for n in range(3)]
    ingestor = Ingestor()
    unavailable = mock.patch.object(hooks, "on_device_events", side_effect=OperationalError("terminating connection"))
    with unavailable, pytest.raises(OperationalError):
        ingestor.store(batch)  # the caller retries the whole batch, unacknowledged
    assert not DeadLetter.objects.exists() and not DeviceEvent.objects.exists()
    assert ingestor.stats.dead_lettered == 0


def test_the_dead_letter_table_is_read_only_in_the_admin(admin_client):
    row = DeadLetter.objects.create(
        topic="fleet/devices/dev-1/events", kind="events", device_id="dev-1", payload=b'{"detail": "a\x00b"}\xff',
        payload_size=21, outcome="dropped", error="DataError: PostgreSQL text fields cannot contain NUL (0x00) bytes")
    listing = admin_client.get("/admin/ota/deadletter/")
    assert listing.status_code == 200 and "dev-1" in listing.content.decode()
    page = admin_client.get(f"/admin/ota/deadletter/{row.pk}/change/")
    body = page.content.decode()
    assert page.status_code == 200 and "a\\x00b" in body and "\\xff" in body and 'name="_save"' not in body
    assert admin_client.get("/admin/ota/deadletter/add/").status_code == 403
    assert admin_client.post(f"/admin/ota/deadletter/{row.pk}/delete/", {"post": "yes"}).status_code == 403
    assert DeadLetter.objects.filter(pk=row.pk).exists()
