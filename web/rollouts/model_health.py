"""Read-only figures behind the rollout page's "Model health vs control group" panels: per wave,
the control-group gate's verdict (ota/rollouts/control_group.py) side by side for the new release
and its control group.

A wave the engine has judged shows what it decided, read back from the audit log (a pass is
`wave.control_gate`; a trip is under `control_gate` in the rollout.auto_* entry). A running wave
not judged yet shows the verdict as it would be now: wave_control_verdict, which only reads. It
reads the wave's hourly rows (a few per device: 1.5-2.6 s for a 10,000-device rollout, see
benchmarks/results/control_gates.json) while the page polls every 2 s, so the result is cached for
LIVE_SECONDS, or for COST_FACTOR times what it took if longer: computing it then takes at most
1/COST_FACTOR of a web worker's time per running wave, however large the wave (Django's default
cache is per process; a shared CACHES backend would make it once for all workers)."""

from __future__ import annotations

import math
import time

from django.core.cache import cache
from django.utils import timezone

from ota.models import Rollout, Wave
from ota.rollouts.control_group import control_settings, wave_control_verdict
from registry.audit import audit_entries_for

LIVE_SECONDS = 30
COST_FACTOR = 20
MAX_LIVE_SECONDS = 300
TRIP_ACTIONS = ("rollout.auto_pause", "rollout.auto_abort", "rollout.auto_revert")
OPEN_WAVES = (Wave.State.RUNNING, Wave.State.SOAKING)
OPEN_ROLLOUTS = (Rollout.State.RUNNING, Rollout.State.PAUSED)
# A live verdict is not a decision yet: its words say so.
STATE_WORDS = {
    "judged": {"pass": "passed", "fail": "failed", "wait": "waiting for figures"},
    "live": {"pass": "passing so far", "fail": "failing so far", "wait": "waiting for figures"},
}


def stored_verdicts(rollout) -> dict[int, dict]:
    """{wave index: the newest judged verdict} from the audit log: state, why, figures, when."""
    entries = (
        audit_entries_for(rollout)
        .filter(action__in=("wave.control_gate", *TRIP_ACTIONS))
        .values("action", "reason", "detail", "created_at")[:200]
    )
    found: dict[int, dict] = {}
    for e in entries:  # newest first
        detail = e["detail"] or {}
        index = detail.get("wave")
        if not isinstance(index, int) or index in found:
            continue
        if e["action"] == "wave.control_gate":
            figures = {k: v for k, v in detail.items() if k not in ("wave", "verdict")}
            found[index] = {"state": detail.get("verdict", "pass"), "why": e["reason"], "figures": figures,
                            "at": e["created_at"], "action": e["action"]}
        elif isinstance(detail.get("control_gate"), dict):
            found[index] = {"state": "fail", "why": e["reason"], "figures": detail["control_gate"],
                            "at": e["created_at"], "action": e["action"]}
    return found


def live_verdict(rollout, wave) -> dict | None:
    """wave_control_verdict for an open wave, cached for LIVE_SECONDS; None when switched off."""
    key = f"web:control-verdict:{wave.pk}:{wave.state}:{wave.started_at and wave.started_at.timestamp()}"
    cached = cache.get(key)
    if cached is None:
        started = time.perf_counter()
        verdict = wave_control_verdict(rollout, wave)
        cost = time.perf_counter() - started
        cached = {"verdict": None} if verdict is None else {
            "verdict": {"state": verdict.state, "why": verdict.summary, "figures": verdict.figures},
        }
        cached["at"] = timezone.now()
        cache.set(key, cached, min(MAX_LIVE_SECONDS, max(LIVE_SECONDS, math.ceil(cost * COST_FACTOR))))
    if cached["verdict"] is None:
        return None
    return {**cached["verdict"], "at": cached["at"]}


def _pct(rate) -> str:
    return "—" if rate is None else f"{rate * 100:.2f} %"


def _num(value, unit="") -> str:
    if value is None:
        return "—"
    text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:g}"
    return text + unit


