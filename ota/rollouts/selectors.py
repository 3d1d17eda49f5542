"""Reading rollouts: per-wave counts for the API, the CLI and the UI."""

from __future__ import annotations

from collections import Counter

from django.db.models import Count

from ota.models import Rollout, RolloutDevice

RD = RolloutDevice.State


def rollout_summary(rollout: Rollout) -> dict:
    """State plus per-wave counts by device state, for the API, the CLI and the UI."""
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
        committed = counts.get(RD.COMMITTED, 0)
        failed = sum(counts.get(s, 0) for s in RolloutDevice.FAILURES)
        waves.append(
            {
                "index": wave.index,
                "name": wave.spec.get("name", ""),
                "spec": {k: v for k, v in wave.spec.items() if k in ("devices", "percent", "count")},
                "state": wave.state,
                "size": wave.size,
                "counts": dict(counts),
                "committed": committed,
                "failed": failed,
                "healthy_percent": round(100.0 * committed / wave.size, 2) if wave.size else 100.0,
                "gates": wave.gates,
                "started_at": wave.started_at,
                "gate_met_at": wave.gate_met_at,
                "finished_at": wave.finished_at,
            }
        )
    return {"waves": waves, "totals": dict(totals), "devices": sum(totals.values())}
