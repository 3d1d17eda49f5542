"""Read-only queries behind the pages. Nothing here changes state: every write goes through
registry.actions / ota.actions / ota.devices, exactly as the API does."""

from __future__ import annotations

from django.db import connection
from django.db.models import Count, Exists, OuterRef, Prefetch, Q

from ota.models import Device, DeviceModelState


def parse_labels(text: str) -> list[tuple[str, str | None]]:
    """'site=berlin, camera' -> [('site', 'berlin'), ('camera', None)]. Raises ValueError with
    the offending piece so the form can show it next to the field."""
    pairs: list[tuple[str, str | None]] = []
    for raw in text.split(","):
        piece = raw.strip()
        if not piece:
            continue
        key, sep, value = piece.partition("=")
        key = key.strip()
        if not key or "__" in key or not all(c.isalnum() or c in "._-" for c in key):
            raise ValueError(f"'{piece}' is not key=value or key (keys: letters, digits, '.', '_', '-').")
        pairs.append((key, value.strip() if sep else None))
    return pairs


def label_q(pairs) -> Q:
    q = Q()
    for key, value in pairs:
        if value is None:
            q &= Q(labels__has_key=key)
        elif connection.vendor == "postgresql":
            # JSON containment can use a GIN index on labels; key transforms cannot.
            q &= Q(labels__contains={key: value})
        else:
            q &= Q(**{f"labels__{key}": value})
    return q


def device_states_prefetch() -> Prefetch:
    return Prefetch(
        "model_states",
        queryset=DeviceModelState.objects.select_related("model", "active_version").order_by("model__name"),
    )


def filtered_devices(*, q="", labels=(), hardware="", state="", version="", online=""):
    qs = Device.objects.all()
    if q:
        qs = qs.filter(Q(id__icontains=q) | Q(name__icontains=q))
    if labels:
        qs = qs.filter(label_q(labels))
    if hardware:
        qs = qs.filter(hardware_id=hardware)
    if state:
        qs = qs.filter(state=state)
    if online == "yes":
        qs = qs.filter(online=True)
    elif online == "no":
        qs = qs.filter(online=False)
    if version:
        # EXISTS rather than a join so a device running the version of two models stays one row.
        model_name, at, number = version.rpartition("@")
        states = DeviceModelState.objects.filter(device=OuterRef("pk"), active_version__version=number)
        if at:
            states = states.filter(model__name=model_name)
        qs = qs.filter(Exists(states))
    return qs


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

# The states the rollout page shows, in pipeline order, and which assignment states fall in each.
# A device still in flight whose box is offline is counted as "offline": that is what an
# operator needs to know about it, whatever step it last reported.
PROGRESS_BUCKETS = [
    ("pending", "pending", ("planned", "queued")),
    ("downloading", "downloading", ("directed", "received", "downloading", "verifying")),
    ("prechecking", "prechecking", ("prechecking",)),
    ("in_trial", "in trial", ("activating", "trial")),
    ("healthy", "healthy", ("committed",)),
    ("failed", "failed", ("failed", "rejected")),
    ("timed_out", "timed out", ("timed_out",)),
    ("rolled_back", "rolled back", ("rolled_back", "reverting", "reverted", "revert_failed")),
    ("offline", "offline", ()),
    ("skipped", "skipped", ("skipped",)),
]
BUCKET_OF = {state: key for key, _, states in PROGRESS_BUCKETS for state in states}
FINISHED_STATES = {"committed", "failed", "rejected", "timed_out", "rolled_back", "reverted", "revert_failed", "skipped"}


def empty_counts() -> dict[str, int]:
    return {key: 0 for key, _, _ in PROGRESS_BUCKETS}


def bucket_for(state: str, online: bool) -> str:
    if not online and state not in FINISHED_STATES and state not in ("planned", "queued"):
        return "offline"
    return BUCKET_OF.get(state, "pending")


def progress_rows(counts: dict[str, int]) -> list[dict]:
    total = sum(counts.values()) or 1
    return [
        {"key": key, "label": label, "count": counts[key], "percent": round(100 * counts[key] / total, 2)}
        for key, label, _ in PROGRESS_BUCKETS
        if counts[key] or key != "skipped"
    ]


def rollout_counts(rollout_ids) -> dict[int, dict[int, dict[str, int]]]:
    """{rollout_id: {wave_id: {bucket: n}}} in one grouped query."""
    from ota.models import RolloutDevice

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
    from ota.models import Rollout

    rollouts = list(
        Rollout.objects.filter(state__in=Rollout.OPEN_STATES)
        .select_related("release", "model")
        .order_by("-created_at")[:20]
    )
    counts = rollout_counts(r.pk for r in rollouts)
    for rollout in rollouts:
        rollout.progress = summarise(counts.get(rollout.pk, {}))
    return rollouts


# --- device page -----------------------------------------------------------------------------


def device_directives(device):
    from ota.models import Directive

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


HEALTH_KEYS = ("latency_p50_ms", "latency_p95_ms", "latency_ms", "error_rate")


def health_numbers(health: dict | None) -> dict[str, float]:
    if not isinstance(health, dict):
        return {}
    return {k: v for k, v in health.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def device_health_chart(events) -> dict | None:
    points = [(e.received_at, health_numbers(e.health)) for e in reversed(events) if health_numbers(e.health)]
    if not points:
        return None
    keys = sorted({k for _, h in points for k in h}, key=lambda k: (k not in HEALTH_KEYS, k))[:4]
    return {
        "type": "line",
        "data": {
            "labels": [at.strftime("%H:%M:%S") for at, _ in points],
            "datasets": [{"label": k, "data": [h.get(k) for _, h in points]} for k in keys],
        },
    }
