"""Planning: which active devices a target matches, which can take the release, how they fall
into waves (a stable hash order), and which are already busy in another rollout of the model.

`rollout_plan` runs the whole pipeline; rollout_create, the wizard's live preview and its review
page all call it, so a check added here holds at every entry point."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from datetime import datetime

from django.core.exceptions import ValidationError
from django.db import connection
from django.db.models import Q
from django.db.models.expressions import RawSQL

from ota.models import Device, Rollout, RolloutDevice
from ota.rollouts.definition import (
    gates_normalise,
    ids_listing,
    label_windows_validate,
    start_at_validate,
    target_validate,
    waves_validate,
    windows_validate,
)
from registry.errors import Conflict
from registry.models import ModelVersion
from registry.validity import release_refusal


def ids_in(field: str, ids) -> Q:
    """`field IN ids` for lists of any length. On PostgreSQL a long list is one array parameter
    (IN (SELECT unnest(%s::text[]))) instead of one parameter per id: 75,000 parameters cost
    seconds of CPU in the driver and Django before the query even reached the database."""
    ids = list(ids)
    if connection.vendor == "postgresql" and len(ids) > 1000:
        return Q(**{f"{field}__in": RawSQL("SELECT unnest(%s::text[])", [ids])})
    return Q(**{f"{field}__in": ids})


def stable_rank_key(rollout_id: int, device_id: str) -> str:
    return hashlib.sha256(f"{rollout_id}:{device_id}".encode()).hexdigest()


@dataclass
class Plan:
    targeted: list[tuple[str, str]]  # (device id, hardware id)
    incompatible: list[dict]

    @property
    def compatible(self) -> list[str]:
        bad = {d["device"] for d in self.incompatible}
        return [d for d, _ in self.targeted if d not in bad]


def target_resolve(*, target: dict, release: ModelVersion) -> Plan:
    rows = Device.objects.filter(state=Device.State.ACTIVE)
    if target["hardware"]:
        selected = rows.filter(hardware_id__in=target["hardware"])
    else:
        selected = rows
    selectors = bool(target["labels"] or target["hardware"])
    targeted: dict[str, str] = {}
    if selectors:
        for device_id, hardware, labels in selected.values_list("id", "hardware_id", "labels").iterator(chunk_size=2000):
            if all((labels or {}).get(k) == v for k, v in target["labels"].items()):
                targeted[device_id] = hardware
    if target["devices"]:
        explicit = dict(rows.filter(ids_in("id", target["devices"])).values_list("id", "hardware_id"))
        unknown = sorted(set(target["devices"]) - set(explicit))
        if unknown:
            raise ValidationError({"target.devices": f"unknown or revoked devices: {ids_listing(unknown)}"})
        targeted.update(explicit)
    if not targeted:
        raise ValidationError({"target": f"matches no active device (labels={target['labels']}, hardware={target['hardware']})"})
    hardware_with_artifact = set(release.artifacts.values_list("hardware_id", flat=True))
    incompatible = [
        {"device": d, "hardware": h, "reason": f"release {release} has no artifact for hardware {h!r}"}
        for d, h in sorted(targeted.items())
        if h not in hardware_with_artifact
    ]
    plan = Plan(targeted=sorted(targeted.items()), incompatible=incompatible)
    if not plan.compatible:
        raise ValidationError(
            {
                "target": f"none of the {len(targeted)} targeted devices can run this release: it has artifacts for "
                f"{sorted(hardware_with_artifact)}, the devices are {sorted(set(targeted.values()))}"
            }
        )
    return plan


def plan_waves(*, plan: Plan, waves: list[dict], rollout_id: int) -> list[list[str]]:
    compatible = plan.compatible
    compatible_set = set(compatible)
    explicit = {d for w in waves for d in w.get("devices", [])}
    errors = {}
    for i, w in enumerate(waves):
        outside = [d for d in w.get("devices", []) if d not in compatible_set]
        if outside:
            errors[f"waves[{i}].devices"] = f"not in the compatible target: {ids_listing(outside)}"
    if errors:
        raise ValidationError(errors)
    order = sorted((d for d in compatible if d not in explicit), key=lambda d: stable_rank_key(rollout_id, d))
    total = len(compatible)
    assigned = 0
    cursor = 0
    out: list[list[str]] = []
    for w in waves:
        if "devices" in w:
            members = list(w["devices"])
        elif "percent" in w:
            goal = math.ceil(w["percent"] * total / 100 - 1e-9)
            take = max(0, goal - assigned)
            members = order[cursor : cursor + take]
        else:
            members = order[cursor : cursor + w["count"]]
        if "devices" not in w:
            cursor += len(members)
        assigned += len(members)
        out.append(members)
    if not out[0]:
        # A first wave (the canary) of no device would pass at once and start the next one:
        # the rollout would skip the step meant to catch a bad release on a few devices.
        raise ValidationError(
            {"waves[0]": "selects no device: the waves after it list every device of the target explicitly; "
             "give the first wave devices of its own"}
        )
    return out


def conflicts_find(*, model_id: int, device_ids: list[str], exclude_rollout: int | None = None) -> dict[str, list[str]]:
    """Devices already in a scheduled, running or paused rollout of the same model: {rollout id: [devices]}."""
    qs = RolloutDevice.objects.filter(
        ids_in("device_id", device_ids), rollout__model_id=model_id, rollout__state__in=Rollout.OWNING_STATES
    )
    if exclude_rollout is not None:
        qs = qs.exclude(rollout_id=exclude_rollout)
    found: dict[str, list[str]] = {}
    for rollout_id, device_id in qs.values_list("rollout_id", "device_id").order_by("rollout_id", "device_id"):
        found.setdefault(str(rollout_id), []).append(device_id)
    return found


def raise_conflicts(conflicts: dict[str, list[str]]) -> None:
    if conflicts:
        total = sum(len(v) for v in conflicts.values())
        listing = "; ".join(
            f"rollout {rid}: {', '.join(devs[:10])}{' …' if len(devs) > 10 else ''}" for rid, devs in conflicts.items()
        )
        raise Conflict(
            f"{total} devices are already in a running rollout of this model ({listing})",
            code="device_in_running_rollout",
            conflicts=conflicts,
        )


def release_check(release: ModelVersion) -> None:
    # A plan (the web wizard's preview too) shows the refusal as a field error; rollout_create
    # refuses the same release first with 409 and its code (registry.validity, the shared rule).
    refused = release_refusal(release)
    if refused is not None:
        raise ValidationError({"version": refused[1]})
    if release.state != ModelVersion.State.RELEASED or not release.envelope:
        raise ValidationError(
            {"version": f"{release} is {release.state}; only a released (signed) version can be rolled out"}
        )


@dataclass
class RolloutPlan:
    """A checked definition and what it would do now. Membership of percent and count waves
    depends on the rollout's id (the stable hash order), so `members` takes it; the sizes do not."""

    release: ModelVersion
    target: dict
    gates: dict
    waves: list[dict]  # validated wave specs, each with its "effective_gates"
    resolved: Plan
    sizes: list[int]
    # Devices of the planned waves (of the whole compatible target when no waves were given)
    # that are busy in a scheduled, running or paused rollout of the same model: {rollout id: [devices]}.
    conflicts: dict[str, list[str]]
    # Maintenance windows (all devices; per label group) and the scheduled start, checked.
    windows: list[str] = dataclasses.field(default_factory=list)
    label_windows: list[dict] = dataclasses.field(default_factory=list)
    start_at: datetime | None = None

    def members(self, *, rollout_id: int) -> list[list[str]]:
        return plan_waves(plan=self.resolved, waves=self.waves, rollout_id=rollout_id)

    @property
    def busy(self) -> int:
        return sum(len(v) for v in self.conflicts.values())


