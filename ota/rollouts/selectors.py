"""Reading rollouts: per-wave counts for the API, the CLI and the UI."""

from __future__ import annotations

from collections import Counter

from django.db.models import Count, Max, Min, Sum

from ota.models import Rollout, RolloutDevice

RD = RolloutDevice.State


def rollout_summary(rollout: Rollout) -> dict:
    """Per wave and overall: counts by device state and by state group (committed, failed,
    in_flight, waiting, waiting_for_window; the groups of RolloutDevice), how the artifact was
    delivered, and the devices waiting for a maintenance window, for the API, the CLI and the UI."""
    per_wave: dict[int, Counter] = {}
    for wave_id, state, n in (
        RolloutDevice.objects.filter(rollout=rollout).values_list("wave_id", "state").annotate(n=Count("id")).order_by()
    ):
        per_wave.setdefault(wave_id, Counter())[state] = n
    waves = []
    totals: Counter = Counter()
    for wave in rollout.waves.all():
        counts = per_wave.get(wave.pk, Counter())
        totals.update(counts)
        groups = RolloutDevice.group_counts(counts)
        waves.append(
            {
                "index": wave.index,
                "number": wave.number,
                "name": wave.spec.get("name", ""),
                "spec": {k: v for k, v in wave.spec.items() if k in ("devices", "percent", "count")},
                "state": wave.state,
                "size": wave.size,
                "counts": dict(counts),
                **groups,
                "healthy_percent": round(100.0 * groups["committed"] / wave.size, 2) if wave.size else 100.0,
                "gates": wave.gates,
                "started_at": wave.started_at,
                "gate_met_at": wave.gate_met_at,
                "finished_at": wave.finished_at,
            }
        )
    return {
        "waves": waves,
        "totals": dict(totals),
        "progress": RolloutDevice.group_counts(totals),
        "devices": sum(totals.values()),
        "delivery": rollout_delivery(rollout),
        "waiting_for_window": rollout_window_wait(rollout),
    }


def rollout_window_wait(rollout: Rollout) -> dict:
    """Devices downloaded and prechecked that wait for a maintenance window: how many, and the
    earliest and latest of the openings they reported (their own clocks)."""
    found = RolloutDevice.objects.filter(rollout=rollout, state=RD.WAITING_FOR_WINDOW).aggregate(
        devices=Count("id"), next_opening=Min("window_opens_at"), last_opening=Max("window_opens_at"),
    )
    return found


def rollout_delivery(rollout: Rollout) -> dict:
    """How the artifact reached the devices that said: how many by delta and in full, the bytes
    they fetched, and the bytes the deltas saved (each delta device's full artifact length less
    what it fetched)."""
    lengths = dict(rollout.release.artifacts.values_list("hardware_id", "length"))
    out = {"delta_devices": 0, "full_devices": 0, "bytes_downloaded": 0, "bytes_saved": 0}
    rows = (
        RolloutDevice.objects.filter(rollout=rollout).exclude(delivery="")
        .values_list("device__hardware_id", "delivery")
        .annotate(n=Count("id"), fetched=Sum("bytes_downloaded"))
        .order_by()
    )
    for hardware, delivery, n, fetched in rows:
        out[f"{delivery}_devices"] = out.get(f"{delivery}_devices", 0) + n
        out["bytes_downloaded"] += fetched or 0
        if delivery == "delta":
            out["bytes_saved"] += max(0, n * lengths.get(hardware, 0) - (fetched or 0))
    return out
