"""A rollout's progress in buckets (RolloutDevice.PROGRESS_BUCKETS plus "offline"), counted per
wave in one grouped query: the bars of the rollout list, the rollout page and the overview."""

from __future__ import annotations

from django.db.models import Count

from ota.models import RolloutDevice

# The rollout page shows the model's progress buckets plus "offline", just before "skipped": a
# device still in flight whose box is offline counts as offline, since that is what an operator
# needs to know about it, whatever step it last reported.
PROGRESS_BUCKETS = [
    *(b for b in RolloutDevice.PROGRESS_BUCKETS if b[0] != "skipped"),
    ("offline", "offline", ()),
    *(b for b in RolloutDevice.PROGRESS_BUCKETS if b[0] == "skipped"),
]
# Shown only when some device is in them.
OPTIONAL_BUCKETS = {"reverting", "skipped", "unreachable", "waiting_for_window"}
# Not "offline" when its box is: the device waits for its maintenance window by its own clock,
# offline or not, and activates when the window opens.
NOT_OFFLINE = (*RolloutDevice.FINISHED, *RolloutDevice.WAITING, RolloutDevice.State.UNREACHABLE,
               RolloutDevice.State.WAITING_FOR_WINDOW)
BUCKET_OF = {state: key for key, _, states in PROGRESS_BUCKETS for state in states}


def empty_counts() -> dict[str, int]:
    return {key: 0 for key, _, _ in PROGRESS_BUCKETS}


def bucket_for(state: str, online: bool) -> str:
    if not online and state not in NOT_OFFLINE:
        return "offline"
    return BUCKET_OF[state]


def progress_rows(counts: dict[str, int]) -> list[dict]:
    total = sum(counts.values()) or 1
    return [
        {"key": key, "label": label, "count": counts[key], "percent": round(100 * counts[key] / total, 2)}
        for key, label, _ in PROGRESS_BUCKETS
        if counts[key] or key not in OPTIONAL_BUCKETS
    ]


def rollout_counts(rollout_ids) -> dict[int, dict[int, dict[str, int]]]:
    """{rollout_id: {wave_id: {bucket: n}}} in one grouped query."""
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
