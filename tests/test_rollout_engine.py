"""The wave engine as it runs in production: Celery workers and beat on Redis, `mqtt_ingest`,
a secured Mosquitto, devices answering over MQTT. Two workers at once, one SIGKILLed mid-wave;
pause holds; nothing is ever sent twice."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from ota.models import Directive, Rollout, RolloutDevice, Wave
from registry.models import AuditEntry
from tests.support.platform import DirectiveRecorder, Platform, ProtocolResponder
from tests.support.rollout_data import act, create_rollout, make_devices, release
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def platform(secure_broker, tmp_path):
    with Platform(tmp_path, broker=secure_broker) as p:
        p.start_ingest()
        p.start_beat()
        yield p


@pytest.fixture
def recorder(secure_broker):
    with DirectiveRecorder(secure_broker) as rec:
        yield rec


def state_of(rollout_id):
    return Rollout.objects.get(pk=rollout_id).state


def assert_no_duplicates(rollout_id, recorder):
    directives = list(Directive.objects.filter(rollout_id=rollout_id).values_list("device_id", "seq", "kind"))
    assert len(directives) == len(set((d, s) for d, s, _ in directives))
    per_device = Counter(d for d, _, kind in directives if kind == "update")
    assert set(per_device.values()) == {1}, per_device.most_common(3)
    for device, messages in recorder.by_device().items():
        assert len({m["seq"] for m in messages}) == 1, (device, [m["seq"] for m in messages])
        assert len({m["raw"] for m in messages}) == 1, device


def test_it_finishes_a_rollout_with_a_worker_killed_mid_wave_and_sends_nothing_twice(
    client, admin_token, ci_token, platform, recorder, secure_broker
):
    release(client, admin_token, "detector", "2.0")
    devices = make_devices(40, labels={"site": "berlin"})
    worker_a = platform.start_worker("worker-a")
    platform.start_worker("worker-b")
    with ProtocolResponder(secure_broker, devices, trial_seconds=1.0, step_delay=0.05):
        rollout = create_rollout(
            client, ci_token, model="detector", version="2.0", target={"labels": {"site": "berlin"}},
            waves=[{"devices": ["dev-0000", "dev-0001"]}, {"percent": 50}, {"percent": 100}],
            gates={"rate_per_minute": 600}, abort_policy="pause",
        ).json()
        rid = rollout["id"]
        assert act(client, ci_token, rid, "start").status_code == 200
        wait_for(lambda: Wave.objects.filter(rollout_id=rid, index=1).exclude(state="pending").exists(),
                 timeout=60, what="wave 1 to start", interval=0.2, diagnostics=platform.logs)
        platform.kill_worker(worker_a)
        platform.start_worker("worker-c")
        wait_for(lambda: state_of(rid) == "completed", timeout=120, what="the rollout to complete", interval=0.2,
                 diagnostics=platform.logs)
    assert Counter(RolloutDevice.objects.filter(rollout_id=rid).values_list("state", flat=True)) == {"committed": 40}
    recorder.wait_for(lambda r: len(r.devices()) == 40, what="a directive for each device")
    time.sleep(1.5)  # a late duplicate would have arrived by now (the tick runs every second)
    assert_no_duplicates(rid, recorder)
    assert Directive.objects.filter(rollout_id=rid, published_at__isnull=True).count() == 0
    # Two workers evaluated the same rollout all along: each wave started and passed exactly once.
    log = AuditEntry.objects.filter(object_type="rollout", object_id=str(rid))
    for action in ("wave.start", "wave.pass"):
        assert Counter(e.detail["wave"] for e in log.filter(action=action)) == {0: 1, 1: 1, 2: 1}, action
    assert log.filter(action="rollout.complete").count() == 1


def test_it_holds_while_paused_and_continues_on_resume(client, ci_token, operator_token, admin_token, platform, recorder,
                                                       secure_broker):
    release(client, admin_token, "detector", "2.0")
    devices = make_devices(12, labels={"site": "berlin"})
    platform.start_worker()
    # The canary answers only once the pause is in: with a zero soak time a canary that committed
    # before the pause request got through (a busy box) would rightly start wave 1 first.
    paused_in = threading.Event()

    def after_pause(device_id, body):
        assert paused_in.wait(120), "the test never paused the rollout"
        return "ok"

    with ProtocolResponder(secure_broker, devices, behaviour=after_pause, trial_seconds=1.5):
        rid = create_rollout(
            client, ci_token, model="detector", version="2.0", target={"labels": {"site": "berlin"}},
            waves=[{"devices": ["dev-0000", "dev-0001"]}, {"percent": 100}],
        ).json()["id"]
        act(client, ci_token, rid, "start")
        recorder.wait_for(lambda r: len(r.live()) == 2, timeout=60, what="the canary directives")
        paused = act(client, operator_token, rid, "pause", reason="checking dashboards")
        assert paused.json()["state"] == "paused"
        paused_in.set()
        # The canary commits while paused; the gate is met, yet nothing more goes out.
        wait_for(lambda: RolloutDevice.objects.filter(rollout_id=rid, state="committed").count() == 2,
                 timeout=90, what="the canary to commit", interval=0.2, diagnostics=platform.logs)
        time.sleep(4)  # four beat ticks and the canary's event-driven evaluations
        assert len(recorder.live()) == 2
        assert Directive.objects.filter(rollout_id=rid).count() == 2
        assert Wave.objects.get(rollout_id=rid, index=1).state == "pending"
        assert act(client, operator_token, rid, "resume").json()["state"] == "running"
        wait_for(lambda: state_of(rid) == "completed", timeout=120, what="the rollout to complete", interval=0.2,
                 diagnostics=platform.logs)
    assert len(recorder.devices()) == 12
    assert_no_duplicates(rid, recorder)
