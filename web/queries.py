"""Read-only queries behind the pages. Nothing here changes state: every write goes through
registry (releases, aliases, tokens, ...) / ota.rollouts / ota.fleet, exactly as the API does."""

from __future__ import annotations

import json

from django.core.exceptions import ValidationError
from django.db.models import Count, Q
from django.utils import timezone

from ota.fleet.parsing import parse_label_filter
from ota.fleet.selectors import devices_filter
from ota.models import Device, DeviceEvent, DeviceModelState, Directive, Rollout, RolloutDevice, Wave
from ota.rollouts.catalogue import RolloutAction
from ota.rollouts.definition import wave_describe
from ota.rollouts.gates import failure_gate_tripped, success_gate_met, wave_figures
from ota.rollouts.planning import rollout_plan
from ota.rollouts.selectors import rollout_summary
from registry.audit import audit_entries_for
from registry.models import Artifact


def parse_labels(text: str) -> list[tuple[str, str | None]]:
    """'site=berlin, camera' -> [('site', 'berlin'), ('camera', None)]. Raises ValueError with
    the offending piece so the form can show it next to the field."""
    return [parse_label_filter(piece) for piece in text.split(",") if piece.strip()]


def fleet_counts() -> dict:
    active = Device.objects.filter(state=Device.State.ACTIVE)
    totals = active.aggregate(total=Count("id"), online=Count("id", filter=Q(online=True)))
    totals["offline"] = totals["total"] - totals["online"]
    totals["revoked"] = Device.objects.filter(state=Device.State.REVOKED).count()
    by_hardware = list(
        active.values("hardware_id")
        .annotate(total=Count("id"), online=Count("id", filter=Q(online=True)))
        .order_by("hardware_id")
    )
    by_version = list(
        DeviceModelState.objects.filter(device__state=Device.State.ACTIVE)
        .values("model__name", "active_version__version")
        .annotate(total=Count("id"))
        .order_by("model__name", "-total")
    )
    return {"totals": totals, "by_hardware": by_hardware, "by_version": by_version}


# --- rollouts --------------------------------------------------------------------------------

# The rollout page shows the model's progress buckets plus "offline", just before "skipped": a
# device still in flight whose box is offline counts as offline, since that is what an operator
# needs to know about it, whatever step it last reported.
PROGRESS_BUCKETS = [
    *(b for b in RolloutDevice.PROGRESS_BUCKETS if b[0] != "skipped"),
    ("offline", "offline", ()),
    *(b for b in RolloutDevice.PROGRESS_BUCKETS if b[0] == "skipped"),
]
# Shown only when some device is in them.
OPTIONAL_BUCKETS = {"reverting", "skipped"}
BUCKET_OF = {state: key for key, _, states in PROGRESS_BUCKETS for state in states}


def empty_counts() -> dict[str, int]:
    return {key: 0 for key, _, _ in PROGRESS_BUCKETS}


def bucket_for(state: str, online: bool) -> str:
    if not online and state not in RolloutDevice.FINISHED and state not in RolloutDevice.WAITING:
        return "offline"
    return BUCKET_OF[state]


def progress_rows(counts: dict[str, int]) -> list[dict]:
    total = sum(counts.values()) or 1
    return [
        {"key": key, "label": label, "count": counts[key], "percent": round(100 * counts[key] / total, 2)}
        for key, label, _ in PROGRESS_BUCKETS
        if counts[key] or key not in OPTIONAL_BUCKETS
    ]


def rollout_counts(rollout_ids) -> dict[int, dict[int, dict[str, int]]]:
    """{rollout_id: {wave_id: {bucket: n}}} in one grouped query."""
    result: dict[int, dict[int, dict[str, int]]] = {}
    rows = (
        RolloutDevice.objects.filter(rollout_id__in=list(rollout_ids))
        .values("rollout_id", "wave_id", "state", "device__online")
        .annotate(n=Count("id"))
        .order_by()
    )
    for row in rows:
        waves = result.setdefault(row["rollout_id"], {})
        counts = waves.setdefault(row["wave_id"], empty_counts())
        counts[bucket_for(row["state"], row["device__online"])] += row["n"]
    return result


