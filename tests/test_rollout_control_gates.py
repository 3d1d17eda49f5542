"""Control-group gates on model behaviour (ota/rollouts/comparison.py): small samples do not trip
on noise, real regressions trip, and every verdict carries its figures."""

from __future__ import annotations

import random

from agent.metrics.aggregate import Window
from ota.rollouts.comparison import DeviceFigures, compare_groups, psi, settings_with_defaults

SETTINGS = settings_with_defaults(None)


def device(rng: random.Random, name: str, *, latency_ms=20.0, error_rate=0.01, slower=1.0, labels=None,
           requests=150, score=None) -> DeviceFigures:
    """One box's hour: its own speed (boxes differ by ~10 %) and error rate (~30 % apart)."""
    w = Window()
    speed = rng.lognormvariate(0, 0.1) * slower
    box_errors = max(0.0, rng.gauss(error_rate, error_rate * 0.3))
    shares = labels or {"person": 0.5, "car": 0.5}
    for _ in range(requests):
        w.add("latency_ms", rng.lognormvariate(0, 0.2) * latency_ms * speed, "timing")
        w.add("requests", 1, "counter")
        if rng.random() < box_errors:
            w.add("errors", 1, "counter")
        w.add("output." + rng.choices(list(shares), weights=list(shares.values()))[0], 1, "counter")
        if score is not None:  # a numeric output: the model's confidence, say
            w.add("output.score", min(1.0, max(0.0, rng.gauss(score, 0.08))), "timing")
    j = w.to_json()
    return DeviceFigures(name, j["requests"], j["errors"], j["latency_ms"], j["outputs"], j["output_values"])


def groups(seed, n_new, *, n_control=20, **new_behaviour):
    rng = random.Random(seed)
    control = [device(rng, f"c{i}") for i in range(n_control)]
    new = [device(rng, f"n{i}", **new_behaviour) for i in range(n_new)]
    return new, control


def test_it_does_not_trip_on_noise_with_a_three_device_canary():
    verdicts = [compare_groups(*groups(seed, 3), SETTINGS) for seed in range(60)]
    assert {v.state for v in verdicts} <= {"pass", "fail"}
    false_trips = [v.summary for v in verdicts if v.state == "fail"]
    # Each test must clear an effect size too (a ratio, a margin, a PSI): a few percent at most.
    assert len(false_trips) <= 2, false_trips


def test_it_trips_on_a_real_regression_at_thirty_devices():
    for seed in range(10):
        slow = compare_groups(*groups(seed, 30, slower=1.4), SETTINGS)
        assert slow.state == "fail" and "latency" in slow.summary, slow.figures
        failing = compare_groups(*groups(seed, 30, error_rate=0.05), SETTINGS)
        assert failing.state == "fail" and "error rate" in failing.summary, failing.figures
        drift = compare_groups(*groups(seed, 30, labels={"person": 0.8, "car": 0.2}), SETTINGS)
        assert drift.state == "fail" and "drifted" in drift.summary, drift.figures


def test_it_stops_a_forty_percent_slower_canary_of_three():
    trips = sum(compare_groups(*groups(seed, 3, slower=1.4), SETTINGS).state == "fail" for seed in range(20))
    assert trips >= 17, trips


def test_it_passes_an_equally_good_release_at_thirty_devices():
    verdicts = [compare_groups(*groups(seed, 30), SETTINGS) for seed in range(10)]
    assert sum(v.state == "pass" for v in verdicts) >= 9, [v.summary for v in verdicts]


def test_it_waits_for_samples_and_names_what_is_missing():
    new, control = groups(1, 2)
    verdict = compare_groups(new, control, SETTINGS)
    assert verdict.state == "wait"
    assert "2 devices on the new release and 20 in the control group" in verdict.summary
    few = [DeviceFigures("x", 50, 0)] * 5
    assert compare_groups(few, control, SETTINGS).state == "wait"  # under min_requests each