def rollout_plan(*, release: ModelVersion, target, waves=None, gates=None, windows=None, label_windows=None,
                 start_at=None) -> RolloutPlan:
    """Check a rollout definition and plan it, without writing anything.

    Raises django's ValidationError keyed by the API's field paths (`target.labels`,
    `waves[1].percent`, `gates.failure.min_reports`, `windows`, `label_windows[0].windows`,
    `start_at`, ...). `waves=None` plans the target alone,
    for a preview shown before a wave plan is typed. Busy devices are reported, not refused:
    the caller decides (create refuses them with 409, the wizard shows them).
    """
    release_check(release)
    target = target_validate(target)
    specs = waves_validate(waves) if waves is not None else []
    rollout_gates = gates_normalise(gates)
    errors: dict = {}
    checked = {}
    for name, check, value in (("windows", windows_validate, windows),
                               ("label_windows", label_windows_validate, label_windows),
                               ("start_at", start_at_validate, start_at)):
        try:
            checked[name] = check(value)
        except ValidationError as exc:
            errors.update(exc.message_dict)
    for i, spec in enumerate(specs):
        try:
            spec["effective_gates"] = gates_normalise(spec.get("gates"), where=f"waves[{i}].gates", base=rollout_gates)
        except ValidationError as exc:
            errors.update(exc.message_dict)
    if errors:
        raise ValidationError(errors)
    resolved = target_resolve(target=target, release=release)
    if waves is not None:
        members = plan_waves(plan=resolved, waves=specs, rollout_id=0)
        sizes = [len(m) for m in members]
        planned = [d for m in members for d in m]
    else:
        sizes, planned = [], resolved.compatible
    return RolloutPlan(
        release=release, target=target, gates=rollout_gates, waves=specs, resolved=resolved, sizes=sizes,
        conflicts=conflicts_find(model_id=release.model_id, device_ids=planned), **checked,
    )
