"""Creating a rollout: validate the definition, plan the waves, store it in state `created`, and
ask for the delta artifacts its devices will want (built by a worker before it starts)."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import connection, transaction

from ota.models import Rollout, RolloutDevice, Wave
from ota.rollouts.deltas import deltas_request_for
from ota.rollouts.planning import conflicts_find, raise_conflicts, rollout_plan
from registry.audit import audit_record
from registry.models import Model, ModelVersion
from registry.validity import release_require_installable


def rollout_create(
    *,
    model: str,
    version: str,
    target: dict,
    waves: list,
    gates: dict | None = None,
    abort_policy: str = Rollout.AbortPolicy.PAUSE,
    requires_approval: bool = False,
    follow_target: bool = False,
    name: str = "",
    windows: list | None = None,
    label_windows: list | None = None,
    start_at=None,
    actor: str,
) -> Rollout:
    """`windows` / `label_windows`: maintenance windows (ota.rollouts.definition); `start_at`: when
    the rollout begins once started (started earlier, it is scheduled)."""
    model_obj = Model.objects.filter(name=model).first()
    if model_obj is None:
        raise ValidationError({"model": f"no model named {model!r}"})
    release = ModelVersion.objects.filter(model=model_obj, version=version).select_related("model").first()
    if release is None:
        raise ValidationError({"version": f"model {model!r} has no version {version!r}"})
    release_require_installable(release)
    if abort_policy not in Rollout.AbortPolicy.values:
        raise ValidationError({"abort_policy": f"must be one of {', '.join(Rollout.AbortPolicy.values)}, got {abort_policy!r}"})
    planned = rollout_plan(release=release, target=target, waves=waves, gates=gates, windows=windows,
                           label_windows=label_windows, start_at=start_at)
    plan, wave_specs = planned.resolved, planned.waves
    with transaction.atomic():
        rollout = Rollout.objects.create(
            name=name,
            release=release,
            model=model_obj,
            target=planned.target,
            waves_spec=[{k: v for k, v in s.items() if k != "effective_gates"} for s in wave_specs],
            gates=planned.gates,
            abort_policy=abort_policy,
            requires_approval=requires_approval,
            follow_target=follow_target,
            incompatible=plan.incompatible,
            windows=planned.windows,
            label_windows=planned.label_windows,
            start_at=planned.start_at,
            created_by=actor,
        )
        members = planned.members(rollout_id=rollout.pk)
        raise_conflicts(conflicts_find(model_id=model_obj.pk, device_ids=[d for m in members for d in m]))
        waves = []
        for index, (spec, devices) in enumerate(zip(wave_specs, members)):
            wave = Wave.objects.create(
                rollout=rollout, index=index, spec={k: v for k, v in spec.items() if k != "effective_gates"},
                gates=spec["effective_gates"], size=len(devices),
            )
            waves.append((wave, devices))
        rank = assignments_insert(rollout=rollout, waves=waves)
        deltas_request_for(release=release, device_ids=[d for m in members for d in m])
        audit_record(
            actor=actor,
            action="rollout.create",
            obj=rollout,
            reason=f"{release} to {rank} devices in {len(members)} waves.",
            detail={
                "release": str(release),
                "wave_sizes": [len(m) for m in members],
                "targeted": len(plan.targeted),
                "incompatible": len(plan.incompatible),
                "not_in_any_wave": len(plan.compatible) - rank,
                **({"windows": planned.windows} if planned.windows else {}),
                **({"label_windows": planned.label_windows} if planned.label_windows else {}),
                **({"start_at": planned.start_at.isoformat()} if planned.start_at else {}),
            },
        )
    return rollout


def assignments_insert(*, rollout: Rollout, waves: list[tuple[Wave, list[str]]], batch_size: int = 20_000) -> int:
    """Write a new rollout's device assignments, ranked in wave order; returns how many.

    On PostgreSQL one INSERT ... SELECT FROM unnest(...) per batch: the columns every row shares
    (state, counters, empty timestamps) are bound once, the wave, device and rank as three arrays.
    Django's bulk_create prepares every field of every row: 12 s of CPU for a 75,000-device
    rollout, during which the request holds a web worker. Other databases use bulk_create.
    """
    rows = [(wave.pk, device_id) for wave, devices in waves for device_id in devices]
    if not rows:
        return 0
    if connection.vendor != "postgresql":
        by_pk = {wave.pk: wave for wave, _ in waves}
        RolloutDevice.objects.bulk_create(
            [RolloutDevice(rollout=rollout, wave=by_pk[w], device_id=d, rank=r) for r, (w, d) in enumerate(rows)],
            batch_size=2000,
        )
        return len(rows)
    meta = RolloutDevice._meta
    varying = [meta.get_field("wave"), meta.get_field("device"), meta.get_field("rank")]
    template = RolloutDevice(rollout=rollout, wave=waves[0][0], device_id="", rank=0)
    shared = [f for f in meta.concrete_fields if f not in varying and not f.primary_key]
    qn = connection.ops.quote_name
    shared_params = [f.get_db_prep_save(f.pre_save(template, True), connection) for f in shared]
    columns = ", ".join(qn(f.column) for f in [*shared, *varying])
    selected = ", ".join([*(f"%s::{f.cast_db_type(connection)}" for f in shared), "u.w", "u.d", "u.r"])
    arrays = ", ".join(f"%s::{f.cast_db_type(connection)}[]" for f in varying)
    sql = f"INSERT INTO {qn(meta.db_table)} ({columns}) SELECT {selected} FROM unnest({arrays}) AS u(w, d, r)"
    with connection.cursor() as cursor:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            cursor.execute(sql, [*shared_params, [w for w, _ in chunk], [d for _, d in chunk],
                                 list(range(start, start + len(chunk)))])
    return len(rows)
