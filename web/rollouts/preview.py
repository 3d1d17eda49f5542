"""Read-only queries behind the wizard: the live target preview and the review page, both dry
runs of ota.rollouts.planning.rollout_plan, the plan rollout_create runs. Nothing is created."""

from __future__ import annotations

from django.core.exceptions import ValidationError

from ota.rollouts.definition import wave_describe
from ota.rollouts.planning import rollout_plan


def target_preview(form) -> dict:
    """Per hardware: how many active devices the target matches and how many of them the release
    has no artifact for; with a wave plan, each wave's size. The plan is ota.rollouts.planning's
    rollout_plan, the one rollout_create runs."""
    data = getattr(form, "cleaned_data", {})
    # A release not chosen yet is not an error here, just a reason to wait.
    wanted = (*form.TARGET_FIELDS, "release") if form.data.get("release") else form.TARGET_FIELDS
    errors = {k: v for k, v in form.errors.items() if k in wanted}
    release = form.release_obj if "release" in data else None
    result: dict = {"errors": [str(e) for v in errors.values() for e in v], "rows": [], "ready": False}
    if errors:
        return result
    if not any(data.get(f) for f in form.TARGET_FIELDS):
        result["hint"] = "Choose labels, hardware or devices to see how many devices match."
        return result
    if release is None:
        result["hint"] = "Pick a released version to see which devices can take it."
        return result
    waves = data.get("waves") or None
    try:
        plan = rollout_plan(release=release, target=form.target_spec(), waves=waves)
    except ValidationError as exc:
        wave_errors = {k: v for k, v in exc.message_dict.items() if k.startswith("waves")}
        if waves is None or len(wave_errors) < len(exc.message_dict):
            result["errors"] = [m for msgs in exc.message_dict.values() for m in msgs]
            return result
        # The target is fine and only the wave plan is not: show the target's figures anyway.
        result["wave_errors"] = [m for msgs in wave_errors.values() for m in msgs]
        waves = None
        plan = rollout_plan(release=release, target=form.target_spec())
    resolved = plan.resolved
    per_hw: dict[str, dict] = {}
    for _, hw in resolved.targeted:
        per_hw.setdefault(hw, {"hardware": hw, "matched": 0, "incompatible": 0})["matched"] += 1
    for item in resolved.incompatible:
        per_hw[item["hardware"]]["incompatible"] += 1
    result.update(
        ready=True,
        rows=sorted(per_hw.values(), key=lambda r: r["hardware"]),
        matched=len(resolved.targeted),
        incompatible=len(resolved.incompatible),
        compatible=len(resolved.compatible),
        busy=plan.busy,
        busy_rollouts=sorted(plan.conflicts),
    )
    if waves is not None:
        result["waves"] = [{"spec": wave_describe(s), "size": n} for s, n in zip(plan.waves, plan.sizes)]
    return result


def rollout_dry_run(form) -> dict:
    """The review page: everything rollout_create checks (rollout_plan), without creating.
    Raises django's ValidationError like the create does."""
    plan = rollout_plan(
        release=form.release_obj, target=form.target_spec(), waves=form.cleaned_data["waves"], gates=form.gates_spec(),
        **form.schedule_spec(),
    )
    resolved = plan.resolved
    return {
        "release": plan.release,
        "target": plan.target,
        "gates": plan.gates,
        "waves": [{"label": wave_describe(s), "size": n} for s, n in zip(plan.waves, plan.sizes)],
        "matched": len(resolved.targeted),
        "compatible": len(resolved.compatible),
        "incompatible": resolved.incompatible,
        "planned": sum(plan.sizes),
        "busy": plan.busy,
        "busy_rollouts": sorted(plan.conflicts),
        "windows": plan.windows,
        "label_windows": plan.label_windows,
        "start_at": plan.start_at,
    }
