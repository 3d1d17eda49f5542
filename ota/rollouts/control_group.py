"""A wave's two groups for the control-group gates, read from what the apps reported
(ModelMetricsHour), and the verdict on them (ota/rollouts/comparison.py).

  new      the wave's committed devices, on the release's artifact for their hardware
  control  comparable devices still on another release of the same model, over the same hours
           (their figures for the release they run now): not in this wave, on a hardware target
           of the new group, sharing a label with it (key and value; unlabelled boxes compare
           with unlabelled boxes)

Both are read from the hour the wave started in onwards: hourly rows make "the same time window"
exact to the hour, which is what keeps 10,000 devices to a few rows each."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta

from django.utils import timezone

from ota.models import DeviceModelState, ModelMetricsHour, Rollout, RolloutDevice, Wave
from ota.rollouts.comparison import Verdict, compare_groups, settings_with_defaults, window_of
from registry.audit import SYSTEM, audit_record
from registry.models import Artifact

RD = RolloutDevice.State
# A wave's devices whose apps reported model metrics within this many hours before it started
# are expected to report on the new release too: the gate waits for them rather than passing.
REPORTING_LOOKBACK_HOURS = 24


def control_settings(gates: dict) -> dict | None:
    """gates.health.control with its defaults; None when the rollout switched it off."""
    return settings_with_defaults(((gates or {}).get("health") or {}).get("control"))


def wave_control_verdict(rollout: Rollout, wave: Wave) -> Verdict | None:
    """The control-group verdict for `wave`: None when switched off, state "off" when the wave's
    devices report no model metrics (the gate is on only where apps report) or no comparable
    device reports on another release."""
    settings = control_settings(wave.gates)
    if settings is None or wave.started_at is None:
        return None
    since = wave.started_at.replace(minute=0, second=0, microsecond=0)
    model = rollout.model.name
    target_shas = set(Artifact.objects.filter(version_id=rollout.release_id).values_list("sha256", flat=True))
    in_wave = dict(RolloutDevice.objects.filter(wave=wave).values_list("device_id", "state"))
    committed = {d for d, state in in_wave.items() if state == RD.COMMITTED}
    # A control device counts with the release it runs now: a box that moved to the new release
    # (in an earlier wave, or by hand) has older rows of the old one in these hours.
    running = dict(DeviceModelState.objects.filter(model_id=rollout.model_id).values_list("device_id", "active_sha256"))
    rows = ModelMetricsHour.objects.filter(model=model, hour__gte=since).values_list(
        "device_id", "release_sha256", "requests", "errors", "latency_ms", "outputs", "output_values",
        "device__hardware_id", "device__labels",
    )
    new_windows: dict[str, list[dict]] = defaultdict(list)
    control_windows: dict[str, list[dict]] = defaultdict(list)
    profile: dict[str, tuple] = {}
    for device_id, sha, requests, errors, latency, outputs, values, hardware_id, labels in rows.iterator(
            chunk_size=2000):
        window = {"requests": requests, "errors": errors, "latency_ms": latency, "outputs": outputs,
                  "output_values": values}
        if sha in target_shas:
            if device_id in committed:
                new_windows[device_id].append(window)
        elif device_id not in in_wave and running.get(device_id) == sha:
            control_windows[device_id].append(window)
        profile[device_id] = (hardware_id, labels or {})
    if not new_windows:
        # Telemetry trails a commit by up to its interval: devices whose apps reported on their
        # previous release lately will report on this one, so wait for them.
        if ModelMetricsHour.objects.filter(model=model, device_id__in=list(in_wave),
                                           hour__gte=since - timedelta(hours=REPORTING_LOOKBACK_HOURS)).exists():
            return Verdict("wait", ["the wave's devices report model metrics, none yet on the new release"],
                           {"new_devices": 0})
        return Verdict("off", ["the wave's devices report no model metrics"], {})
    hardware = {profile[d][0] for d in new_windows}
    pairs = {(k, v) for d in new_windows for k, v in profile[d][1].items()}
    unlabelled = any(not profile[d][1] for d in new_windows)

    def comparable(device_id: str) -> bool:
        hw, labels = profile[device_id]
        if hw not in hardware:
            return False
        return bool(pairs & set(labels.items())) or (unlabelled and not labels)

    new = [window_of(d, w) for d, w in new_windows.items()]
    control = [window_of(d, w) for d, w in control_windows.items() if comparable(d)]
    if not control:
        return Verdict("off", ["no comparable device on another release reports model metrics"],
                       {"new_devices": len(new)})
    verdict = compare_groups(new, control, settings)
    verdict.figures["since"] = since.isoformat()
    return verdict


def waited_too_long(wave: Wave, settings: dict) -> bool:
    return wave.started_at is not None and (timezone.now() - wave.started_at).total_seconds() > settings["wait_seconds"]




def wave_control_check(rollout: Rollout, wave: Wave) -> tuple[str, str, dict]:
    """The control-group gate at the end of a wave's soak: ("pass" | "wait" | "fail", why,
    figures). A comparison that passed is written to the audit log here; a failing one is the
    engine's to act on (and log) by the rollout's policy. Waiting for samples longer than
    wait_seconds from the wave's start is a failure: a gate that never decides must not hold a
    rollout forever, nor wave it through."""
    settings = control_settings(wave.gates)
    verdict = wave_control_verdict(rollout, wave)
    if verdict is None or verdict.state == "off":
        return "pass", verdict.summary if verdict else "switched off", verdict.figures if verdict else {}
    if verdict.state == "pass":
        audit_record(
            actor=SYSTEM, action="wave.control_gate", obj=rollout,
            reason=f"Wave {wave.number} passed its control-group gate: {verdict.summary}.",
            detail={"wave": wave.index, "verdict": "pass", **verdict.figures},
        )
        return "pass", verdict.summary, verdict.figures
    if verdict.state == "fail":
        return "fail", f"its control-group gate: {verdict.summary}", {"control_gate": verdict.figures}
    if waited_too_long(wave, settings):
        return ("fail", f"its control-group gate had too few figures after {settings['wait_seconds']} s: "
                f"{verdict.summary}", {"control_gate": verdict.figures})
    return "wait", verdict.summary, verdict.figures
