"""Read-only figures behind the device page's "Model metrics" card: per model, what the app on the
box reported hour by hour (ModelMetricsHour rows: requests, errors, the latency sketch), with the
release each hour was on and the hours the release changed.

Quantiles come from the stored DDSketch JSON (agent.metrics.aggregate), as the control-group gate
reads them, so the figures here are the ones the gate compared."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from agent.metrics.aggregate import quantile, sketch_from_json
from ota.models import ModelMetricsHour
from registry.models import Artifact

HOURS_SHOWN = 168  # a week of hours on the chart
TABLE_ROWS = 48  # the newest hours in the table
PALETTE = ["#2457c5", "#1f8a4c", "#805ad5", "#b7791f", "#2b6cb0", "#dd6b20"]


def _hour_label(hour) -> str:
    return timezone.localtime(hour).strftime("%m-%d %H:00")


def release_names(shas) -> dict[str, str]:
    """sha256 → "version" for the registry's artifacts; a sha the registry does not know keeps
    its first 12 characters (a release installed by hand, or since deleted)."""
    names = {sha: f"sha {sha[:12]}" for sha in shas}
    known = Artifact.objects.filter(sha256__in=list(shas)).values_list("sha256", "version__version")
    for sha, version in known:
        names[sha] = version
    return names


def device_model_metrics(device, *, history=(), now=None) -> list[dict]:
    """One entry per model the box's app reported on in the last HOURS_SHOWN hours: its hourly
    table (newest first), a latency chart (p50, p95, one line per release) and a requests/error
    rate chart, both with the hours the release changed marked on the time axis. `history`:
    the device's ActiveRelease rows (the view's), whose starts in the window are changes too."""
    now = now or timezone.now()
    this_hour = now.replace(minute=0, second=0, microsecond=0)
    since = this_hour - timedelta(hours=HOURS_SHOWN - 1)
    rows = list(
        ModelMetricsHour.objects.filter(device=device, hour__gte=since)
        .order_by("model", "hour", "first_at")
        .values("model", "release_sha256", "hour", "requests", "errors", "latency_ms")
    )
    if not rows:
        return []
    names = release_names({r["release_sha256"] for r in rows} | {h.sha256 for h in history})
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        sketch = sketch_from_json(r["latency_ms"] or {})
        r["p50"], r["p95"] = quantile(sketch, 0.5), quantile(sketch, 0.95)
        r["error_percent"] = f"{100 * r['errors'] / r['requests']:.2f} %" if r["requests"] else "—"
        r["release"] = names[r["release_sha256"]]
        by_model.setdefault(r["model"], []).append(r)
    return [
        _model_metrics(model, model_rows, history=[h for h in history if h.model.name == model],
                       names=names, until=this_hour)
        for model, model_rows in by_model.items()
    ]


def _model_metrics(model: str, rows: list[dict], *, history, names, until) -> dict:
    start = rows[0]["hour"]
    hours = [start + timedelta(hours=i) for i in range(int((until - start).total_seconds() // 3600) + 1)]
    index = {h: i for i, h in enumerate(hours)}
    # Release changes: where the device's history says one started, and where the release the app
    # reports on differs from the previous reporting hour's (history may predate the window).
    changes: dict = {}
    for h in history:
        hour = h.from_time.replace(minute=0, second=0, microsecond=0)
        if hour in index:
            name = h.version.version if h.version else names.get(h.sha256, h.sha256[:12])
            changes.setdefault(hour, []).append(name)
    previous: set[str] = set()
    for hour in sorted({r["hour"] for r in rows}):
        now_on = {r["release"] for r in rows if r["hour"] == hour}
        if previous and not now_on <= previous:
            for release in sorted(now_on - previous):
                if release not in changes.get(hour, []):
                    changes.setdefault(hour, []).append(release)
        previous = now_on
    labels = [
        [_hour_label(h), *(f"▶ {v}" for v in changes[h])] if h in changes else _hour_label(h) for h in hours
    ]

    releases = list(dict.fromkeys(r["release"] for r in rows))
    latency_sets = []
    for n, release in enumerate(releases):
        colour = PALETTE[n % len(PALETTE)]
        for q, dash in (("p95", None), ("p50", [4, 4])):
            data = [None] * len(hours)
            for r in rows:
                if r["release"] == release:
                    data[index[r["hour"]]] = r[q]
            dataset = {"label": f"{q} · {release}", "data": data, "color": colour, "pointRadius": 2}
            if dash:
                dataset["borderDash"] = dash
            latency_sets.append(dataset)
    requests, errors = [0.0] * len(hours), [0.0] * len(hours)
    reported = [False] * len(hours)
    for r in rows:
        i = index[r["hour"]]
        requests[i] += r["requests"]
        errors[i] += r["errors"]
        reported[i] = True
    error_rate = [round(100 * e / q, 3) if q else None for e, q in zip(errors, requests)]
    slug = "".join(c if c.isalnum() else "-" for c in model)
    table = []
    for r in reversed(rows):
        table.append({**r, "changed": r["hour"] in changes and r["release"] in changes[r["hour"]]})
        if len(table) >= TABLE_ROWS:
            break
    return {
        "model": model,
        "rows": table,
        "changes": [{"hour": h, "releases": v} for h, v in sorted(changes.items())],
        "releases": releases,
        "latency_chart_id": f"metrics-latency-{slug}",
        "latency_chart": {
            "type": "line",
            "data": {"labels": labels, "datasets": latency_sets},
            "options": {"scales": {"y": {"beginAtZero": True,
                                         "title": {"display": True, "text": "latency ms"}}}},
        },
        "traffic_chart_id": f"metrics-traffic-{slug}",
        "traffic_chart": {
            "type": "bar",
            "data": {"labels": labels, "datasets": [
                {"label": "requests", "data": [q if seen else None for q, seen in zip(requests, reported)],
                 "color": "#a0aec0", "yAxisID": "y"},
                {"type": "line", "label": "error rate %", "data": error_rate, "color": "#c53030",
                 "yAxisID": "y1", "pointRadius": 2},
            ]},
            "options": {"scales": {
                "y": {"beginAtZero": True, "title": {"display": True, "text": "requests/h"}},
                "y1": {"beginAtZero": True, "position": "right", "grid": {"drawOnChartArea": False},
                       "title": {"display": True, "text": "errors %"}},
            }},
        },
    }
