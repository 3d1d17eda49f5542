"""Read-only queries behind the overview page."""

from __future__ import annotations

from django.db.models import Count, Q

from ota.models import Device, DeviceModelState, Rollout
from web.rollouts.progress import rollout_counts, summarise


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
