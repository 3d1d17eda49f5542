"""Read-only queries behind a rollout's page: each wave's progress and gates (its control-group
comparison from web.rollouts.model_health), the failures by error code, the page's model health
card, the audit trail, and the catalogue's confirmations filled in with this rollout's figures."""

from __future__ import annotations

from django.utils import timezone

from ota.models import Device, DeviceEvent, RolloutDevice, Wave
from ota.rollouts.catalogue import RolloutAction
from ota.rollouts.gates import failure_gate_tripped, success_gate_met, wave_figures
from ota.rollouts.selectors import rollout_summary
from registry.audit import audit_entries_for
from registry.models import Artifact
from web.devices.queries import health_numbers
from web.rollouts.model_health import rollout_model_health
from web.rollouts.progress import empty_counts, progress_rows, rollout_counts, summarise


def confirm_text(rollout, action: RolloutAction, live: dict) -> str:
    """The catalogue's confirmation for `action`, filled in with this rollout's figures."""
    current = live["current_wave"]
    wave = (
        f"wave {current['number']} ({current['name'] or 'unnamed'}, {current['size']} devices)"
        if current else "the current wave"
    )
    text = action.confirm.format(
        rollout=rollout.pk,
        release=f"{rollout.model.name}@{rollout.release.version}",
        devices=live["overall"]["devices"],
        waves=len(live["waves"]),
        wave=wave,
        Wave=wave[0].upper() + wave[1:],
        failed=live["progress"]["failed"],
    )
    if action.name == "start" and rollout.start_at and rollout.start_at > timezone.now():
        text += f" It is scheduled: nothing is sent before {rollout.start_at:%Y-%m-%d %H:%M:%S} UTC."
    return text


def rollout_live(rollout) -> dict:

    summary = rollout_summary(rollout)
    counts = rollout_counts([rollout.pk]).get(rollout.pk, {})
    waves_by_index = {w.index: w for w in Wave.objects.filter(rollout=rollout)}
    now = timezone.now()
    control = rollout_model_health(rollout, waves_by_index.values())
    waves = []
    for item in summary["waves"]:
        wave = waves_by_index[item["index"]]
        wave_counts = counts.get(wave.pk, empty_counts())
        figures = wave_figures(wave) if wave.state != "pending" else None
        gates = wave.gates
        soak_left = None
        if wave.gate_met_at and wave.state == "soaking":
            soak_left = max(0, int(gates["soak_seconds"] - (now - wave.gate_met_at).total_seconds()))
        failure = gates["failure"]
        gate_rows = []
        if figures:
            gate_rows = [
                {
                    "name": "Success",
                    "figure": f"{figures['healthy_percent']} % healthy ({figures['committed']} of {figures['size']})",
                    "threshold": f"passes at ≥ {gates['success']['min_healthy_percent']} %",
                    "ok": success_gate_met(gates, figures),
                },
                {
                    "name": "Failure",
                    "figure": f"{figures['failed']} failed of {figures['reported']} reports ({figures['failed_percent']} %)",
                    "threshold": f"trips at ≥ {failure['max_failed_percent']} % once ≥ {failure['min_reports']} reported"
                    + (f", or at {failure['max_failures']} failures" if failure.get("max_failures") else ""),
                    "ok": failure_gate_tripped(gates, figures) is None,
                },
            ]
        waves.append({
            **item,
            "number": item["number"],
            "rows": progress_rows(wave_counts),
            "bucket_counts": wave_counts,
            "gate_rows": gate_rows,
            "soak_left": soak_left,
            "control": control.get(wave.index),
            "is_current": item["index"] == rollout.current_wave and rollout.state in ("running", "paused", "created"),
        })
    overall = summarise(counts)
    failures: dict[str, list[str]] = {}
    failure_rows = (
        RolloutDevice.objects.filter(rollout=rollout, state__in=RolloutDevice.PROBLEMS)
        .order_by("error_code", "device_id")
        .values_list("error_code", "device_id", "state")
    )
    for code, device_id, state in failure_rows[:2000]:
        failures.setdefault(code or state.upper(), []).append(device_id)
    failure_groups = [
        {"code": code, "count": len(ids), "devices": ids[:40], "more": max(0, len(ids) - 40)}
        for code, ids in sorted(failures.items(), key=lambda kv: -len(kv[1]))
    ]
    current = next((w for w in waves if w["index"] == rollout.current_wave), None)
    return {
        "waves": waves,
        "progress": summary["progress"],
        "overall": overall,
        "current_wave": current,
        "failures": failure_groups,
        "health": health_panel(rollout, waves, current),
        "audit": list(
            audit_entries_for(rollout)[:40]
        ),
        "polling": rollout.state in ("created", "running", "paused")
        or RolloutDevice.objects.filter(rollout=rollout, state="reverting").exists(),
        "finished": rollout.state == "completed" and overall["percent"] == 100,
    }