def comparison_rows(figures: dict) -> list[dict]:
    """The verdict's figures as table rows: what, new, control, comparison, threshold, p-value,
    and whether that figure is within its gate (None where nothing is judged)."""
    rows: list[dict] = []
    alpha = figures.get("alpha")
    if "new_devices" in figures or "control_devices" in figures:
        need = figures.get("min_devices")
        rows.append({
            "key": "devices", "name": f"Devices with ≥ {_num(figures.get('min_requests'))} requests",
            "new": _num(figures.get("new_devices")), "control": _num(figures.get("control_devices")),
            "compare": "", "threshold": f"≥ {need} in each group" if need is not None else "",
            "p_value": "",
            "ok": None if need is None
            else min(figures.get("new_devices", 0), figures.get("control_devices", 0)) >= need,
        })
    if "new_requests" in figures:
        rows.append({"key": "requests", "name": "Requests", "new": _num(figures["new_requests"]),
                     "control": _num(figures.get("control_requests")), "compare": "", "threshold": "",
                     "p_value": "", "ok": None})
    latency = figures.get("latency")
    if isinstance(latency, dict) and "off" in latency:
        rows.append({"key": "latency", "name": "Latency", "off": latency["off"]})
    elif isinstance(latency, dict):
        p = latency.get("p_value")
        for q in ("p50", "p95"):
            fig = latency.get(q) or {}
            ratio, limit = fig.get("ratio"), fig.get("max_ratio")
            over = ratio is not None and limit is not None and ratio > limit
            rows.append({
                "key": f"latency-{q}", "name": f"Latency {q} (ms)", "new": _num(fig.get("new")),
                "control": _num(fig.get("control")), "compare": "—" if ratio is None else f"×{ratio:g}",
                "threshold": f"≤ ×{limit:g}" if limit is not None else "",
                "p_value": "" if p is None else f"{p:.3g}",
                "ok": not (over and p is not None and alpha is not None and p < alpha),
            })
    errors = figures.get("errors")
    if isinstance(errors, dict) and "new" in errors:
        p = errors.get("p_value")
        diff = errors.get("difference") or 0.0
        rows.append({
            "key": "errors", "name": "Error rate",
            "new": _pct(errors.get("new")), "control": _pct(errors.get("control")),
            "compare": f"{diff * 100:+.2f} pp", "threshold": f"≤ +{errors.get('max_increase', 0) * 100:g} pp",
            "p_value": "" if p is None else f"{p:.3g}",
            "ok": not (p is not None and alpha is not None and p < alpha),
        })
    drift = figures.get("drift")
    if isinstance(drift, dict) and "off" in drift:
        rows.append({"key": "drift", "name": "Output drift", "off": drift["off"]})
    elif isinstance(drift, dict) and "psi" in drift:
        rows.append({
            "key": "drift", "name": "Output drift (PSI)", "new": "", "control": "",
            "compare": f"{drift['psi']:g}", "threshold": f"≤ {drift.get('max_psi'):g}", "p_value": "",
            "ok": drift["psi"] <= drift.get("max_psi", 0),
        })
    elif isinstance(drift, dict) and "min_outputs" in drift:
        need = drift["min_outputs"]
        rows.append({
            "key": "drift", "name": "Outputs (for drift)", "new": _num(drift.get("new_outputs")),
            "control": _num(drift.get("control_outputs")), "compare": "",
            "threshold": f"≥ {need:g} in each group",
            "p_value": "", "ok": min(drift.get("new_outputs", 0), drift.get("control_outputs", 0)) >= need,
        })
    return rows


def label_shares(figures: dict) -> list[dict]:
    drift = figures.get("drift") or {}
    new, control = drift.get("new_shares") or {}, drift.get("control_shares") or {}
    return [
        {"label": label, "new": _pct(new.get(label)), "control": _pct(control.get(label))}
        for label in sorted(set(new) | set(control), key=lambda k: -(new.get(k, 0) + control.get(k, 0)))
    ]


def comparison_chart(figures: dict, version: str) -> dict | None:
    """New vs control latency (p50, p95) as grouped bars, for json_script and app.js."""
    latency = figures.get("latency")
    if not isinstance(latency, dict) or "p50" not in latency:
        return None
    keys = ("p50", "p95")
    new = [latency[k].get("new") for k in keys]
    control = [latency[k].get("control") for k in keys]
    return _bars([f"latency {k} (ms)" for k in keys], version, new, control, {"beginAtZero": True})


def _bars(labels: list[str], version: str, new: list, control: list, y_axis: dict) -> dict:
    return {
        "type": "bar",
        "data": {
            "labels": labels,
            "datasets": [
                {"label": f"{version} (new)", "data": new, "color": "#2457c5"},
                {"label": "control group", "data": control, "color": "#a0aec0"},
            ],
        },
        "options": {"scales": {"y": y_axis}},
    }


def shares_chart(figures: dict, version: str) -> dict | None:
    drift = figures.get("drift") or {}
    new, control = drift.get("new_shares"), drift.get("control_shares")
    if not new and not control:
        return None
    labels = sorted(set(new or {}) | set(control or {}))
    new, control = new or {}, control or {}
    return _bars(labels, version, [new.get(k, 0) for k in labels], [control.get(k, 0) for k in labels],
                 {"beginAtZero": True, "title": {"display": True, "text": "share"}})


def wave_model_health(rollout, wave, stored: dict | None) -> dict | None:
    """One wave's panel: source ("judged" | "live" | "off" | None), verdict state, why, rows.
    None for a wave not started."""
    if wave.started_at is None:
        return None
    if stored is not None:
        panel = {"source": "judged", **stored}
    elif control_settings(wave.gates) is None:
        return {"source": "off",
                "why": "switched off by this rollout's definition (gates.health.control: false)"}
    elif wave.state in OPEN_WAVES and rollout.state in OPEN_ROLLOUTS:
        live = live_verdict(rollout, wave)
        if live is None or live["state"] == "off":
            return {"source": "off", "why": live["why"] if live else "switched off"}
        panel = {"source": "live", **live}
    elif wave.state == Wave.State.PASSED:
        return {"source": "off", "why": "the wave passed without a control-group verdict (no model metrics "
                                        "to compare when its soak ended, or advanced by hand)"}
    else:
        return {"source": "off", "why": "not judged: the wave ended before its soak did"}
    figures = panel.get("figures") or {}
    version = rollout.release.version
    panel.update(
        state_word=STATE_WORDS[panel["source"]].get(panel["state"], panel["state"]),
        rows=comparison_rows(figures),
        shares=label_shares(figures),
        chart=comparison_chart(figures, version),
        shares_chart=shares_chart(figures, version),
        chart_id=f"control-latency-{wave.index}",
        shares_chart_id=f"control-shares-{wave.index}",
    )
    return panel


def rollout_model_health(rollout, waves) -> dict[int, dict | None]:
    """{wave index: wave_model_health} for every wave of the rollout."""
    stored = stored_verdicts(rollout)
    return {w.index: wave_model_health(rollout, w, stored.get(w.index)) for w in waves}