def test_it_reports_the_figures_behind_a_verdict():
    verdict = compare_groups(*groups(3, 30, slower=1.4), SETTINGS)
    latency = verdict.figures["latency"]
    assert latency["p50"]["ratio"] > 1.2 and latency["p50"]["max_ratio"] == 1.2 and latency["p_value"] < 0.05
    assert verdict.figures["new_devices"] == 30 and verdict.figures["control_devices"] == 20
    assert set(verdict.figures["errors"]) == {"new", "control", "difference", "max_increase", "t_statistic", "p_value"}
    assert latency["t_statistic"] > 2


def test_it_switches_gates_off_one_by_one():
    new, control = groups(4, 30, slower=1.4, labels={"person": 0.9, "car": 0.1})
    assert compare_groups(new, control, settings_with_defaults({"latency": False, "drift": False})).state == "pass"
    assert settings_with_defaults(False) is None
    custom = settings_with_defaults({"latency": {"max_p50_ratio": 2.0, "max_p95_ratio": 2.0}, "drift": False})
    assert compare_groups(new, control, custom).state == "pass"


def test_it_measures_drift_of_a_numeric_output_against_the_controls_deciles():
    rng = random.Random(6)
    control = [device(rng, f"c{i}", score=0.8) for i in range(20)]
    same = [device(rng, f"n{i}", score=0.8) for i in range(10)]
    lower = [device(rng, f"n{i}", score=0.6) for i in range(10)]
    assert compare_groups(same, control, SETTINGS).state == "pass"
    verdict = compare_groups(lower, control, SETTINGS)
    assert verdict.state == "fail" and "output score drifted" in verdict.summary
    score = verdict.figures["drift"]["values"]["score"]
    assert score["psi"] > 0.2 and score["new_p50"] < score["control_p50"]


def test_it_keeps_verdicts_storable_when_groups_have_no_spread():
    """Per-device p50s are sketch buckets: identical boxes give identical values, an infinite t."""
    import json as _json

    same = {"bins": {"300": 100}, "zero": 0, "count": 100, "sum": 2000.0, "min": 19.0, "max": 21.0}
    slow = {"bins": {"340": 100}, "zero": 0, "count": 100, "sum": 2800.0, "min": 27.0, "max": 29.0}
    control = [DeviceFigures(f"c{i}", 100, 1, same, {}) for i in range(5)]
    new = [DeviceFigures(f"n{i}", 100, 1, slow, {}) for i in range(3)]
    verdict = compare_groups(new, control, SETTINGS)
    assert verdict.state == "fail"
    _json.dumps(verdict.figures, allow_nan=False)  # what PostgreSQL's jsonb accepts (no Infinity)


def test_it_measures_drift_as_population_stability():
    assert psi({"a": 50, "b": 50}, {"a": 50, "b": 50}) == 0
    assert round(psi({"a": 80, "b": 20}, {"a": 50, "b": 50}), 3) == 0.416
    assert psi({"a": 100}, {"b": 100}) > 10  # disjoint outputs: as far apart as it gets


# --- the engine, on figures ingest stored from real telemetry payloads ----------------------------

import json  # noqa: E402
from datetime import timedelta  # noqa: E402

import pytest  # noqa: E402
from django.utils import timezone  # noqa: E402

from agent.protocol import format_time, utcnow  # noqa: E402
from ota.models import DeviceEvent, DeviceModelState, Directive, ModelMetricsHour, Rollout, Wave  # noqa: E402
from ota.rollouts.actions import rollout_start  # noqa: E402
from ota.rollouts.create import rollout_create  # noqa: E402
from ota.rollouts.engine import rollout_evaluate  # noqa: E402
from ota.rollouts.events import rollout_apply_events  # noqa: E402
from ota.transport.ingest import Ingestor, Message  # noqa: E402
from registry.models import AuditEntry, ModelVersion  # noqa: E402
from tests.support.rollout_data import make_devices, release  # noqa: E402

CANARY = ["dev-0000", "dev-0001", "dev-0002"]