def health_panel(rollout, waves: list[dict], current: dict | None) -> dict:
    """The page's one new-vs-previous comparison. Where a control-group verdict exists (judged or
    live), its figures for the current wave, else the latest wave that has some; only where no wave
    has any (the apps report no model metrics) the trial health devices report, as a display."""
    compared = [w for w in waves if w["control"] and w["control"].get("rows")]
    if compared:
        featured = next((w for w in compared if w is current), compared[-1])
        return {"control": featured["control"], "wave": featured}
    return {"control": None, **rollout_health(rollout)}


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def rollout_health(rollout) -> dict:
    """Shown only where no wave has a control-group comparison (see health_panel). Median health
    figures devices report (latency p95, error rate), new release next to the old. Which release
    a device runs is what ingest last recorded for it (DeviceModelState);
    its telemetry's health counts only when that telemetry is about the same sha, else a device
    on the new release counts with the health its committed event carried. The old side is this
    rollout's devices not yet updated; once every one is, devices of the same model outside the
    rollout (still on an older release) stand in for it."""

    new_shas = set(Artifact.objects.filter(version=rollout.release).values_list("sha256", flat=True))
    model = rollout.model.name
    groups: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    committed_health = dict(
        DeviceEvent.objects.filter(rollout_id=str(rollout.pk), state="committed", sha256__in=new_shas)
        .exclude(health__isnull=True)
        .order_by("device_id", "event_no")
        .values_list("device_id", "health")[:5000]
    )

    def collect(rows, sides):
        for device_id, current_sha, telemetry in rows:
            if not current_sha:
                continue
            side = "new" if current_sha in new_shas else "old"
            if side not in sides:
                continue
            telemetry = telemetry or {}
            about = (telemetry.get("active") or {}).get(model)
            numbers = health_numbers(telemetry.get("health")) if about == current_sha else {}
            if not numbers and side == "new":
                numbers = health_numbers(committed_health.get(device_id))
            for key, value in numbers.items():
                groups[side].setdefault(key, []).append(value)

    fields = ("id", "model_states__active_sha256", "last_telemetry")
    in_rollout = Device.objects.filter(rollout_assignments__rollout=rollout, model_states__model=rollout.model)
    collect(in_rollout.values_list(*fields)[:5000], ("old", "new"))
    old_source = "devices of this rollout not yet updated"
    if not groups["old"]:
        others = (
            Device.objects.filter(model_states__model=rollout.model, last_telemetry_at__isnull=False)
            .exclude(rollout_assignments__rollout=rollout)
            .values_list(*fields)[:2000]
        )
        collect(others, ("old",))
        old_source = "devices of this model outside the rollout"
    metrics = [
        ("latency_ms_p95", "latency p95 (ms)"),
        ("error_rate", "error rate"),
    ]
    charts = []
    for key, label in metrics:
        old, new = _median(groups["old"].get(key, [])), _median(groups["new"].get(key, []))
        if old is None and new is None:
            continue
        charts.append({
            "key": key,
            "label": label,
            "old": old,
            "new": new,
            "old_n": len(groups["old"].get(key, [])),
            "new_n": len(groups["new"].get(key, [])),
            "chart": {
                "type": "bar",
                "legend": False,
                "data": {
                    "labels": ["previous release", f"{rollout.release.version} (new)"],
                    "datasets": [{"label": label, "data": [old, new], "backgroundColor": ["#a0aec0", "#2457c5"]}],
                },
                "options": {"scales": {"y": {"beginAtZero": True}}},
            },
            "chart_id": f"health-{key}",
        })
    return {"charts": charts, "old_source": old_source}


def window_waiters(rollout, *, limit: int = 40) -> list[dict]:
    """Devices downloaded and waiting for their maintenance window, soonest opening first: the
    device and the opening it reported (its own clock)."""
    rows = (RolloutDevice.objects.filter(rollout=rollout, state=RolloutDevice.State.WAITING_FOR_WINDOW)
            .order_by("window_opens_at", "rank").values("device_id", "window_opens_at")[:limit])
    return [{"device": r["device_id"], "opens_at": r["window_opens_at"]} for r in rows]
