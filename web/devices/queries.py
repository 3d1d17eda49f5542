"""Read-only queries behind the device page: its timeline (directives, events, the releases it
ran), its last telemetry and the health figures its events carried."""

from __future__ import annotations

from ota.models import Directive


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