@pytest.fixture
def fleet(client, admin_token, secure_broker, django_capture_on_commit_callbacks):
    release(client, admin_token, "detector", "1.0")
    release(client, admin_token, "detector", "2.0", scale=3.0, bias=0.5)
    devices = make_devices(20, labels={"site": "berlin"})
    v1 = ModelVersion.objects.get(version="1.0")
    DeviceModelState.objects.bulk_create([
        DeviceModelState(device_id=d, model=v1.model, active_version=v1, active_sha256=v1.artifacts.get().sha256)
        for d in devices])
    return {"devices": devices, "capture": django_capture_on_commit_callbacks,
            "v1": v1.artifacts.get().sha256, "v2": ModelVersion.objects.get(version="2.0").artifacts.get().sha256}


def send_telemetry(device_windows: dict[str, tuple[str, DeviceFigures]]):
    """What each agent's telemetry would carry, through ingest as it arrives from the broker."""
    messages = []
    for device_id, (sha, figures) in device_windows.items():
        entry = {"model": "detector", "release": sha, "requests": figures.requests, "errors": figures.errors,
                 "latency_ms": figures.latency_ms, "outputs": figures.outputs, "output_values": {}}
        payload = {"_type": "telemetry", "device_id": device_id, "ts": format_time(utcnow()),
                   "model_metrics": {"window_start": format_time(utcnow()), "window_end": format_time(utcnow()),
                                     "models": [entry], "stats": {}}}
        messages.append(Message(topic=f"fleet/devices/{device_id}/telemetry", payload=json.dumps(payload).encode()))
    Ingestor().process(messages)


def start_and_commit_canary(fleet, control=None, policy="revert"):
    rollout = rollout_create(
        model="detector", version="2.0", target={"labels": {"site": "berlin"}},
        waves=[{"devices": CANARY}, {"percent": 100}],
        gates={"failure": {"min_reports": 1, "max_failed_percent": 50},
               "health": {"control": control or {"min_requests": 100}}},
        abort_policy=policy, actor="token:test",
    )
    rollout_start(rollout_id=rollout.pk, actor="token:test")
    with fleet["capture"](execute=True):
        rollout_evaluate(rollout_id=rollout.pk)
    events = []
    for device_id in CANARY:
        seq = Directive.objects.filter(device_id=device_id).order_by("-seq").first().seq
        events.append(DeviceEvent.objects.create(device_id=device_id, event_no=1, seq=seq, model="detector",
                                                 state="committed", rollout_id=str(rollout.pk)).pk)
    with fleet["capture"](execute=True):
        rollout_apply_events(event_ids=events)
    return rollout


def evaluate(fleet, rollout):
    with fleet["capture"](execute=True):
        return rollout_evaluate(rollout_id=rollout.pk)


def report_hour(fleet, *, slower=1.0, seed=5):
    rng = random.Random(seed)
    windows = {d: (fleet["v1"], device(rng, d)) for d in fleet["devices"] if d not in CANARY}
    windows.update({d: (fleet["v2"], device(rng, d, slower=slower)) for d in CANARY})
    send_telemetry(windows)


@pytest.mark.django_db
def test_it_reverts_a_slower_release_at_the_canary_against_its_control_group(fleet):
    rollout = start_and_commit_canary(fleet)
    report_hour(fleet, slower=1.4)
    assert ModelMetricsHour.objects.filter(release_sha256=fleet["v2"]).count() == 3
    assert evaluate(fleet, rollout) == "gate-tripped"
    rollout.refresh_from_db()
    assert rollout.state == "aborted" and rollout.reverted_at is not None
    assert "tripped its control-group gate: latency p50" in rollout.state_reason
    entry = AuditEntry.objects.get(object_type="rollout", object_id=str(rollout.pk), action="rollout.auto_revert")
    gate = entry.detail["control_gate"]
    assert gate["new_devices"] == 3 and gate["control_devices"] == 17
    assert gate["latency"]["p50"]["ratio"] > 1.2 and gate["latency"]["p_value"] < 0.05
    assert Wave.objects.get(rollout=rollout, index=1).state != "running"


