"""State changes of a rollout shared by the operator actions and the engine: the row lock,
the allowed-state check, setting a state, halting (abort) and sending devices back (revert).

Every mutation of a rollout takes its row lock first (SELECT ... FOR UPDATE), so operator
actions, event application and engine evaluation on any number of workers serialise per
rollout; state changes are additionally conditional UPDATEs, so a duplicate task delivery is a
no-op. Side effects (directive publishing, waking the engine) run in transaction.on_commit.
"""

from __future__ import annotations

from django.utils import timezone

from ota.db import bulk_set
from ota.models import Directive, Rollout, RolloutDevice, Wave
from ota.rollouts.catalogue import RolloutAction
from ota.rollouts.directives import DirectiveRequest, directives_issue, directives_withdraw
from ota.rollouts.planning import conflicts_find, raise_conflicts
from registry.errors import ApiError, Conflict
from registry.models import Artifact, Model
from registry.validity import release_refusal, release_require_installable

RD = RolloutDevice.State


def rollout_locked(rollout_id: int) -> Rollout:
    rollout = Rollout.objects.select_for_update().filter(pk=rollout_id).first()
    if rollout is None:
        raise ApiError(f"no rollout {rollout_id}", code="not_found", status_code=404)
    return rollout


def rollout_require_state(rollout: Rollout, action: RolloutAction) -> None:
    """Refuse (409 invalid_state) an action the catalogue does not allow in the rollout's state."""
    if rollout.state not in action.states:
        raise Conflict(
            f"cannot {action.verb} rollout {rollout.pk}: it is {rollout.state} (allowed when {', '.join(action.states)})",
            code="invalid_state",
            state=rollout.state,
        )


def rollout_require_startable(rollout: Rollout) -> int:
    """What a start (or a scheduled one, when due) checks: approval if required, a release every
    agent would still take, and no device of it owned by another scheduled, running or paused
    rollout of the model (Conflict, ApiError). Returns how many devices it has."""
    if rollout.requires_approval and not rollout.approved_at:
        raise Conflict(
            f"rollout {rollout.pk} requires approval before start; an operator must POST .../approve",
            code="approval_required",
        )
    # Revoked or expired since the rollout was created: every agent would refuse it.
    release_require_installable(rollout.release)
    # Starts of the same model queue up here: two starts in flight at once would each pass
    # the conflict check before the other committed, and a device would get two rollouts.
    Model.objects.select_for_update().filter(pk=rollout.model_id).first()
    device_ids = list(rollout.assignments.values_list("device_id", flat=True))
    raise_conflicts(conflicts_find(model_id=rollout.model_id, device_ids=device_ids, exclude_rollout=rollout.pk))
    return len(device_ids)


def rollout_set_state(rollout: Rollout, state: str, reason: str) -> None:
    rollout.state = state
    rollout.state_reason = reason
    fields = ["state", "state_reason"]
    if state in (Rollout.State.COMPLETED, Rollout.State.ABORTED, Rollout.State.ROLLED_BACK) and not rollout.finished_at:
        rollout.finished_at = timezone.now()
        fields.append("finished_at")
    rollout.save(update_fields=fields)


def rollout_halt(rollout: Rollout, *, reason: str) -> dict:
    """Stop the rollout (aborted): withdraw directives not picked up, skip devices not yet sent,
    halt the wave, and cancel updates parked until a maintenance window opens: those devices
    downloaded the release but have not activated it, and an aborted rollout must not switch
    them hours later, so each gets a directive for the release it runs (a revert, which
    supersedes the parked update and changes nothing on the box). Returns what that sent."""
    now = timezone.now()
    cancelled = rollout_revert_devices(rollout, states=(RD.WAITING_FOR_WINDOW,), stamp=False)
    # Directed but silent (typically offline): take the directive back so they never install a
    # release the rollout gave up on. A revert, if any, then publishes over the cleared topic.
    directives_withdraw(
        device_ids=list(
            RolloutDevice.objects.filter(rollout=rollout, state__in=RolloutDevice.NOT_PICKED_UP)
            .values_list("device_id", flat=True)
        ),
        model=rollout.model.name,
    )
    RolloutDevice.objects.filter(rollout=rollout, state__in=(RD.PLANNED, RD.QUEUED)).update(
        state=RD.SKIPPED, updated_at=now
    )
    Wave.objects.filter(rollout=rollout, state__in=(Wave.State.RUNNING, Wave.State.SOAKING)).update(
        state=Wave.State.HALTED, finished_at=now
    )
    rollout_set_state(rollout, Rollout.State.ABORTED, reason)
    return cancelled


def rollout_revert_devices(rollout: Rollout, *, states=RolloutDevice.TOUCHED, stamp: bool = True) -> dict:
    """New directives pointing each touched device (or each in `states`) back at the release it
    ran before. Reverts never carry maintenance windows: sending a device back must not wait.
    `stamp`: record the rollout as reverted (a full revert, not the halt's cancelling)."""
    candidates = list(
        RolloutDevice.objects.filter(
            rollout=rollout, state__in=states
        ).select_related("device", "previous_version__model")
    )
    if not candidates and not stamp:
        return {"revert_directives": 0}
    requests, sent, without_previous, below_floor = [], [], [], []
    refused: dict[str, str] = {}  # device -> why its previous release may not be sent (revoked, expired)
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
        # A directive every agent would refuse only fails the device: list it with the reason.
        why = release_refusal(prev)
        if why is not None:
            refused[a.device_id] = why[0]
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
    if refused:
        for code in set(refused.values()):
            RolloutDevice.objects.filter(
                pk__in=[a.pk for a in candidates if refused.get(a.device_id) == code]
            ).update(detail=f"cannot revert: the previous release is {code.removeprefix('release_')}")
    if stamp:
        rollout.reverted_at = now
        rollout.save(update_fields=["reverted_at"])
    return {
        "revert_directives": len(issued),
        "no_previous_release": without_previous[:100],
        "below_rollback_floor": below_floor[:100],
        "previous_release_refused": [{"device": d, "code": c} for d, c in list(refused.items())[:100]],
    }