def summarise(counts_by_wave: dict[int, dict[str, int]]) -> dict:
    total = empty_counts()
    for counts in counts_by_wave.values():
        for key, n in counts.items():
            total[key] += n
    devices = sum(total.values())
    return {
        "counts": total,
        "rows": progress_rows(total),
        "devices": devices,
        "healthy": total["healthy"],
        "percent": round(100 * total["healthy"] / devices) if devices else 0,
    }


def running_rollouts():
    rollouts = list(
        Rollout.objects.filter(state__in=Rollout.OPEN_STATES)
        .select_related("release", "model")
        .order_by("-created_at")[:20]
    )
    counts = rollout_counts(r.pk for r in rollouts)
    for rollout in rollouts:
        rollout.progress = summarise(counts.get(rollout.pk, {}))
    return rollouts


# --- version page ----------------------------------------------------------------------------


def health_summary(health: dict | None) -> dict | None:
    """The health contract in a few lines: each golden tensor's name, dtype, shape and how many
    values it holds, the tolerances and the latency budget. The values themselves (thousands of
    floats in a real contract) are in the download, never on the page."""
    if not health:
        return None

    def tensors(group: str) -> list[dict]:
        return [
            {
                "name": name,
                "dtype": tensor.get("dtype", "?"),
                "shape": " × ".join(str(d) for d in tensor.get("shape") or []) or "scalar",
                "values": len(tensor.get("data") or []),
            }
            for name, tensor in sorted((health.get(group) or {}).items())
        ]

    return {
        "inputs": tensors("inputs"),
        "outputs": tensors("outputs"),
        "atol": health.get("atol"),
        "rtol": health.get("rtol"),
        "latency_budget_ms": health.get("latency_budget_ms"),
        "bytes": len(health_contract_json(health).encode()),
    }


def health_contract_json(health: dict) -> str:
    """The whole contract as the version page's download serves it."""
    return json.dumps(health, indent=2) + "\n"


def json_rows(data: dict | None, *, limit: int = 40, width: int = 160) -> dict:
    """A JSON object (a version's metadata or metrics) as key/value rows for a <dl>: scalars as
    they are, anything else as compact JSON cut at `width` characters; at most `limit` keys, so
    a large object cannot stretch the page (the API returns it whole)."""
    rows = []
    for key, value in sorted((data or {}).items())[:limit]:
        text = value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))
        rows.append({"key": key, "value": text if len(text) <= width else text[: width - 1] + "…"})
    return {"rows": rows, "more": max(0, len(data or {}) - limit)}


def rollout_failure(rollout) -> str | None:
    """How a rollout failed, for marking it, or None: aborted (by an operator or its failure
    gate), rolled back, or paused with its current wave's failure gate tripped (the engine's
    auto-pause; an operator's pause of a healthy wave is not a failure)."""
    if rollout.state == Rollout.State.ABORTED:
        return "aborted"
    if rollout.state == Rollout.State.ROLLED_BACK:
        return "rolled back"
    if rollout.state == Rollout.State.PAUSED:
        wave = Wave.objects.filter(rollout=rollout, index=rollout.current_wave).first()
        if wave is not None and failure_gate_tripped(wave.gates, wave_figures(wave)):
            return "paused by its failure gate"
    return None


def version_rollouts(version, *, limit: int = 100) -> list:
    """The rollouts of this release, newest first, each with its device counts by state group
    (committed, failed, in flight, waiting: RolloutDevice.group_counts) and `failure`."""
    rollouts = list(Rollout.objects.filter(release=version).order_by("-created_at", "-id")[:limit])
    per_rollout: dict[int, dict[str, int]] = {}
    rows = (
        RolloutDevice.objects.filter(rollout_id__in=[r.pk for r in rollouts])
        .values_list("rollout_id", "state")
        .annotate(n=Count("id"))
        .order_by()
    )
    for rollout_id, state, n in rows:
        per_rollout.setdefault(rollout_id, {})[state] = n
    for rollout in rollouts:
        counts = per_rollout.get(rollout.pk, {})
        rollout.groups = RolloutDevice.group_counts(counts)
        rollout.devices = sum(counts.values())
        rollout.failure = rollout_failure(rollout)
    return rollouts


