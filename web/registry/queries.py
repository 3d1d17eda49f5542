"""Read-only queries behind the version page."""

from __future__ import annotations

import json

from django.db.models import Count

from ota.fleet.selectors import devices_filter
from ota.models import Device, Rollout, RolloutDevice, Wave
from ota.rollouts.gates import failure_gate_tripped, wave_figures


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
