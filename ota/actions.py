"""Rollout business logic: definitions, planning, operator actions, and the wave engine.

Every mutation of a rollout takes its row lock first (SELECT ... FOR UPDATE), so operator
actions, event application and engine evaluation on any number of workers serialise per
rollout; state changes are additionally conditional UPDATEs, so a duplicate task delivery is a
no-op. Side effects (directive publishing, waking the engine) run in transaction.on_commit.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.db.models import Count, Q
from django.utils import timezone

from ota.directives import DirectiveRequest, directives_issue, directives_withdraw
from ota.models import Device, DeviceEvent, DeviceModelState, Directive, Rollout, RolloutDevice, Wave
from registry.errors import ApiError, Conflict
from registry.models import Artifact, AuditEntry, Model, ModelVersion

logger = logging.getLogger(__name__)

RD = RolloutDevice.State
SYSTEM = "system"

DEFAULT_GATES = {
    "success": {"min_healthy_percent": 100},
    "failure": {"min_reports": 1, "max_failed_percent": 20, "max_failures": None},
    "soak_seconds": 0,
    "rate_per_minute": None,
    "timeouts": {"download_seconds": 1800, "activate_seconds": 600, "trial_seconds": 900},
    # Fleet-side model health: a device whose trial figures break these counts as failed even
    # though its own (looser or unset) limits let it commit. Off unless given.
    "health": {"max_error_rate": None, "max_latency_ms_p95": None},
}


# --- bulk writes -------------------------------------------------------------------------------


def bulk_set(rows: list, fields: list[str], *, batch_size: int = 2000) -> None:
    """Write `fields` of many rows of one model in one statement per batch.

    Django's bulk_update builds a CASE WHEN per field and row, which costs seconds for a wave of
    thousands; on PostgreSQL this is one UPDATE ... FROM (VALUES ...) instead.
    """
    if not rows:
        return
    model = type(rows[0])
    if connection.vendor != "postgresql":
        model.objects.bulk_update(rows, fields, batch_size=batch_size)
        return
    meta = model._meta
    cols = [meta.get_field(name) for name in fields]
    pk = meta.pk
    qn = connection.ops.quote_name
    assignments = ", ".join(f"{qn(f.column)} = v.{qn(f.column)}::{f.db_type(connection)}" for f in cols)
    names = ", ".join(qn(c) for c in [pk.column, *[f.column for f in cols]])
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = 1 + len(cols)
        values = ", ".join(["(" + ", ".join(["%s"] * width) + ")"] * len(chunk))
        params = []
        for row in chunk:
            params.append(pk.get_db_prep_save(row.pk, connection))
            params.extend(f.get_db_prep_save(getattr(row, f.attname), connection) for f in cols)
        sql = (
            f"UPDATE {qn(meta.db_table)} AS t SET {assignments} FROM (VALUES {values}) AS v({names}) "
            f"WHERE t.{qn(pk.column)} = v.{qn(pk.column)}::{pk.db_type(connection) if pk.get_internal_type() != 'BigAutoField' else 'bigint'}"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, params)


# --- audit ---------------------------------------------------------------------------------------


def audit_record(*, actor: str, action: str, rollout: Rollout, reason: str = "", detail: dict | None = None) -> None:
    AuditEntry.objects.create(
        actor=actor,
        action=action,
        object_type="rollout",
        object_id=str(rollout.pk),
        reason=reason,
        detail=detail or {},
    )


# --- definition validation -------------------------------------------------------------------


def _number(value, where: str, errors: dict, *, lo: float, hi: float | None, integer: bool = False):
    kind_ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not kind_ok:
        errors[where] = f"must be {'an integer' if integer else 'a number'}, got {value!r}"
        return None
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        errors[where] = f"must be {bound}, got {value}"
        return None
    return value


def gates_normalise(raw, *, where: str = "gates", base: dict | None = None) -> dict:
    """Merge `raw` over `base` (defaults) and check every threshold's type and range."""
    base = base or DEFAULT_GATES
    errors: dict[str, str] = {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValidationError({where: "must be an object"})
    known = {"success", "failure", "soak_seconds", "rate_per_minute", "timeouts", "health"}
    for key in raw:
        if key not in known:
            errors[f"{where}.{key}"] = f"unknown gate setting; use one of {', '.join(sorted(known))}"
    out = {
        "success": dict(base["success"]),
        "failure": dict(base["failure"]),
        "soak_seconds": base["soak_seconds"],
        "rate_per_minute": base["rate_per_minute"],
        "timeouts": dict(base["timeouts"]),
        "health": dict(base.get("health") or DEFAULT_GATES["health"]),
    }
    for section, fields in (
        ("success", {"min_healthy_percent": (0, 100, False)}),
        ("failure", {"min_reports": (1, None, True), "max_failed_percent": (0, 100, False), "max_failures": (1, None, True)}),
        ("timeouts", {"download_seconds": (1, None, True), "activate_seconds": (1, None, True), "trial_seconds": (1, None, True)}),
        ("health", {"max_error_rate": (0, 1, False), "max_latency_ms_p95": (0, None, False)}),
    ):
        given = raw.get(section)
        if given is None:
            continue
        if not isinstance(given, dict):
            errors[f"{where}.{section}"] = "must be an object"
            continue
        for name, value in given.items():
            if name not in fields:
                errors[f"{where}.{section}.{name}"] = f"unknown setting; use one of {', '.join(fields)}"
                continue
            lo, hi, integer = fields[name]
            if value is None and name in ("max_failures", "max_error_rate", "max_latency_ms_p95"):
                out[section][name] = None
                continue
            checked = _number(value, f"{where}.{section}.{name}", errors, lo=lo, hi=hi, integer=integer)
            if checked is not None:
                out[section][name] = checked
    if "soak_seconds" in raw:
        value = _number(raw["soak_seconds"], f"{where}.soak_seconds", errors, lo=0, hi=None, integer=True)
        if value is not None:
            out["soak_seconds"] = value
    if "rate_per_minute" in raw and raw["rate_per_minute"] is not None:
        value = _number(raw["rate_per_minute"], f"{where}.rate_per_minute", errors, lo=1, hi=None, integer=True)
        if value is not None:
            out["rate_per_minute"] = value
    if errors:
        raise ValidationError(errors)
    return out


def waves_validate(raw) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise ValidationError({"waves": "must be a non-empty list of waves, e.g. [{\"devices\": [...]}, {\"percent\": 100}]"})
    errors: dict[str, str] = {}
    out = []
    last_percent = 0.0
    seen_devices: set[str] = set()
    for i, wave in enumerate(raw):
        where = f"waves[{i}]"
        if not isinstance(wave, dict):
            errors[where] = "must be an object with one of: devices, percent, count"
            continue
        kinds = [k for k in ("devices", "percent", "count") if k in wave]
        extra = set(wave) - {"devices", "percent", "count", "gates", "name"}
        if extra:
            errors[where] = f"unknown keys {sorted(extra)}; a wave has one of devices/percent/count, plus optional name and gates"
            continue
        if len(kinds) != 1:
            errors[where] = "must have exactly one of: devices, percent, count"
            continue
        kind = kinds[0]
        spec: dict = {"name": str(wave.get("name") or "")}
        if kind == "devices":
            devices = wave["devices"]
            if not isinstance(devices, list) or not devices or not all(isinstance(d, str) and d for d in devices):
                errors[f"{where}.devices"] = "must be a non-empty list of device ids"
                continue
            dupes = sorted(set(d for d in devices if d in seen_devices or devices.count(d) > 1))
            if dupes:
                errors[f"{where}.devices"] = f"devices listed twice: {', '.join(dupes)}"
                continue
            seen_devices.update(devices)
            spec["devices"] = list(devices)
            spec["name"] = spec["name"] or ("canary" if i == 0 else f"wave {i}")
        elif kind == "percent":
            value = _number(wave["percent"], f"{where}.percent", errors, lo=0, hi=100)
            if value is None:
                continue
            if value <= 0:
                errors[f"{where}.percent"] = "must be above 0"
                continue
            if value <= last_percent:
                errors[f"{where}.percent"] = (
                    f"percentages are cumulative and must increase: {value} follows {last_percent}"
                )
                continue
            last_percent = value
            spec["percent"] = value
        else:
            value = _number(wave["count"], f"{where}.count", errors, lo=1, hi=None, integer=True)
            if value is None:
                continue
            spec["count"] = value
        if "gates" in wave:
            spec["gates"] = wave["gates"]
        out.append(spec)
    if errors:
        raise ValidationError(errors)
    return out


def target_validate(raw) -> dict:
    if not isinstance(raw, dict):
        raise ValidationError({"target": "must be an object with labels, hardware and/or devices"})
    extra = set(raw) - {"labels", "hardware", "devices"}
    if extra:
        raise ValidationError({"target": f"unknown keys {sorted(extra)}; use labels, hardware, devices"})
    labels = raw.get("labels") or {}
    hardware = raw.get("hardware") or []
    devices = raw.get("devices") or []
    errors = {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        errors["target.labels"] = "must be an object of string label values"
    if not isinstance(hardware, list) or not all(isinstance(h, str) for h in hardware):
        errors["target.hardware"] = "must be a list of hardware ids"
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        errors["target.devices"] = "must be a list of device ids"
    if errors:
        raise ValidationError(errors)
    if not labels and not hardware and not devices:
        raise ValidationError({"target": "is empty: give labels, hardware and/or devices (an empty target would mean the whole fleet)"})
    return {"labels": labels, "hardware": hardware, "devices": devices}


# --- planning --------------------------------------------------------------------------------


def stable_rank_key(rollout_id: int, device_id: str) -> str:
    return hashlib.sha256(f"{rollout_id}:{device_id}".encode()).hexdigest()


@dataclass
class Plan:
    targeted: list[tuple[str, str]]  # (device id, hardware id)
    incompatible: list[dict]
    waves: list[list[str]] = field(default_factory=list)

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
        explicit = dict(rows.filter(id__in=target["devices"]).values_list("id", "hardware_id"))
        unknown = sorted(set(target["devices"]) - set(explicit))
        if unknown:
            raise ValidationError({"target.devices": f"unknown or revoked devices: {', '.join(unknown)}"})
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
            errors[f"waves[{i}].devices"] = (
                f"not in the compatible target: {', '.join(outside)}"
            )
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
    return out


def conflicts_find(*, model_id: int, device_ids: list[str], exclude_rollout: int | None = None) -> dict[str, list[str]]:
    """Devices already in a running or paused rollout of the same model: {rollout id: [devices]}."""
    qs = RolloutDevice.objects.filter(
        rollout__model_id=model_id, rollout__state__in=Rollout.ACTIVE_STATES, device_id__in=device_ids
    )
    if exclude_rollout is not None:
        qs = qs.exclude(rollout_id=exclude_rollout)
    found: dict[str, list[str]] = {}
    for rollout_id, device_id in qs.values_list("rollout_id", "device_id").order_by("rollout_id", "device_id"):
        found.setdefault(str(rollout_id), []).append(device_id)
    return found


def _raise_conflicts(conflicts: dict[str, list[str]]) -> None:
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


# --- create and operator actions ---------------------------------------------------------------


def rollout_create(
    *,
    model: str,
    version: str,
    target: dict,
    waves: list,
    gates: dict | None = None,
    abort_policy: str = Rollout.AbortPolicy.PAUSE,
    requires_approval: bool = False,
    name: str = "",
    actor: str,
) -> Rollout:
    model_obj = Model.objects.filter(name=model).first()
    if model_obj is None:
        raise ValidationError({"model": f"no model named {model!r}"})
    release = ModelVersion.objects.filter(model=model_obj, version=version).select_related("model").first()
    if release is None:
        raise ValidationError({"version": f"model {model!r} has no version {version!r}"})
    if release.state != ModelVersion.State.RELEASED or not release.envelope:
        raise ValidationError(
            {"version": f"{release} is {release.state}; only a released (signed) version can be rolled out"}
        )
    if abort_policy not in Rollout.AbortPolicy.values:
        raise ValidationError({"abort_policy": f"must be one of {', '.join(Rollout.AbortPolicy.values)}, got {abort_policy!r}"})
    target = target_validate(target)
    wave_specs = waves_validate(waves)
    rollout_gates = gates_normalise(gates)
    for i, spec in enumerate(wave_specs):
        spec["effective_gates"] = gates_normalise(spec.get("gates"), where=f"waves[{i}].gates", base=rollout_gates)
    plan = target_resolve(target=target, release=release)
    with transaction.atomic():
        rollout = Rollout.objects.create(
            name=name,
            release=release,
            model=model_obj,
            target=target,
            waves_spec=[{k: v for k, v in s.items() if k != "effective_gates"} for s in wave_specs],
            gates=rollout_gates,
            abort_policy=abort_policy,
            requires_approval=requires_approval,
            incompatible=plan.incompatible,
            created_by=actor,
        )
        members = plan_waves(plan=plan, waves=wave_specs, rollout_id=rollout.pk)
        _raise_conflicts(conflicts_find(model_id=model_obj.pk, device_ids=[d for m in members for d in m]))
        rank = 0
        assignments = []
        for index, (spec, devices) in enumerate(zip(wave_specs, members)):
            wave = Wave.objects.create(
                rollout=rollout, index=index, spec={k: v for k, v in spec.items() if k != "effective_gates"},
                gates=spec["effective_gates"], size=len(devices),
            )
            for device_id in devices:
                assignments.append(RolloutDevice(rollout=rollout, wave=wave, device_id=device_id, rank=rank))
                rank += 1
        RolloutDevice.objects.bulk_create(assignments, batch_size=2000)
        audit_record(
            actor=actor,
            action="rollout.create",
            rollout=rollout,
            reason=f"{release} to {rank} devices in {len(members)} waves",
            detail={
                "release": str(release),
                "wave_sizes": [len(m) for m in members],
                "targeted": len(plan.targeted),
                "incompatible": len(plan.incompatible),
                "not_in_any_wave": len(plan.compatible) - rank,
            },
        )
    return rollout


def _locked(rollout_id: int) -> Rollout:
    rollout = Rollout.objects.select_for_update().filter(pk=rollout_id).first()
    if rollout is None:
        raise ApiError(f"no rollout {rollout_id}", code="not_found", status_code=404)
    return rollout


def _require_state(rollout: Rollout, allowed: tuple, verb: str) -> None:
    if rollout.state not in allowed:
        raise Conflict(
            f"cannot {verb} rollout {rollout.pk}: it is {rollout.state} (allowed when {', '.join(allowed)})",
            code="invalid_state",
            state=rollout.state,
        )


def _wake(rollout_id: int) -> None:
    from ota import tasks

    def enqueue():
        try:
            tasks.evaluate_rollout.delay(rollout_id)
        except Exception:  # the change is committed; the beat tick evaluates it anyway
            logger.exception("could not enqueue evaluation of rollout %s; the beat tick will", rollout_id)

    transaction.on_commit(enqueue)


def rollout_approve(*, rollout_id: int, actor: str) -> Rollout:
    with transaction.atomic():
        rollout = _locked(rollout_id)
        _require_state(rollout, (Rollout.State.CREATED,), "approve")
        if rollout.approved_at:
            raise Conflict(f"rollout {rollout.pk} was already approved by {rollout.approved_by}", code="already_approved")
        rollout.approved_at, rollout.approved_by = timezone.now(), actor
        rollout.save(update_fields=["approved_at", "approved_by"])
        audit_record(actor=actor, action="rollout.approve", rollout=rollout)
    return rollout


def rollout_start(*, rollout_id: int, actor: str) -> Rollout:
    with transaction.atomic():
        rollout = _locked(rollout_id)
        _require_state(rollout, (Rollout.State.CREATED,), "start")
        if rollout.requires_approval and not rollout.approved_at:
            raise Conflict(
                f"rollout {rollout.pk} requires approval before start; an operator must POST .../approve",
                code="approval_required",
            )
        # Starts of the same model queue up here: two starts in flight at once would each pass
        # the conflict check before the other committed, and a device would get two rollouts.
        Model.objects.select_for_update().filter(pk=rollout.model_id).first()
        device_ids = list(rollout.assignments.values_list("device_id", flat=True))
        _raise_conflicts(conflicts_find(model_id=rollout.model_id, device_ids=device_ids, exclude_rollout=rollout.pk))
        rollout.state = Rollout.State.RUNNING
        rollout.started_at, rollout.started_by = timezone.now(), actor
        rollout.save(update_fields=["state", "started_at", "started_by"])
        audit_record(actor=actor, action="rollout.start", rollout=rollout, detail={"devices": len(device_ids)})
        _wake(rollout.pk)
    return rollout


def rollout_pause(*, rollout_id: int, actor: str, reason: str = "") -> Rollout:
    with transaction.atomic():
        rollout = _locked(rollout_id)
        _require_state(rollout, (Rollout.State.RUNNING,), "pause")
        _set_state(rollout, Rollout.State.PAUSED, reason or f"paused by {actor}")
        audit_record(actor=actor, action="rollout.pause", rollout=rollout, reason=reason)
    return rollout


def rollout_resume(*, rollout_id: int, actor: str) -> Rollout:
    with transaction.atomic():
        rollout = _locked(rollout_id)
        _require_state(rollout, (Rollout.State.PAUSED,), "resume")
        _set_state(rollout, Rollout.State.RUNNING, f"resumed by {actor}")
        audit_record(actor=actor, action="rollout.resume", rollout=rollout)
        _wake(rollout.pk)
    return rollout


def rollout_advance(*, rollout_id: int, actor: str) -> Rollout:
    """Pass the current wave now, whatever its gates say, and start the next one."""
    with transaction.atomic():
        rollout = _locked(rollout_id)
        _require_state(rollout, Rollout.ACTIVE_STATES, "advance")
        wave = rollout.waves.filter(index=rollout.current_wave).first()
        if wave is None or wave.state not in (Wave.State.RUNNING, Wave.State.SOAKING, Wave.State.PENDING):
            raise Conflict(f"rollout {rollout.pk} has no wave in progress to advance", code="invalid_state")
        figures = wave_figures(wave)
        _wave_pass(rollout, wave, actor=actor, reason=f"advanced by {actor} before its gates", figures=figures)
        _wake(rollout.pk)
    return rollout


def rollout_retry_failed(*, rollout_id: int, actor: str) -> int:
    """Queue every failed device of the started waves again (a fresh directive, new seq)."""
    with transaction.atomic():
        rollout = _locked(rollout_id)
        _require_state(rollout, Rollout.ACTIVE_STATES, "retry failed devices of")
        now = timezone.now()
        count = RolloutDevice.objects.filter(rollout=rollout, state__in=RolloutDevice.FAILURES).update(
            state=RD.QUEUED, queued_at=now, error_code="", detail="", updated_at=now
        )
        if count:
            # A tripped gate would trip again at once on the old failures; start the count afresh.
            Wave.objects.filter(rollout=rollout, index=rollout.current_wave, state=Wave.State.HALTED).update(
                state=Wave.State.RUNNING
            )
        audit_record(actor=actor, action="rollout.retry", rollout=rollout, reason=f"{count} failed devices queued again", detail={"devices": count})
        _wake(rollout.pk)
    return count


def rollout_abort(*, rollout_id: int, actor: str, reason: str = "") -> Rollout:
    with transaction.atomic():
        rollout = _locked(rollout_id)
        _require_state(rollout, Rollout.OPEN_STATES, "abort")
        _abort(rollout, reason=reason or f"aborted by {actor}")
        audit_record(actor=actor, action="rollout.abort", rollout=rollout, reason=reason)
    return rollout


def rollout_rollback(*, rollout_id: int, actor: str, reason: str = "") -> Rollout:
    """Send every device this rollout updated (or may have) back to its previous release."""
    with transaction.atomic():
        rollout = _locked(rollout_id)
        _require_state(
            rollout, (*Rollout.ACTIVE_STATES, Rollout.State.COMPLETED, Rollout.State.ABORTED), "roll back"
        )
        if rollout.state in Rollout.ACTIVE_STATES:
            _abort(rollout, reason=reason or f"rolled back by {actor}")
        figures = _revert(rollout)
        _set_state(rollout, Rollout.State.ROLLED_BACK, reason or f"rolled back by {actor}")
        audit_record(actor=actor, action="rollout.rollback", rollout=rollout, reason=reason, detail=figures)
    return rollout


def _set_state(rollout: Rollout, state: str, reason: str) -> None:
    rollout.state = state
    rollout.state_reason = reason
    fields = ["state", "state_reason"]
    if state in (Rollout.State.COMPLETED, Rollout.State.ABORTED, Rollout.State.ROLLED_BACK) and not rollout.finished_at:
        rollout.finished_at = timezone.now()
        fields.append("finished_at")
    rollout.save(update_fields=fields)


def _abort(rollout: Rollout, *, reason: str) -> None:
    now = timezone.now()
    # Directed but silent (typically offline): take the directive back so they never install a
    # release the rollout gave up on. A revert, if any, then publishes over the cleared topic.
    directives_withdraw(
        device_ids=list(RolloutDevice.objects.filter(rollout=rollout, state=RD.DIRECTED).values_list("device_id", flat=True))
    )
    RolloutDevice.objects.filter(rollout=rollout, state__in=(RD.PLANNED, RD.QUEUED)).update(
        state=RD.SKIPPED, updated_at=now
    )
    Wave.objects.filter(rollout=rollout, state__in=(Wave.State.RUNNING, Wave.State.SOAKING)).update(
        state=Wave.State.HALTED, finished_at=now
    )
    _set_state(rollout, Rollout.State.ABORTED, reason)


def _previous_release(assignment: RolloutDevice) -> ModelVersion | None:
    return assignment.previous_version


def _revert(rollout: Rollout) -> dict:
    """New directives pointing each touched device back at the release it ran before."""
    candidates = list(
        RolloutDevice.objects.filter(
            rollout=rollout, state__in=(*RolloutDevice.IN_FLIGHT, RD.COMMITTED, RD.TIMED_OUT, RD.UNHEALTHY)
        ).select_related("device", "previous_version__model")
    )
    requests, sent, without_previous, below_floor = [], [], [], []
    floor = rollout.release.rollback_floor
    available = set(
        Artifact.objects.filter(version_id__in={a.previous_version_id for a in candidates if a.previous_version_id})
        .values_list("version_id", "hardware_id")
    )
    for a in candidates:
        prev = a.previous_version
        if prev is None or (prev.pk, a.device.hardware_id) not in available or not prev.envelope:
            without_previous.append(a.device_id)
            continue
        if prev.counter < floor:
            below_floor.append(a.device_id)
            continue
        requests.append(DirectiveRequest(device_id=a.device_id, hardware=a.device.hardware_id, version=prev))
        sent.append(a)
    issued = directives_issue(requests=requests, rollout_id=rollout.pk, kind=Directive.Kind.REVERT)
    now = timezone.now()
    for a in sent:
        d = issued.get(a.device_id)
        if d is None:
            continue
        a.state, a.revert_seq, a.revert_directed_at, a.updated_at = RD.REVERTING, d.seq, now, now
    bulk_set(sent, ["state", "revert_seq", "revert_directed_at", "updated_at"])
    if without_previous:
        RolloutDevice.objects.filter(pk__in=[a.pk for a in candidates if a.device_id in set(without_previous)]).update(
            detail="cannot revert: no previous release with an artifact for this hardware"
        )
    rollout.reverted_at = now
    rollout.save(update_fields=["reverted_at"])
    return {
        "revert_directives": len(issued),
        "no_previous_release": without_previous[:100],
        "below_rollback_floor": below_floor[:100],
    }


# --- events ------------------------------------------------------------------------------------

_PHASE_FIELD = {
    RD.RECEIVED: "received_at",
    RD.DOWNLOADING: "download_started_at",
    RD.VERIFYING: "verify_started_at",
    RD.PRECHECKING: "verify_started_at",
    RD.ACTIVATING: "activate_started_at",
    RD.TRIAL: "trial_started_at",
}
_REVERT_OUTCOME = {"committed": RD.REVERTED, "failed": RD.REVERT_FAILED, "rolled_back": RD.REVERT_FAILED, "rejected": RD.REVERT_FAILED}
_TERMINAL = {RD.COMMITTED, *RolloutDevice.FAILURES, RD.SKIPPED, RD.REVERTED, RD.REVERT_FAILED}


def rollout_apply_events(*, event_ids: list[int]) -> set[int]:
    """Fold stored device events into rollout assignments. Returns the rollout ids touched.

    Idempotent: an event whose number is not above the assignment's last one changes nothing.
    """
    events = list(
        DeviceEvent.objects.filter(pk__in=event_ids)
        .exclude(seq=0)
        .order_by("event_no")
        .values("device_id", "seq", "event_no", "state", "error_code", "detail", "received_at", "health")
    )
    if not events:
        return set()
    keys = {(e["device_id"], e["seq"]) for e in events}
    device_ids = {d for d, _ in keys}
    seqs = {s for _, s in keys}
    touched: set[int] = set()
    with transaction.atomic():
        candidates = RolloutDevice.objects.filter(device_id__in=device_ids).filter(Q(seq__in=seqs) | Q(revert_seq__in=seqs))
        rollout_ids = sorted(set(candidates.values_list("rollout_id", flat=True)))
        # Lock the rollouts (in id order, so no deadlock) before their assignments: the engine
        # evaluates under the same lock and must not see half a batch.
        list(Rollout.objects.select_for_update().filter(pk__in=rollout_ids).order_by("pk").values_list("pk", flat=True))
        by_update = {}
        by_revert = {}
        for a in candidates.select_for_update(of=("self",)).select_related("wave").order_by("pk"):
            if a.seq is not None:
                by_update[(a.device_id, a.seq)] = a
            if a.revert_seq is not None:
                by_revert[(a.device_id, a.revert_seq)] = a
        changed: dict[int, RolloutDevice] = {}
        for e in events:
            key = (e["device_id"], e["seq"])
            if key in by_revert:
                a = by_revert[key]
                if a.state != RD.REVERTING or e["event_no"] <= a.last_event_no:
                    continue
                outcome = _REVERT_OUTCOME.get(e["state"])
                a.last_event_no = e["event_no"]
                if outcome:
                    a.state = outcome
                    a.reverted_at = e["received_at"]
                    if outcome == RD.REVERT_FAILED:
                        a.error_code, a.detail = e["error_code"], e["detail"][:2000]
                changed[a.pk] = a
                continue
            a = by_update.get(key)
            if a is None or e["event_no"] <= a.last_event_no:
                continue
            a.last_event_no = e["event_no"]
            changed[a.pk] = a
            new_state = RolloutDevice.FROM_EVENT.get(e["state"])
            if new_state is None or a.state in _TERMINAL or a.state == RD.REVERTING:
                # Late news about a device already decided (timed out, reverted) is kept as
                # detail but never flips the outcome the gates already counted.
                continue
            if new_state == RD.COMMITTED:
                broken = health_gate_broken(a.wave.gates, e["health"])
                if broken:
                    new_state = RD.UNHEALTHY
                    e = {**e, "error_code": "HEALTH_GATE", "detail": broken}
            a.state = new_state
            stamp = _PHASE_FIELD.get(new_state)
            if stamp and getattr(a, stamp) is None:
                setattr(a, stamp, e["received_at"])
            if new_state in _TERMINAL:
                a.finished_at = e["received_at"]
                a.error_code, a.detail = e["error_code"] or "", (e["detail"] or "")[:2000]
        now = timezone.now()
        for a in changed.values():
            a.updated_at = now
            touched.add(a.rollout_id)
        bulk_set(
            list(changed.values()),
            [
                "state", "last_event_no", "received_at", "download_started_at", "verify_started_at",
                "activate_started_at", "trial_started_at", "finished_at", "reverted_at", "error_code",
                "detail", "updated_at",
            ],
        )
    return touched


# --- the wave engine ---------------------------------------------------------------------------


def wave_figures(wave: Wave) -> dict:
    counts = Counter(dict(wave.assignments.values_list("state").annotate(n=Count("id")).order_by()))
    failed = sum(counts.get(s, 0) for s in RolloutDevice.FAILURES)
    committed = counts.get(RD.COMMITTED, 0)
    reported = committed + failed
    size = wave.size
    return {
        "size": size,
        "committed": committed,
        "failed": failed,
        "reported": reported,
        "in_flight": sum(counts.get(s, 0) for s in RolloutDevice.IN_FLIGHT),
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


def rollout_evaluate(*, rollout_id: int) -> str:
    """One engine step for one rollout. Safe to run any number of times, on any worker.

    Returns a short word on what happened (for logs and tests).
    """
    with transaction.atomic():
        rollout = Rollout.objects.select_for_update(skip_locked=True).filter(pk=rollout_id).first()
        if rollout is None:
            return "busy-or-missing"  # another worker holds it and will leave it evaluated
        if rollout.state != Rollout.State.RUNNING:
            return rollout.state
        outcome = "idle"
        for _ in range(64):  # bounded: each pass either stops or moves to the next wave
            wave = rollout.waves.filter(index=rollout.current_wave).first()
            if wave is None:
                _set_state(rollout, Rollout.State.COMPLETED, "every wave passed its gates")
                audit_record(actor=SYSTEM, action="rollout.complete", rollout=rollout, reason="every wave passed its gates")
                outcome = "completed"
                break
            if wave.state == Wave.State.PENDING:
                _wave_start(rollout, wave)
            _timeouts_apply(rollout, wave)
            sent = _dispatch(rollout, wave)
            if sent:
                outcome = "dispatched"
            figures = wave_figures(wave)
            tripped = failure_gate_tripped(wave.gates, figures)
            if tripped:
                _gate_trip(rollout, wave, tripped, figures)
                outcome = "gate-tripped"
                break
            if wave.state == Wave.State.RUNNING and success_gate_met(wave.gates, figures):
                wave.state, wave.gate_met_at = Wave.State.SOAKING, timezone.now()
                wave.save(update_fields=["state", "gate_met_at"])
                audit_record(
                    actor=SYSTEM, action="wave.gate_met", rollout=rollout,
                    reason=f"wave {wave.index}: {figures['healthy_percent']}% healthy >= "
                    f"{wave.gates['success']['min_healthy_percent']}%; soaking {wave.gates['soak_seconds']}s",
                    detail={"wave": wave.index, **figures},
                )
            elif wave.state == Wave.State.SOAKING and not success_gate_met(wave.gates, figures):
                wave.state, wave.gate_met_at = Wave.State.RUNNING, None
                wave.save(update_fields=["state", "gate_met_at"])
            if wave.state == Wave.State.SOAKING and timezone.now() >= wave.gate_met_at + timedelta(
                seconds=wave.gates["soak_seconds"]
            ):
                _wave_pass(rollout, wave, actor=SYSTEM, reason="success gate held through the soak time", figures=figures)
                outcome = "advanced"
                continue
            break
        rollout.evaluated_at = timezone.now()
        rollout.save(update_fields=["evaluated_at"])
        return outcome


def _wave_start(rollout: Rollout, wave: Wave) -> None:
    now = timezone.now()
    claimed = Wave.objects.filter(pk=wave.pk, state=Wave.State.PENDING).update(state=Wave.State.RUNNING, started_at=now)
    if not claimed:
        return
    wave.state, wave.started_at = Wave.State.RUNNING, now
    queued = RolloutDevice.objects.filter(wave=wave, state=RD.PLANNED).update(state=RD.QUEUED, queued_at=now, updated_at=now)
    audit_record(
        actor=SYSTEM, action="wave.start", rollout=rollout,
        reason=f"wave {wave.index} ({wave.spec.get('name') or wave.spec}) started with {queued} devices",
        detail={"wave": wave.index, "devices": queued},
    )


def _wave_pass(rollout: Rollout, wave: Wave, *, actor: str, reason: str, figures: dict) -> None:
    now = timezone.now()
    claimed = Wave.objects.filter(
        pk=wave.pk, state__in=(Wave.State.PENDING, Wave.State.RUNNING, Wave.State.SOAKING)
    ).update(state=Wave.State.PASSED, finished_at=now)
    if not claimed:
        return
    wave.state = Wave.State.PASSED
    # Devices of a forced wave that never got their directive stay queued: the next waves go on
    # and they go out with them (the engine dispatches every queued device of the rollout).
    Rollout.objects.filter(pk=rollout.pk, current_wave=wave.index).update(current_wave=wave.index + 1)
    rollout.current_wave = wave.index + 1
    audit_record(
        actor=actor, action="wave.pass", rollout=rollout, reason=f"wave {wave.index}: {reason}",
        detail={"wave": wave.index, **figures},
    )


def _gate_trip(rollout: Rollout, wave: Wave, reason: str, figures: dict) -> None:
    policy = rollout.abort_policy
    detail = {"wave": wave.index, "policy": policy, **figures}
    if policy == Rollout.AbortPolicy.PAUSE:
        _set_state(rollout, Rollout.State.PAUSED, f"failure gate: {reason}")
        audit_record(actor=SYSTEM, action="rollout.auto_pause", rollout=rollout, reason=f"wave {wave.index} failure gate: {reason}", detail=detail)
        return
    _abort(rollout, reason=f"failure gate: {reason}")
    if policy == Rollout.AbortPolicy.REVERT:
        detail.update(_revert(rollout))
    audit_record(
        actor=SYSTEM, action="rollout.auto_abort" if policy == Rollout.AbortPolicy.ABORT else "rollout.auto_revert",
        rollout=rollout, reason=f"wave {wave.index} failure gate: {reason}", detail=detail,
    )


def _timeouts_apply(rollout: Rollout, wave: Wave) -> None:
    timeouts = wave.gates["timeouts"]
    now = timezone.now()
    rules = (
        ("download", Q(state__in=(RD.RECEIVED, RD.DOWNLOADING)), "received_at", timeouts["download_seconds"]),
        ("activate", Q(state__in=(RD.VERIFYING, RD.PRECHECKING, RD.ACTIVATING)), "verify_started_at", timeouts["activate_seconds"]),
        ("trial", Q(state=RD.TRIAL), "trial_started_at", timeouts["trial_seconds"]),
    )
    expired_total = {}
    for phase, cond, since, seconds in rules:
        cutoff = now - timedelta(seconds=seconds)
        qs = RolloutDevice.objects.filter(cond, rollout=rollout, **{f"{since}__lt": cutoff})
        ids = list(qs.values_list("device_id", flat=True)[:1000])
        if not ids:
            continue
        qs.filter(device_id__in=ids).update(
            state=RD.TIMED_OUT, error_code=f"TIMEOUT_{phase.upper()}", finished_at=now, updated_at=now,
            detail=f"no progress past {phase} within {seconds}s",
        )
        expired_total[phase] = ids
    if expired_total:
        audit_record(
            actor=SYSTEM, action="devices.timeout", rollout=rollout,
            reason="; ".join(f"{len(v)} devices exceeded the {k} timeout" for k, v in expired_total.items()),
            detail={"wave": wave.index, **{k: v[:100] for k, v in expired_total.items()}},
        )


def _dispatch(rollout: Rollout, wave: Wave) -> int:
    """Sign and send directives for queued devices, within the rate cap."""
    rate = wave.gates.get("rate_per_minute")
    now = timezone.now()
    limit = None
    if rate:
        recent = RolloutDevice.objects.filter(rollout=rollout, directed_at__gte=now - timedelta(seconds=60)).count()
        limit = max(0, rate - recent)
        if limit == 0:
            return 0
    queued = RolloutDevice.objects.filter(rollout=rollout, state=RD.QUEUED).select_related("device").order_by("rank")
    if limit is not None:
        queued = queued[:limit]
    batch = list(queued[:5000])
    if not batch:
        return 0
    release = rollout.release
    states = {
        s.device_id: s
        for s in DeviceModelState.objects.filter(device_id__in=[a.device_id for a in batch], model_id=rollout.model_id)
    }
    previous_by_sha = _versions_by_sha(rollout.model_id, {s.active_sha256 for s in states.values() if s.active_sha256})
    requests = [DirectiveRequest(device_id=a.device_id, hardware=a.device.hardware_id, version=release) for a in batch]
    issued = directives_issue(requests=requests, rollout_id=rollout.pk, kind=Directive.Kind.UPDATE)
    for a in batch:
        directive = issued.get(a.device_id)
        state = states.get(a.device_id)
        if state is not None and a.previous_version_id is None and a.seq is None:
            a.previous_version_id = state.active_version_id or previous_by_sha.get(state.active_sha256)
            a.previous_sha256 = state.active_sha256
        if directive is None:
            a.state, a.detail = RD.SKIPPED, "device was revoked before its directive went out"
        else:
            a.state, a.seq = RD.DIRECTED, directive.seq
            a.attempts += 1
            a.received_at = a.download_started_at = a.verify_started_at = None
            a.activate_started_at = a.trial_started_at = a.finished_at = None
        a.directed_at = a.updated_at = now
    bulk_set(
        batch,
        [
            "state", "seq", "attempts", "previous_version", "previous_sha256", "directed_at", "updated_at", "detail",
            "received_at", "download_started_at", "verify_started_at", "activate_started_at",
            "trial_started_at", "finished_at",
        ],
    )
    return len(issued)


def _versions_by_sha(model_id: int, shas: set[str]) -> dict[str, int]:
    if not shas:
        return {}
    return dict(
        Artifact.objects.filter(version__model_id=model_id, sha256__in=shas).values_list("sha256", "version_id")
    )


def events_concern_rollouts(*, event_ids: list[int]) -> bool:
    """Whether any of these events' devices has an update or revert in progress (one query)."""
    devices = DeviceEvent.objects.filter(pk__in=event_ids).exclude(seq=0).values("device_id")
    return RolloutDevice.objects.filter(
        device_id__in=devices, state__in=(*RolloutDevice.IN_FLIGHT, RD.REVERTING)
    ).exists()


def rollout_catch_up_events(*, rollout_id: int) -> set[int]:
    """Apply stored events the event-driven path missed (Redis down when ingest enqueued,
    a task lost): every device report reaches the gates, if only on the next tick."""
    waiting = list(
        RolloutDevice.objects.filter(rollout_id=rollout_id)
        .filter(Q(state__in=RolloutDevice.IN_FLIGHT, seq__isnull=False) | Q(state=RD.REVERTING))
        .values_list("device_id", "seq", "revert_seq", "last_event_no")
    )
    if not waiting:
        return set()
    wanted = {}
    for device_id, seq, revert_seq, last in waiting:
        for s in (seq, revert_seq):
            if s is not None:
                wanted[(device_id, s)] = last
    candidates = DeviceEvent.objects.filter(
        device_id__in={d for d, _ in wanted}, seq__in={s for _, s in wanted}
    ).values_list("pk", "device_id", "seq", "event_no")
    ids = [pk for pk, d, s, n in candidates if (d, s) in wanted and n > wanted[(d, s)]]
    return rollout_apply_events(event_ids=ids) if ids else set()


def rollouts_due() -> list[int]:
    return list(Rollout.objects.filter(state=Rollout.State.RUNNING).values_list("pk", flat=True))


# --- reading -----------------------------------------------------------------------------------


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
