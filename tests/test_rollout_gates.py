"""The wave engine's decisions, driven step by step: directives really signed and published to
a real (secured) Mosquitto, device reports stored as ingest stores them, gates evaluated.

Success is `committed` (healthy after activation) and nothing less; failure gates pause, abort
or revert; timeouts count as failures; soak and rate caps hold the line."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone

from agent.protocol import verify_directive
from agent.signing import Keyring, public_key_pem
from ota.models import Device, DeviceEvent, DeviceModelState, Directive, Rollout, RolloutDevice, Wave
from ota.rollouts.actions import (
    rollout_advance,
    rollout_resume,
    rollout_retry_failed,
    rollout_rollback,
    rollout_start,
)
from ota.rollouts.create import rollout_create
from ota.rollouts.definition import gates_normalise
from ota.rollouts.engine import rollout_evaluate
from ota.rollouts.events import events_concern_rollouts, rollout_apply_events, rollout_catch_up_events
from registry.errors import Conflict
from registry.keys import load_rollout_key
from registry.models import AuditEntry, ModelVersion
from tests.support.platform import DirectiveRecorder
from tests.support.rollout_data import make_devices, release

pytestmark = pytest.mark.django_db


class Fleet:
    """Stores device reports the way mqtt_ingest does, then feeds them to the engine."""

    def __init__(self, capture):
        self.capture = capture
        self.event_no: dict[str, int] = {}

    def report(self, device_ids, state, *, error_code="", seq=None, at=None):
        ids = []
        for device_id in device_ids:
            directive = Directive.objects.filter(device_id=device_id).order_by("-seq").first()
            n = self.event_no.get(device_id, 0) + 1
            self.event_no[device_id] = n
            event = DeviceEvent.objects.create(
                device_id=device_id, event_no=n, seq=seq or directive.seq, model="detector", state=state,
                error_code=error_code, rollout_id=str(directive.rollout_id),
                received_at=at or timezone.now(),
            )
            ids.append(event.pk)
        with self.capture(execute=True):
            rollout_apply_events(event_ids=ids)
        return ids

    def evaluate(self, rollout):
        with self.capture(execute=True):
            return rollout_evaluate(rollout_id=rollout.pk)


@pytest.fixture
def recorder(secure_broker):
    with DirectiveRecorder(secure_broker) as rec:
        yield rec


@pytest.fixture
def setup(client, admin_token, secure_broker, django_capture_on_commit_callbacks):
    release(client, admin_token, "detector", "1.0")
    release(client, admin_token, "detector", "2.0")
    devices = make_devices(20, labels={"site": "berlin"})
    v1 = ModelVersion.objects.get(version="1.0")
    v1_sha = v1.artifacts.get().sha256
    DeviceModelState.objects.bulk_create(
        [DeviceModelState(device_id=d, model=v1.model, active_version=v1, active_sha256=v1_sha) for d in devices]
    )
    return {"devices": devices, "fleet": Fleet(django_capture_on_commit_callbacks), "v1": v1}


def start(gates=None, waves=None, policy="revert", devices=None):
    rollout = rollout_create(
        model="detector", version="2.0", target={"labels": {"site": "berlin"}},
        waves=waves or [{"devices": ["dev-0000", "dev-0001"]}, {"percent": 25}, {"percent": 100}],
        gates=gates or {"failure": {"min_reports": 1, "max_failed_percent": 50}},
        abort_policy=policy, actor="token:test",
    )
    rollout_start(rollout_id=rollout.pk, actor="token:test")
    return rollout


def members(rollout, index):
    return list(RolloutDevice.objects.filter(wave__rollout=rollout, wave__index=index).values_list("device_id", flat=True))


def test_it_advances_only_on_committed_devices_and_sends_signed_directives(setup, recorder):
    fleet = setup["fleet"]
    rollout = start()
    assert fleet.evaluate(rollout) == "dispatched"
    recorder.wait_for(lambda r: len(r.live()) == 2, what="the canary directives")
    assert recorder.devices() == {"dev-0000", "dev-0001"}
    keyring = Keyring.from_pems(public_key_pem(load_rollout_key().public_key()))
    for message in recorder.live():
        directive = verify_directive(message["envelope"], keyring)
        assert directive.device_id == message["device"]
        assert directive.seq == 1 and directive.rollout_id == str(rollout.pk)
        assert directive.artifact.sha256 == ModelVersion.objects.get(version="2.0").artifacts.get().sha256
        assert directive.artifact.url.endswith("/api/v1/models/detector/versions/2.0/artifacts/rpi4/download")
        assert message["retained"] is False
    assert Directive.objects.filter(published_at__isnull=True).count() == 0

    # Progress short of commit (activated, in trial) never opens the next wave.
    canary = ["dev-0000", "dev-0001"]
    for state in ("received", "downloading", "verifying", "activating", "trial"):
        fleet.report(canary, state)
    assert fleet.evaluate(rollout) == "idle"
    assert Wave.objects.get(rollout=rollout, index=1).state == "pending"
    fleet.report(canary, "committed")
    assert fleet.evaluate(rollout) == "dispatched"
    wave1 = members(rollout, 1)
    assert len(wave1) == 3
    recorder.wait_for(lambda r: len(r.live()) == 5)
    fleet.report(wave1, "committed")
    fleet.evaluate(rollout)
    wave2 = members(rollout, 2)
    assert len(wave2) == 15
    fleet.report(wave2, "committed")
    assert fleet.evaluate(rollout) == "completed"
    rollout.refresh_from_db()
    assert rollout.state == "completed"
    recorder.wait_for(lambda r: len(r.live()) == 20)
    assert sorted(len(v) for v in recorder.by_device().values()) == [1] * 20
    log = list(AuditEntry.objects.filter(object_type="rollout", object_id=str(rollout.pk)).order_by("id").values_list("action", flat=True))
    assert log == ["rollout.create", "rollout.start", "wave.start", "wave.gate_met", "wave.pass", "wave.start",
                   "wave.gate_met", "wave.pass", "wave.start", "wave.gate_met", "wave.pass", "rollout.complete"]
    gate = AuditEntry.objects.filter(object_type="rollout", object_id=str(rollout.pk), action="wave.gate_met").order_by("id").first()
    assert gate.detail["committed"] == 2 and gate.detail["healthy_percent"] == 100.0


def test_it_aborts_a_failing_canary_and_reverts_the_devices_it_updated(setup, recorder):
    fleet = setup["fleet"]
    rollout = start(gates={"failure": {"min_reports": 2, "max_failed_percent": 50}})
    fleet.evaluate(rollout)
    fleet.report(["dev-0000"], "committed")
    fleet.report(["dev-0001"], "failed", error_code="PRECHECK_FAILED")
    assert fleet.evaluate(rollout) == "gate-tripped"
    rollout.refresh_from_db()
    assert rollout.state == "aborted" and rollout.reverted_at is not None
    assert "1 of 2 reporting devices failed (50.0% >= max_failed_percent 50%)" in rollout.state_reason

    # Only the canary ever heard of the rollout; the committed one is pointed back at 1.0.
    recorder.wait_for(lambda r: len(r.live()) == 3)
    by_device = recorder.by_device()
    assert set(by_device) == {"dev-0000", "dev-0001"}
    assert [(m["seq"], m["version"]) for m in by_device["dev-0000"]] == [(1, "2.0"), (2, "1.0")]
    assert RolloutDevice.objects.get(rollout=rollout, device_id="dev-0000").state == "reverting"
    assert set(RolloutDevice.objects.filter(rollout=rollout, wave__index__gt=0).values_list("state", flat=True)) == {"skipped"}
    entry = AuditEntry.objects.get(object_type="rollout", object_id=str(rollout.pk), action="rollout.auto_revert")
    assert entry.actor == "system"
    assert entry.detail["failed"] == 1 and entry.detail["reported"] == 2 and entry.detail["revert_directives"] == 1

    fleet.report(["dev-0000"], "committed", seq=2)
    assert RolloutDevice.objects.get(rollout=rollout, device_id="dev-0000").state == "reverted"


def test_it_pauses_on_failure_and_retry_sends_a_fresh_directive(setup, recorder):
    fleet = setup["fleet"]
    rollout = start(policy="pause")
    fleet.evaluate(rollout)
    fleet.report(["dev-0001"], "rolled_back", error_code="TRIAL_FAILED")
    fleet.evaluate(rollout)
    rollout.refresh_from_db()
    assert rollout.state == "paused"
    assert AuditEntry.objects.filter(object_type="rollout", object_id=str(rollout.pk), action="rollout.auto_pause").exists()
    # dev-0001 failed: queued again for a fresh directive. dev-0000 never answered: the same
    # directive is sent again (same seq), it may simply have missed it.
    with fleet.capture(execute=True):
        assert rollout_retry_failed(rollout_id=rollout.pk, actor="token:op") == 2
    entry = AuditEntry.objects.filter(object_type="rollout", object_id=str(rollout.pk), action="rollout.retry").get()
    assert entry.detail == {"devices": 2, "requeued": 1, "resent": 1}
    rollout_resume(rollout_id=rollout.pk, actor="token:op")
    fleet.evaluate(rollout)
    recorder.wait_for(lambda r: len(r.by_device().get("dev-0001", [])) == 2)
    assert [m["seq"] for m in recorder.by_device()["dev-0001"]] == [1, 2]
    recorder.wait_for(lambda r: len(r.by_device().get("dev-0000", [])) == 2)
    assert [m["seq"] for m in recorder.by_device()["dev-0000"]] == [1, 1]
    assert RolloutDevice.objects.get(rollout=rollout, device_id="dev-0001").attempts == 2


def test_it_counts_phase_timeouts_as_failures(setup):
    fleet = setup["fleet"]
    rollout = start(gates={"timeouts": {"trial_seconds": 30}, "failure": {"min_reports": 1, "max_failed_percent": 100}},
                    policy="abort")
    fleet.evaluate(rollout)
    fleet.report(["dev-0000", "dev-0001"], "trial", at=timezone.now() - timedelta(seconds=31))
    fleet.evaluate(rollout)
    states = dict(RolloutDevice.objects.filter(rollout=rollout, wave__index=0).values_list("device_id", "error_code"))
    assert states == {"dev-0000": "TIMEOUT_TRIAL", "dev-0001": "TIMEOUT_TRIAL"}
    rollout.refresh_from_db()
    assert rollout.state == "aborted"
    # Both automatic decisions are in the audit log with the figures behind them.
    log = AuditEntry.objects.filter(object_type="rollout", object_id=str(rollout.pk), actor="system")
    expired = log.get(action="devices.timeout")
    assert expired.reason == "2 devices exceeded the trial timeout."
    assert sorted(expired.detail["trial"]) == ["dev-0000", "dev-0001"]
    verdict = log.get(action="rollout.auto_abort")
    assert "2 of 2 reporting devices failed" in verdict.reason
    assert (verdict.detail["failed"], verdict.detail["reported"], verdict.detail["by_state"]) == (2, 2, {"timed_out": 2})
    # A commit that arrives after the verdict does not rewrite it.
    fleet.report(["dev-0000"], "committed")
    assert RolloutDevice.objects.get(rollout=rollout, device_id="dev-0000").state == "timed_out"


def test_it_soaks_before_advancing_and_a_failure_during_soak_still_trips(setup):
    fleet = setup["fleet"]
    rollout = start(gates={"soak_seconds": 600, "success": {"min_healthy_percent": 50},
                           "failure": {"min_reports": 2, "max_failed_percent": 50}}, policy="pause")
    fleet.evaluate(rollout)
    fleet.report(["dev-0000"], "committed")
    fleet.evaluate(rollout)
    wave = Wave.objects.get(rollout=rollout, index=0)
    assert wave.state == "soaking"
    assert fleet.evaluate(rollout) == "idle"
    Wave.objects.filter(pk=wave.pk).update(gate_met_at=timezone.now() - timedelta(seconds=601))
    fleet.report(["dev-0001"], "failed", error_code="HASH_MISMATCH")
    assert fleet.evaluate(rollout) == "gate-tripped"
    assert Rollout.objects.get(pk=rollout.pk).state == "paused"


def test_it_caps_directives_per_minute(setup, recorder):
    fleet = setup["fleet"]
    rollout = start(waves=[{"percent": 100}], gates={"rate_per_minute": 7})
    fleet.evaluate(rollout)
    fleet.evaluate(rollout)
    assert Directive.objects.filter(rollout=rollout).count() == 7
    RolloutDevice.objects.filter(rollout=rollout).update(directed_at=timezone.now() - timedelta(seconds=61))
    fleet.evaluate(rollout)
    assert Directive.objects.filter(rollout=rollout).count() == 14


def test_it_applies_each_event_once(setup):
    fleet = setup["fleet"]
    rollout = start()
    fleet.evaluate(rollout)
    ids = fleet.report(["dev-0000"], "failed", error_code="DISK_FULL")
    fleet.evaluate(rollout)
    # A redelivered batch (task retried after a worker died) changes nothing.
    assert rollout_apply_events(event_ids=ids) == set()
    assert RolloutDevice.objects.get(rollout=rollout, device_id="dev-0000").error_code == "DISK_FULL"


def test_it_rolls_back_a_completed_rollout(setup, recorder):
    fleet = setup["fleet"]
    rollout = start(waves=[{"percent": 100}])
    fleet.evaluate(rollout)
    fleet.report(setup["devices"], "committed")
    assert fleet.evaluate(rollout) == "completed"
    with fleet.capture(execute=True):
        rollout_rollback(rollout_id=rollout.pk, actor="token:op", reason="accuracy regression in prod")
    rollout.refresh_from_db()
    assert rollout.state == "rolled_back"
    recorder.wait_for(lambda r: len(r.live()) == 40)
    assert {m["version"] for m in recorder.live() if m["seq"] == 2} == {"1.0"}
    entry = AuditEntry.objects.get(object_type="rollout", object_id=str(rollout.pk), action="rollout.rollback")
    assert entry.reason == "accuracy regression in prod" and entry.detail["revert_directives"] == 20


def test_it_never_directs_a_revoked_device(setup):
    fleet = setup["fleet"]
    rollout = start(waves=[{"percent": 100}])
    Device.objects.filter(pk="dev-0005").update(state="revoked")
    fleet.evaluate(rollout)
    assert not Directive.objects.filter(device_id="dev-0005").exists()
    assert RolloutDevice.objects.get(rollout=rollout, device_id="dev-0005").state == "skipped"


def test_it_publishes_directives_a_dead_worker_committed_but_never_sent(setup, recorder):
    from ota.rollouts.directives import directives_publish_stale

    fleet = setup["fleet"]
    rollout = start()
    # The worker "dies" between commit and publish: the on_commit publish never runs.
    with fleet.capture(execute=False):
        rollout_evaluate(rollout_id=rollout.pk)
    assert Directive.objects.filter(rollout=rollout, published_at__isnull=True).count() == 2
    assert directives_publish_stale(older_than=timedelta(0)) == 2
    recorder.wait_for(lambda r: len(r.live()) == 2)
    assert directives_publish_stale(older_than=timedelta(0)) == 0
    time.sleep(0.5)
    assert len(recorder.live()) == 2
    assert sorted((m["device"], m["seq"]) for m in recorder.live()) == [("dev-0000", 1), ("dev-0001", 1)]


def test_it_catches_up_on_events_whose_wake_up_was_lost(setup):
    fleet = setup["fleet"]
    rollout = start()
    fleet.evaluate(rollout)
    # Stored by ingest, but the task that should have applied them never ran.
    for n, state in enumerate(("received", "trial", "committed"), start=1):
        for device_id in ("dev-0000", "dev-0001"):
            DeviceEvent.objects.create(device_id=device_id, event_no=n, seq=1, model="detector", state=state)
    assert rollout_catch_up_events(rollout_id=rollout.pk) == {rollout.pk}
    assert set(RolloutDevice.objects.filter(rollout=rollout, wave__index=0).values_list("state", flat=True)) == {"committed"}
    assert rollout_catch_up_events(rollout_id=rollout.pk) == set()
    assert fleet.evaluate(rollout) == "dispatched"


def test_it_withdraws_directives_not_yet_picked_up_when_a_rollout_aborts(setup, recorder):
    fleet = setup["fleet"]
    rollout = start(policy="abort")
    fleet.evaluate(rollout)
    fleet.report(["dev-0000"], "failed", error_code="PRECHECK_FAILED")  # dev-0001 is offline: silent
    assert fleet.evaluate(rollout) == "gate-tripped"
    recorder.wait_for(lambda r: any(m["device"] == "dev-0001" and not m["raw"] for m in r.snapshot()),
                      what="the retained directive of the silent device to be cleared")
    cleared = {m["device"] for m in recorder.snapshot() if not m["raw"]}
    assert cleared == {"dev-0001"}  # the device that reported keeps its history


def test_it_wakes_the_engine_only_for_devices_with_an_update_in_progress(setup):
    fleet = setup["fleet"]
    rollout = start()
    fleet.evaluate(rollout)
    ids = fleet.report(["dev-0000"], "downloading")
    idle = DeviceEvent.objects.create(device_id="dev-0010", event_no=1, seq=0, model="detector", state="committed")
    assert events_concern_rollouts(event_ids=ids) is True
    assert events_concern_rollouts(event_ids=[idle.pk]) is False


def test_it_counts_a_commit_with_bad_health_figures_as_a_failure_and_reverts_it(setup, recorder):
    fleet = setup["fleet"]
    rollout = start(gates={"health": {"max_error_rate": 0.02, "max_latency_ms_p95": 50},
                           "failure": {"min_reports": 2, "max_failed_percent": 50}})
    fleet.evaluate(rollout)
    for device_id, figures in (("dev-0000", {"error_rate": 0.01, "latency_ms_p95": 12.0}),
                               ("dev-0001", {"error_rate": 0.09, "latency_ms_p95": 80.0})):
        directive = Directive.objects.get(device_id=device_id, rollout=rollout)
        event = DeviceEvent.objects.create(device_id=device_id, event_no=1, seq=directive.seq, model="detector",
                                           state="committed", health=figures)
        with fleet.capture(execute=True):
            rollout_apply_events(event_ids=[event.pk])
    bad = RolloutDevice.objects.get(rollout=rollout, device_id="dev-0001")
    assert bad.state == "unhealthy" and bad.error_code == "HEALTH_GATE"
    assert bad.detail == "error_rate 0.09 > max_error_rate 0.02; latency_ms_p95 80.0 > max_latency_ms_p95 50"
    assert RolloutDevice.objects.get(rollout=rollout, device_id="dev-0000").state == "committed"
    assert fleet.evaluate(rollout) == "gate-tripped"
    # It runs the new model: the revert sends it (and the healthy canary) back to 1.0.
    recorder.wait_for(lambda r: len(r.live()) == 4)
    assert {m["device"] for m in recorder.live() if m["version"] == "1.0"} == {"dev-0000", "dev-0001"}


def test_it_refuses_health_gate_limits_out_of_range(setup):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError) as info:
        gates_normalise({"health": {"max_error_rate": 1.5}})
    assert info.value.message_dict == {"gates.health.max_error_rate": ["must be between 0 and 1, got 1.5"]}


def test_it_advances_now_past_a_wave_whose_gate_is_not_met(setup):
    fleet = setup["fleet"]
    rollout = start()
    fleet.evaluate(rollout)
    fleet.report(["dev-0000"], "committed")  # 50 % of the canary: short of the 100 % success gate
    assert fleet.evaluate(rollout) == "idle"

    with fleet.capture(execute=True):
        rollout_advance(rollout_id=rollout.pk, actor="token:op")
    assert Wave.objects.get(rollout=rollout, index=0).state == "passed"
    entry = AuditEntry.objects.get(object_type="rollout", object_id=str(rollout.pk), action="wave.pass")
    assert entry.actor == "token:op" and "advanced by token:op before its gates" in entry.reason
    assert (entry.detail["committed"], entry.detail["healthy_percent"]) == (1, 50.0)

    assert fleet.evaluate(rollout) == "dispatched"
    assert Wave.objects.get(rollout=rollout, index=1).state == "running"
    directed = set(Directive.objects.filter(rollout=rollout).values_list("device_id", flat=True))
    assert directed == {"dev-0000", "dev-0001", *members(rollout, 1)}
    # The canary device still in flight keeps going and counts where it belongs.
    fleet.report(["dev-0001"], "committed")
    assert RolloutDevice.objects.get(rollout=rollout, device_id="dev-0001").state == "committed"
    fleet.report(members(rollout, 1), "committed")
    fleet.evaluate(rollout)
    fleet.report(members(rollout, 2), "committed")
    assert fleet.evaluate(rollout) == "completed"
    with pytest.raises(Conflict, match="cannot advance rollout .*: it is completed"):
        rollout_advance(rollout_id=rollout.pk, actor="token:op")


def test_it_lets_a_wave_pass_without_a_device_that_never_picks_up_its_directive(setup, recorder):
    # One offline box used to hold a 100 % success gate forever; now it is unreachable after the
    # delivery timeout: left out of the count, its directive left in place.
    fleet = setup["fleet"]
    rollout = start(waves=[{"devices": ["dev-0000", "dev-0001", "dev-0002"]}, {"percent": 100}],
                    gates={"timeouts": {"delivery_seconds": 60}})
    fleet.evaluate(rollout)
    fleet.report(["dev-0000", "dev-0001"], "committed")
    assert fleet.evaluate(rollout) == "idle"  # dev-0002 silent, still inside the delivery timeout
    RolloutDevice.objects.filter(rollout=rollout, device_id="dev-0002").update(
        directed_at=timezone.now() - timedelta(seconds=61))

    fleet.evaluate(rollout)
    assert Wave.objects.get(rollout=rollout, index=0).state == "passed"
    silent = RolloutDevice.objects.get(rollout=rollout, device_id="dev-0002")
    assert silent.state == "unreachable" and "did not pick up its directive" in silent.detail
    passed = AuditEntry.objects.filter(object_id=str(rollout.pk), action="wave.gate_met").first()
    assert "100.0 % of the 2 reachable devices healthy" in passed.reason
    assert AuditEntry.objects.filter(object_id=str(rollout.pk), action="devices.unreachable").exists()
    # Never withdrawn (an empty retained message): it is still there for when the box returns.
    assert not [m for m in recorder.snapshot() if m["device"] == "dev-0002" and not m["raw"]]
    assert "dev-0002" in recorder.devices()

    # It comes back and installs: its outcome is recorded, after the rollout moved on.
    fleet.report(["dev-0002"], "received")
    fleet.report(["dev-0002"], "committed")
    assert RolloutDevice.objects.get(rollout=rollout, device_id="dev-0002").state == "committed"


def test_it_pauses_a_wave_with_too_few_reachable_devices_saying_why(setup):
    fleet = setup["fleet"]
    rollout = start(waves=[{"devices": ["dev-0000", "dev-0001", "dev-0002", "dev-0003"]}, {"percent": 100}],
                    gates={"timeouts": {"delivery_seconds": 60}, "success": {"min_reachable_percent": 75}})
    fleet.evaluate(rollout)
    fleet.report(["dev-0000"], "committed")
    RolloutDevice.objects.filter(rollout=rollout, device_id__in=["dev-0001", "dev-0002", "dev-0003"]).update(
        directed_at=timezone.now() - timedelta(seconds=61))

    assert fleet.evaluate(rollout) == "paused-unreachable"
    rollout.refresh_from_db()
    assert rollout.state == "paused"
    assert rollout.state_reason.startswith("Wave 1 cannot pass: only 1 of 4 devices reachable (25.0 % < "
                                           "min_reachable_percent 75 %)")


def test_it_never_counts_a_device_revoked_before_its_turn_against_the_gate(setup):
    fleet = setup["fleet"]
    rollout = start(waves=[{"devices": ["dev-0000", "dev-0001", "dev-0002"]}, {"percent": 100}])
    Device.objects.filter(pk="dev-0002").update(state="revoked")  # before its directive went out
    fleet.evaluate(rollout)
    assert RolloutDevice.objects.get(rollout=rollout, device_id="dev-0002").state == "skipped"
    fleet.report(["dev-0000", "dev-0001"], "committed")
    fleet.evaluate(rollout)
    assert Wave.objects.get(rollout=rollout, index=0).state == "passed"
