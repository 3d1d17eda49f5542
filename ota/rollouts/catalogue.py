"""The rollout-action catalogue: every operator action on a rollout, who may run it, in which
rollout states, and how each entry point presents it. Every action takes an optional reason,
kept in the audit log.

This table is the one place those rules are written. The API routes (ota.rollouts.urls), the
web buttons and their confirmations (web.rollouts), the Django admin actions
(ota.rollouts.admin) and fleetctl's `rollout` subcommands are built from it, and the actions
themselves (ota.rollouts.actions) check their allowed states against it.

Plain Python on purpose (no Django): fleetctl, a standard-library client, builds its
subcommands from it. The state names are ota.models.Rollout.State's values; a test keeps the
two in step.
"""

from __future__ import annotations

from dataclasses import dataclass

CREATED, SCHEDULED, RUNNING, PAUSED, COMPLETED, ABORTED, ROLLED_BACK = (
    "created", "scheduled", "running", "paused", "completed", "aborted", "rolled_back",
)
ACTIVE = (RUNNING, PAUSED)

# Who may create (define) a rollout; the actions on it follow.
CREATE_SCOPES = ("ci", "operator")


@dataclass(frozen=True)
class RolloutAction:
    name: str  # URL segment, fleetctl subcommand, web form value
    function: str  # the function in ota.rollouts.actions that does it
    scopes: tuple[str, ...]  # a caller with any one of these scopes may run it
    states: tuple[str, ...]  # the rollout states it is allowed in
    verb: str  # for refusals: "cannot {verb} rollout 7: it is completed"
    past: str  # for what was done: "paused from the admin"
    summary: str  # one line: fleetctl's help, the admin's action description
    label: str  # the web button
    style: str  # the web button's CSS class
    # The web confirmation, formatted with: rollout (id), release (model@version), devices,
    # waves (count), wave (the current wave, described), failed (devices failed or timed out).
    confirm: str


ACTIONS: tuple[RolloutAction, ...] = (
    RolloutAction(
        name="approve", function="rollout_approve",
        scopes=("operator",), states=(CREATED,),
        verb="approve", past="approved",
        summary="approve a rollout that requires approval (operator)",
        label="Approve", style="secondary",
        confirm="Approve rollout #{rollout} of {release}? Another operator can then start it.",
    ),
    RolloutAction(
        name="start", function="rollout_start",
        scopes=("ci", "operator"), states=(CREATED,),
        verb="start", past="started",
        summary="start a created (and, if required, approved) rollout; with a start_at ahead it is "
        "scheduled and the engine starts it then",
        label="Start", style="",
        confirm="Start rollout #{rollout}? {release} goes to {devices} devices in {waves} waves, "
        "beginning with {wave}.",
    ),
    RolloutAction(
        name="unschedule", function="rollout_unschedule",
        scopes=("ci", "operator"), states=(SCHEDULED,),
        verb="unschedule", past="unscheduled",
        summary="cancel a scheduled start: the rollout is created again, without a start time "
        "(start then starts it at once)",
        label="Cancel scheduled start", style="secondary",
        confirm="Cancel the scheduled start of rollout #{rollout}? Nothing is sent; it goes back to created, "
        "and Start then starts it at once.",
    ),
    RolloutAction(
        name="pause", function="rollout_pause",
        scopes=("ci", "operator"), states=(RUNNING,),
        verb="pause", past="paused",
        summary="stop sending directives; devices already updating finish",
        label="Pause", style="warn",
        confirm="Pause rollout #{rollout}? No new directives go out until it is resumed; devices already "
        "updating finish what they started.",
    ),
    RolloutAction(
        name="resume", function="rollout_resume",
        scopes=("operator",), states=(PAUSED,),
        verb="resume", past="resumed",
        summary="continue a paused rollout",
        label="Resume", style="",
        confirm="Resume rollout #{rollout}? Directives for {wave} go out again under the rate cap.",
    ),
    RolloutAction(
        name="advance", function="rollout_advance",
        scopes=("operator",), states=ACTIVE,
        verb="advance", past="advanced",
        summary="pass the current wave now, whatever its gates say",
        label="Advance now", style="secondary",
        confirm="Advance rollout #{rollout} now? {Wave} is passed without waiting for its gates or soak time, "
        "and the next wave starts.",
    ),
    RolloutAction(
        name="retry", function="rollout_retry_failed",
        scopes=("operator",), states=ACTIVE,
        verb="retry failed devices of", past="queued again",
        summary="send failed devices of the started waves a fresh directive, and devices that never "
        "picked theirs up the same one again",
        label="Retry failed", style="secondary",
        confirm="Retry failed devices of rollout #{rollout}? About {failed} failed or timed-out devices get a "
        "fresh directive for {release}; devices that never picked theirs up get it again.",
    ),
    RolloutAction(
        name="abort", function="rollout_abort",
        scopes=("ci", "operator"), states=(CREATED, SCHEDULED, *ACTIVE),
        verb="abort", past="aborted",
        summary="stop the rollout; devices not yet directed are skipped",
        label="Abort", style="danger",
        confirm="Abort rollout #{rollout}? Nothing more is sent; devices already on {release} keep it, and "
        "devices waiting for a maintenance window to activate it are told to stay on what they run.",
    ),
    RolloutAction(
        name="rollback", function="rollout_rollback",
        scopes=("operator",), states=(*ACTIVE, COMPLETED, ABORTED),
        verb="roll back", past="rolled back",
        summary="send every device this rollout touched back to its previous release",
        label="Abort and revert (roll back)", style="danger",
        confirm="Abort rollout #{rollout} and revert? Every device it updated (or was updating) gets a new "
        "directive back to the release it ran before.",
    ),
)
BY_NAME: dict[str, RolloutAction] = {action.name: action for action in ACTIONS}
# Whoever may run at least one action (the web's first gate; each action then checks its own).
ACTION_SCOPES: tuple[str, ...] = tuple(sorted({scope for action in ACTIONS for scope in action.scopes}))


def action_named(name: str) -> RolloutAction | None:
    return BY_NAME.get(name)


def actions_available(*, state: str, requires_approval: bool, approved: bool) -> list[RolloutAction]:
    """The actions that make sense for a rollout now, in catalogue order: the ones allowed in its
    state, with approve and start narrowed by the approval rule (start waits for an approval
    that is required and missing; approve only then)."""
    waiting_for_approval = requires_approval and not approved
    out = []
    for action in ACTIONS:
        if state not in action.states:
            continue
        if action.name == "approve" and not waiting_for_approval:
            continue
        if action.name == "start" and waiting_for_approval:
            continue
        out.append(action)
    return out


def may_run(action: RolloutAction, scopes) -> bool:
    return bool(set(action.scopes) & set(scopes))
