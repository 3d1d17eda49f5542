"""Creating a rollout: validate the definition, plan the waves, store it in state `created`."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import transaction

from ota.models import Rollout, RolloutDevice, Wave
from ota.rollouts.planning import conflicts_find, raise_conflicts, rollout_plan
from registry.audit import audit_record
from registry.models import Model, ModelVersion


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
    actor: str,
) -> Rollout:
    model_obj = Model.objects.filter(name=model).first()
    if model_obj is None:
        raise ValidationError({"model": f"no model named {model!r}"})
    release = ModelVersion.objects.filter(model=model_obj, version=version).select_related("model").first()
    if release is None:
        raise ValidationError({"version": f"model {model!r} has no version {version!r}"})
    if abort_policy not in Rollout.AbortPolicy.values:
        raise ValidationError({"abort_policy": f"must be one of {', '.join(Rollout.AbortPolicy.values)}, got {abort_policy!r}"})
    planned = rollout_plan(release=release, target=target, waves=waves, gates=gates)
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
            created_by=actor,
        )
        members = planned.members(rollout_id=rollout.pk)
        raise_conflicts(conflicts_find(model_id=model_obj.pk, device_ids=[d for m in members for d in m]))
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
            obj=rollout,
            reason=f"{release} to {rank} devices in {len(members)} waves.",
            detail={
                "release": str(release),
                "wave_sizes": [len(m) for m in members],
                "targeted": len(plan.targeted),
                "incompatible": len(plan.incompatible),
                "not_in_any_wave": len(plan.compatible) - rank,
            },
        )
    return rollout