@pytest.mark.django_db
def test_it_passes_an_equally_good_release_and_logs_the_comparison(fleet):
    rollout = start_and_commit_canary(fleet)
    report_hour(fleet)
    assert evaluate(fleet, rollout) in ("advanced", "dispatched")
    rollout.refresh_from_db()
    assert rollout.state == "running" and rollout.current_wave == 1
    entry = AuditEntry.objects.get(object_type="rollout", object_id=str(rollout.pk), action="wave.control_gate")
    assert entry.detail["verdict"] == "pass" and entry.detail["control_devices"] == 17
    assert entry.detail["errors"]["p_value"] >= 0.05


@pytest.mark.django_db
def test_it_waits_for_the_new_release_figures_then_fails_after_wait_seconds(fleet):
    rng = random.Random(9)
    # The canary's apps reported on 1.0 before the rollout: they are expected to report on 2.0.
    send_telemetry({d: (fleet["v1"], device(rng, d)) for d in fleet["devices"]})
    rollout = start_and_commit_canary(fleet, control={"min_requests": 100, "wait_seconds": 60}, policy="pause")
    assert evaluate(fleet, rollout) == "waiting-for-figures"
    Wave.objects.filter(rollout=rollout, index=0).update(started_at=timezone.now() - timedelta(seconds=61))
    assert evaluate(fleet, rollout) == "gate-tripped"
    rollout.refresh_from_db()
    assert rollout.state == "paused" and "had too few figures after 60 s" in rollout.state_reason


@pytest.mark.django_db
def test_it_leaves_fleets_without_app_metrics_alone(fleet):
    rollout = start_and_commit_canary(fleet)
    assert evaluate(fleet, rollout) in ("advanced", "dispatched")
    assert not AuditEntry.objects.filter(action="wave.control_gate").exists()
    # Why it did not judge stays on record with the wave's pass.
    passed = AuditEntry.objects.get(object_type="rollout", object_id=str(rollout.pk), action="wave.pass")
    assert passed.detail["control_gate"] == "the wave's devices report no model metrics"
    assert "(control-group gate: the wave's devices report no model metrics)" in passed.reason
    rollout.refresh_from_db()
    assert rollout.state == Rollout.State.RUNNING and rollout.current_wave == 1


@pytest.mark.django_db
def test_it_merges_a_devices_windows_into_its_hour_and_refuses_forged_metrics(fleet):
    from ota.models import Device

    rng = random.Random(2)
    first, second = device(rng, "dev-0005"), device(rng, "dev-0005")
    send_telemetry({"dev-0005": (fleet["v1"], first)})
    send_telemetry({"dev-0005": (fleet["v1"], second)})
    row = ModelMetricsHour.objects.get(device_id="dev-0005")
    assert row.windows == 2 and row.requests == first.requests + second.requests
    assert row.latency_ms["count"] == first.latency_ms["count"] + second.latency_ms["count"]
    # The device row keeps readable summaries, not the sketches.
    assert "latency_ms" not in Device.objects.get(pk="dev-0005").last_telemetry["model_metrics"]["models"][0]

    forged = {"model": "detector", "release": fleet["v1"], "requests": 1,
              "latency_ms": {"bins": {str(i): 1 for i in range(5000)}}}
    payload = {"_type": "telemetry", "device_id": "dev-0006", "model_metrics": {"models": [forged]}}
    Ingestor().process([Message(topic="fleet/devices/dev-0006/telemetry", payload=json.dumps(payload).encode())])
    negative = {**forged, "latency_ms": {}, "requests": -5}
    payload["model_metrics"]["models"] = [negative]
    Ingestor().process([Message(topic="fleet/devices/dev-0006/telemetry", payload=json.dumps(payload).encode())])
    assert not ModelMetricsHour.objects.filter(device_id="dev-0006").exists()
