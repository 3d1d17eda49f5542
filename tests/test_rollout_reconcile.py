"""Reconciling desired and reported state without anyone acting: a directive the broker lost is
published again until the device acknowledges it (at once when its presence says it lacks it);
an outcome whose events were lost is recorded from the device's presence; a withdrawal that met a broker outage is
retried until it sticks; a failed revert is tried again with backoff; an operator's retry
re-sends to devices that never picked up their directive and lifts a deny-list entry, signed."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest
from django.utils import timezone

from ota.models import Device, DeviceEvent, DeviceModelState, Directive, Rollout, RolloutDevice
from ota.rollouts.actions import rollout_abort, rollout_retry_failed, rollout_start
from ota.rollouts.create import rollout_create
from ota.rollouts.directives import directives_publish_stale
from ota.rollouts.engine import rollout_evaluate
from ota.rollouts.events import rollout_apply_events
from ota.rollouts.reconcile import (
    REPORT_GRACE,
    REPUBLISH_AFTER,
    REVERT_ATTEMPTS,
    assignments_reconcile_reported,
    directives_republish_unacknowledged,
    reverts_retry,
)
from ota.transport import mqtt as ota_mqtt
from registry.models import ModelVersion
from tests.support.platform import DirectiveRecorder
from tests.support.rollout_data import make_devices, release

pytestmark = pytest.mark.django_db


@pytest.fixture
def fleet(client, admin_token, secure_broker, django_capture_on_commit_callbacks):
    release(client, admin_token, "detector", "1.0")
    release(client, admin_token, "detector", "2.0")
    make_devices(4, labels={"site": "berlin"})
    return django_capture_on_commit_callbacks


def running(capture, **definition):
    with capture(execute=True):
        rollout = rollout_create(model="detector", version="2.0", target={"labels": {"site": "berlin"}},
                                 waves=[{"percent": 100}], actor="user:x", **definition)
        rollout_start(rollout_id=rollout.pk, actor="user:x")
        rollout_evaluate(rollout_id=rollout.pk)
    return rollout


def report(capture, device_id, state, *, seq, event_no, error_code=""):
    event = DeviceEvent.objects.create(device_id=device_id, event_no=event_no, seq=seq, model="detector", state=state,
                                       error_code=error_code, received_at=timezone.now())
    with capture(execute=True):
        rollout_apply_events(event_ids=[event.pk])


def body(message: dict) -> dict:
    return json.loads(base64.b64decode(message["envelope"]["payload"]))


def test_it_publishes_again_what_the_broker_lost_until_the_device_acknowledges_it(fleet, secure_broker):
    rollout = running(fleet)
    acked, offline, *online = RolloutDevice.objects.filter(rollout=rollout).order_by("rank")
    report(fleet, acked.device_id, "received", seq=acked.seq, event_no=1)
    Device.objects.exclude(pk=offline.device_id).update(online=True)
    # The broker crashed before its autosave: its retained directives are gone.
    Directive.objects.update(published_at=timezone.now() - REPUBLISH_AFTER - timedelta(seconds=1))
    with DirectiveRecorder(secure_broker) as recorder:
        assert directives_republish_unacknowledged() == 2
        recorder.wait_for(lambda r: len(r.live()) == 2, what="the two unacknowledged directives of online devices")
        assert recorder.devices() == {a.device_id for a in online}  # the offline one gets it once it is back
        assert {m["seq"] for m in recorder.live()} == {1}  # the same directives, same seq
    assert directives_republish_unacknowledged() == 0  # not again before REPUBLISH_AFTER


def test_it_publishes_at_once_to_a_device_whose_presence_says_it_lacks_its_directive(fleet, secure_broker):
    rollout = running(fleet)
    back, handled, *_ = RolloutDevice.objects.filter(rollout=rollout).order_by("rank")
    now = timezone.now()
    stood = now - REPORT_GRACE - timedelta(seconds=1)
    Device.objects.filter(pk__in=[back.device_id, handled.device_id]).update(online=True, reported_at=stood)
    # Back from the dead after a broker crash, with a fresh box's presence (newer than the
    # directive) that lists no model at all; the other one's says it handled the directive
    # (its events lost).
    DeviceModelState.objects.create(device_id=handled.device_id, model_id=rollout.model_id, reported_seq=handled.seq,
                                    reported_committed=True, reported_at=stood)
    Directive.objects.update(published_at=now - REPORT_GRACE - timedelta(seconds=2))
    with DirectiveRecorder(secure_broker) as recorder:
        assert directives_republish_unacknowledged(now=now) == 1
        recorder.wait_for(lambda r: r.devices() == {back.device_id}, what="the directive again, to the device lacking it")


def test_it_records_the_outcome_a_device_reports_when_its_events_were_lost(fleet):
    rollout = running(fleet)
    committed, rolled_back, busy, quiet = RolloutDevice.objects.filter(rollout=rollout).order_by("rank")
    RolloutDevice.objects.filter(pk=quiet.pk).update(state="unreachable")
    model_id = rollout.model_id
    v1 = ModelVersion.objects.get(model_id=model_id, version="1.0")
    now = timezone.now()
    stood = now - REPORT_GRACE - timedelta(seconds=1)
    for a, version, update_seq, at in ((committed, rollout.release, None, stood), (rolled_back, v1, None, stood),
                                       (busy, rollout.release, busy.seq, stood), (quiet, rollout.release, None, now)):
        DeviceModelState.objects.update_or_create(device_id=a.device_id, model_id=model_id, defaults={
            "reported_seq": a.seq, "reported_committed": True, "reported_update_seq": update_seq, "reported_at": at,
            "active_version": version, "active_sha256": "ab" * 32})

    assert assignments_reconcile_reported(now=now) == {rollout.pk}
    got = {a.pk: a for a in RolloutDevice.objects.filter(rollout=rollout)}
    assert got[committed.pk].state == "committed" and "presence" in got[committed.pk].detail
    assert (got[rolled_back.pk].state, got[rolled_back.pk].error_code) == ("failed", "OUTCOME_LOST")
    assert got[busy.pk].state == "directed"  # its update is still in flight: its events decide
    assert got[quiet.pk].state == "unreachable"  # a presence younger than REPORT_GRACE waits for the events
    assert assignments_reconcile_reported(now=now) == set()  # recorded once


def test_it_retries_a_withdrawal_until_the_broker_takes_it(fleet, secure_broker, settings):
    rollout = running(fleet)
    port = settings.MQTT_PORT
    settings.MQTT_PORT = 9  # the broker is unreachable while the rollout is aborted
    ota_mqtt.reset_publisher()
    with fleet(execute=True):
        rollout_abort(rollout_id=rollout.pk, actor="user:x", reason="bad release")
    assert Directive.objects.filter(withdrawn_at__isnull=False, published_at__isnull=True).count() == 4
    settings.MQTT_PORT = port
    ota_mqtt.reset_publisher()
    Directive.objects.update(created_at=timezone.now() - timedelta(minutes=1))
    with DirectiveRecorder(secure_broker) as recorder:
        assert directives_publish_stale() == 4
        recorder.wait_for(lambda r: len([m for m in r.snapshot() if not m["raw"]]) == 4, what="four empty retained")
    assert not Directive.objects.filter(published_at__isnull=True).exists()


def test_it_tries_a_failed_revert_again_with_backoff_and_then_lists_it(fleet):
    rollout = running(fleet, abort_policy="revert")
    first = RolloutDevice.objects.filter(rollout=rollout).order_by("rank").first()
    v1 = ModelVersion.objects.get(version="1.0")
    RolloutDevice.objects.filter(pk=first.pk).update(state="revert_failed", previous_version=v1,
                                                     error_code="DOWNLOAD_FAILED")
    now = timezone.now()
    with fleet(execute=True):
        assert reverts_retry(now=now) == 1
    again = RolloutDevice.objects.get(pk=first.pk)
    assert again.state == "reverting" and again.revert_attempts == 1 and again.revert_retry_at > now
    revert = Directive.objects.get(device_id=first.device_id, seq=again.revert_seq)
    assert revert.kind == "revert" and revert.version == v1

    RolloutDevice.objects.filter(pk=first.pk).update(state="revert_failed")
    with fleet(execute=True):
        assert reverts_retry(now=now) == 0  # not before its backoff
        RolloutDevice.objects.filter(pk=first.pk).update(revert_attempts=REVERT_ATTEMPTS)
        assert reverts_retry(now=now + timedelta(days=1)) == 0  # out of attempts: stays listed
    assert RolloutDevice.objects.get(pk=first.pk).state == "revert_failed"


def test_it_re_sends_to_devices_that_never_picked_up_and_lifts_a_denylist_entry_on_retry(fleet, secure_broker):
    rollout = running(fleet)
    rolled_back, silent = list(RolloutDevice.objects.filter(rollout=rollout).order_by("rank"))[:2]
    report(fleet, rolled_back.device_id, "received", seq=rolled_back.seq, event_no=1)
    report(fleet, rolled_back.device_id, "rolled_back", seq=rolled_back.seq, event_no=2, error_code="TRIAL_FAILED")
    RolloutDevice.objects.filter(pk=silent.pk).update(state="unreachable")
    Rollout.objects.filter(pk=rollout.pk).update(state="paused")

    with DirectiveRecorder(secure_broker) as recorder:
        with fleet(execute=True):  # publishing happens on commit, at the end of this block
            # The one that rolled back, the unreachable one and the two still directed.
            assert rollout_retry_failed(rollout_id=rollout.pk, actor="user:x") == 4
            Rollout.objects.filter(pk=rollout.pk).update(state="running")
            rollout_evaluate(rollout_id=rollout.pk)
        recorder.wait_for(lambda r: {rolled_back.device_id, silent.device_id} <= r.devices(), what="both re-sent")
        by_device = recorder.by_device()
    resent = by_device[silent.device_id][-1]
    assert resent["seq"] == silent.seq and "retry_denied" not in body(resent)  # the same directive again
    fresh = by_device[rolled_back.device_id][-1]
    assert fresh["seq"] > rolled_back.seq and body(fresh)["retry_denied"] is True
    assert RolloutDevice.objects.get(pk=silent.pk).state == "directed"
