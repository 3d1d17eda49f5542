"""The gates of a wave: its figures, the success gate, the failure gate and the fleet-side
model-health gate. Pure reads and decisions; what happens when a gate trips is the engine's."""

from __future__ import annotations

from collections import Counter

from django.db.models import Count

from ota.models import RolloutDevice, Wave

RD = RolloutDevice.State


def wave_figures(wave: Wave) -> dict:
    counts = Counter(dict(wave.assignments.values_list("state").annotate(n=Count("id")).order_by()))
    groups = RolloutDevice.group_counts(counts)
    committed, failed = groups["committed"], groups["failed"]
    reported = committed + failed
    size = wave.size
    return {
        "size": size,
        "committed": committed,
        "failed": failed,
        "reported": reported,
        "in_flight": groups["in_flight"],
        "queued": counts.get(RD.QUEUED, 0),
        "healthy_percent": round(100.0 * committed / size, 2) if size else 100.0,
        "failed_percent": round(100.0 * failed / reported, 2) if reported else 0.0,
        "by_state": dict(counts),
    }


def health_gate_broken(gates: dict, health: dict | None) -> str | None:
    """Why a committed device's reported trial figures break the health gate, else None."""
    limits = gates.get("health") or {}
    figures = health or {}
    reasons = []
    for key, label in (("max_error_rate", "error_rate"), ("max_latency_ms_p95", "latency_ms_p95")):
        limit, value = limits.get(key), figures.get(label)
        if limit is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            reasons.append(f"no {label} reported (health gate {key}={limit})")
        elif value > limit:
            reasons.append(f"{label} {value} > {key} {limit}")
    return "; ".join(reasons) or None


def failure_gate_tripped(gates: dict, figures: dict) -> str | None:
    failure = gates["failure"]
    if figures["reported"] < failure["min_reports"] or figures["failed"] == 0:
        return None
    if figures["failed_percent"] >= failure["max_failed_percent"]:
        return (
            f"{figures['failed']} of {figures['reported']} reporting devices failed "
            f"({figures['failed_percent']}% >= max_failed_percent {failure['max_failed_percent']}%)"
        )
    if failure.get("max_failures") and figures["failed"] >= failure["max_failures"]:
        return f"{figures['failed']} failures >= max_failures {failure['max_failures']}"
    return None


def success_gate_met(gates: dict, figures: dict) -> bool:
    return figures["healthy_percent"] >= gates["success"]["min_healthy_percent"]
