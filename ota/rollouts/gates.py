"""The gates of a wave: its figures, the success gate, the failure gate and the fleet-side
model-health gate. Pure reads and decisions; what happens when a gate trips is the engine's."""

from __future__ import annotations

from collections import Counter

from django.db.models import Count

from ota.models import RolloutDevice, Wave
from ota.rollouts.definition import gates_with_defaults

RD = RolloutDevice.State


def wave_figures(wave: Wave) -> dict:
    """A wave's counts and the shares its gates judge. Skipped devices (revoked before their turn,
    or the rollout stopped) never count; unreachable ones count only against reachability:
    healthy_percent is of the reachable devices, reachable_percent of the rest of the wave."""
    counts = Counter(dict(wave.assignments.values_list("state").annotate(n=Count("id")).order_by()))
    groups = RolloutDevice.group_counts(counts)
    committed, failed = groups["committed"], groups["failed"]
    reported = committed + failed
    size = wave.size
    eligible = max(0, size - groups["skipped"])
    reachable = max(0, eligible - groups["unreachable"])
    return {
        "size": size,
        "eligible": eligible,
        "reachable": reachable,
        "committed": committed,
        "failed": failed,
        "reported": reported,
        "in_flight": groups["in_flight"],
        "unreachable": groups["unreachable"],
        "queued": counts.get(RD.QUEUED, 0),
        "healthy_percent": round(100.0 * committed / reachable, 2) if reachable else (0.0 if eligible else 100.0),
        "reachable_percent": round(100.0 * reachable / eligible, 2) if eligible else 100.0,
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
    success = gates_with_defaults(gates)["success"]
    return (
        figures["healthy_percent"] >= success["min_healthy_percent"]
        and figures["reachable_percent"] >= success["min_reachable_percent"]
    )


def too_few_reachable(gates: dict, figures: dict) -> str | None:
    """Why the wave cannot pass whatever the rest does: every device it still waits on is
    unreachable, and too few are reachable. None while anything is still on its way."""
    needed = gates_with_defaults(gates)["success"]["min_reachable_percent"]
    if figures["reachable_percent"] >= needed or figures["in_flight"] or figures["queued"]:
        return None
    return (
        f"only {figures['reachable']} of {figures['eligible']} devices reachable "
        f"({figures['reachable_percent']} % < min_reachable_percent {needed} %); the other "
        f"{figures['unreachable']} never picked up their directive (it stays: they converge when they return)"
    )