def version_running_on(version) -> int:
    """Active devices whose last report says they run this version now (DeviceModelState), counted
    with the device list's own filter so the number and the list it links to agree."""
    return devices_filter(
        state=Device.State.ACTIVE, model=version.model.name, version=version.version
    ).count()


# --- device page -----------------------------------------------------------------------------


def device_directives(device):
    return list(
        Directive.objects.filter(device=device)
        .select_related("version", "version__model")
        .only(
            "id", "seq", "kind", "created_at", "published_at", "rollout_id",
            "version__version", "version__model__name",
        )
        .order_by("-id")[:50]
    )


def device_timeline(*, events, history, directives) -> list[dict]:
    items = []
    for d in directives:
        items.append({
            "at": d.published_at or d.created_at,
            "kind": "directive",
            "text": f"{d.kind} directive seq {d.seq}: {d.version.model.name}@{d.version.version}"
            + ("" if d.published_at else " (not yet published)"),
            "rollout_id": d.rollout_id,
        })
    for e in events:
        text = f"{e.model}: {e.state}" + (f" ({e.error_code})" if e.error_code else "")
        if e.detail:
            text += f" — {e.detail[:160]}"
        items.append({
            "at": e.received_at, "kind": "event", "text": text,
            # Devices echo the rollout id as a string; link it only when it is one of ours.
            "rollout_id": int(e.rollout_id) if e.rollout_id.isdigit() else None,
            "state": e.state,
        })
    for h in history:
        label = f"{h.model.name}@{h.version.version}" if h.version else f"{h.model.name} sha {h.sha256[:12]}"
        items.append({"at": h.from_time, "kind": "version", "text": f"started running {label}", "rollout_id": None})
        if h.to_time:
            items.append({"at": h.to_time, "kind": "version", "text": f"stopped running {label}", "rollout_id": None})
    items.sort(key=lambda item: item["at"], reverse=True)
    return items


TELEMETRY_FIGURES = [
    ("cpu_percent", "CPU %", 100),
    ("memory_percent", "Memory %", 100),
    ("disk_percent", "Disk %", 100),
    ("temperature_c", "Temperature °C", 110),
]


def telemetry_figures(device) -> list[dict]:
    data = device.last_telemetry or {}
    figures = []
    for key, label, scale in TELEMETRY_FIGURES:
        value = data.get(key)
        if isinstance(value, (int, float)):
            figures.append({
                "key": key, "label": label, "value": value, "chart_id": f"telemetry-{key}",
                "chart": {
                    "type": "bar",
                    "legend": False,
                    "data": {"labels": [label], "datasets": [{"label": label, "data": [value]}]},
                    "options": {"indexAxis": "y", "scales": {"x": {"min": 0, "max": scale}}},
                },
            })
    return figures


# What the agent's trial health check reports (agent/health.py) plus its precheck timing.
HEALTH_KEYS = ("latency_ms_p95", "error_rate", "precheck_latency_ms")


def health_numbers(health: dict | None) -> dict[str, float]:
    if not isinstance(health, dict):
        return {}
    return {k: v for k, v in health.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def device_health_chart(events) -> dict | None:
    points = [(e.received_at, health_numbers(e.health)) for e in reversed(events) if health_numbers(e.health)]
    if not points:
        return None
    keys = [k for k in HEALTH_KEYS if any(k in h for _, h in points)]
    return {
        "type": "line",
        "data": {
            "labels": [at.strftime("%H:%M:%S") for at, _ in points],
            "datasets": [{"label": k, "data": [h.get(k) for _, h in points]} for k in keys],
        },
    }


# --- wizard ----------------------------------------------------------------------------------


def target_preview(form) -> dict:
    """Per hardware: how many active devices the target matches and how many of them the release
    has no artifact for; with a wave plan, each wave's size. The plan is ota.rollouts.planning's
    rollout_plan, the one rollout_create runs."""
    data = getattr(form, "cleaned_data", {})
    # A release not chosen yet is not an error here, just a reason to wait.
    wanted = (*form.TARGET_FIELDS, "release") if form.data.get("release") else form.TARGET_FIELDS
    errors = {k: v for k, v in form.errors.items() if k in wanted}
    release = form.release_obj if "release" in data else None
    result: dict = {"errors": [str(e) for v in errors.values() for e in v], "rows": [], "ready": False}
    if errors:
        return result
    if not any(data.get(f) for f in form.TARGET_FIELDS):
        result["hint"] = "Choose labels, hardware or devices to see how many devices match."
        return result
    if release is None:
        result["hint"] = "Pick a released version to see which devices can take it."
        return result
    waves = data.get("waves") or None
    try:
        plan = rollout_plan(release=release, target=form.target_spec(), waves=waves)
    except ValidationError as exc:
        wave_errors = {k: v for k, v in exc.message_dict.items() if k.startswith("waves")}
        if waves is None or len(wave_errors) < len(exc.message_dict):
            result["errors"] = [m for msgs in exc.message_dict.values() for m in msgs]
            return result
        # The target is fine and only the wave plan is not: show the target's figures anyway.
        result["wave_errors"] = [m for msgs in wave_errors.values() for m in msgs]
        waves = None
        plan = rollout_plan(release=release, target=form.target_spec())
    resolved = plan.resolved
    per_hw: dict[str, dict] = {}
    for _, hw in resolved.targeted:
        per_hw.setdefault(hw, {"hardware": hw, "matched": 0, "incompatible": 0})["matched"] += 1
    for item in resolved.incompatible:
        per_hw[item["hardware"]]["incompatible"] += 1
    result.update(
        ready=True,
        rows=sorted(per_hw.values(), key=lambda r: r["hardware"]),
        matched=len(resolved.targeted),
        incompatible=len(resolved.incompatible),
        compatible=len(resolved.compatible),
        busy=plan.busy,
        busy_rollouts=sorted(plan.conflicts),
    )
    if waves is not None:
        result["waves"] = [{"spec": wave_describe(s), "size": n} for s, n in zip(plan.waves, plan.sizes)]
    return result


def rollout_dry_run(form) -> dict:
    """The review page: everything rollout_create checks (rollout_plan), without creating.
    Raises django's ValidationError like the create does."""
    plan = rollout_plan(
        release=form.release_obj, target=form.target_spec(), waves=form.cleaned_data["waves"], gates=form.gates_spec()
    )
    resolved = plan.resolved
    return {
        "release": plan.release,
        "target": plan.target,
        "gates": plan.gates,
        "waves": [{"label": wave_describe(s), "size": n} for s, n in zip(plan.waves, plan.sizes)],
        "matched": len(resolved.targeted),
        "compatible": len(resolved.compatible),
        "incompatible": resolved.incompatible,
        "planned": sum(plan.sizes),
        "busy": plan.busy,
        "busy_rollouts": sorted(plan.conflicts),
    }


# --- rollout page ----------------------------------------------------------------------------

def confirm_text(rollout, action: RolloutAction, live: dict) -> str:
    """The catalogue's confirmation for `action`, filled in with this rollout's figures."""
    current = live["current_wave"]
    wave = (
        f"wave {current['number']} ({current['name'] or 'unnamed'}, {current['size']} devices)"
        if current else "the current wave"
    )
    return action.confirm.format(
        rollout=rollout.pk,
        release=f"{rollout.model.name}@{rollout.release.version}",
        devices=live["overall"]["devices"],
        waves=len(live["waves"]),
        wave=wave,
        Wave=wave[0].upper() + wave[1:],
        failed=live["progress"]["failed"],
    )


def rollout_live(rollout) -> dict:

    summary = rollout_summary(rollout)
    counts = rollout_counts([rollout.pk]).get(rollout.pk, {})
    waves_by_index = {w.index: w for w in Wave.objects.filter(rollout=rollout)}
    now = timezone.now()
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
        "health": rollout_health(rollout),
        "audit": list(
            audit_entries_for(rollout)[:40]
        ),
        "polling": rollout.state in ("created", "running", "paused")
        or RolloutDevice.objects.filter(rollout=rollout, state="reverting").exists(),
        "finished": rollout.state == "completed" and overall["percent"] == 100,
    }


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def rollout_health(rollout) -> dict:
    """Median health figures devices report (latency p95, error rate), new release next to the
    old. Which release a device runs is what ingest last recorded for it (DeviceModelState);
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
