"""The update machine: which phase may move to which, and which step runs each phase.

    directive ─► received ─► downloading ─► verifying ─► prechecking ─► activating ─► trial ─► committed
    prechecking ─► waiting_for_window ─► activating     the directive has maintenance windows

    directive ─► rejected            agent.admission refused it; no update starts
    directive ─► committed           already active and committed: confirmed under the new seq
    request ─► rolling_back          `fleet-agent rollback MODEL` (LOCAL_ROLLBACK, seq 0)
    received ─► failed               DISK_FULL; ROLLBACK_LOOP; SUPERSEDED
    downloading ─► failed            NOT_FOUND, DOWNLOAD_FAILED, TOO_LARGE, DISK_FULL; ROLLBACK_LOOP; SUPERSEDED
    verifying ─► downloading         a resumed .part fails its sha256 (once, then from zero), or the
                                     staged copy vanished in a crash between move and rename
    verifying ─► failed              HASH_MISMATCH; ROLLBACK_LOOP; SUPERSEDED
    prechecking ─► failed            PRECHECK_FAILED; ROLLBACK_LOOP; SUPERSEDED
    waiting_for_window ─► failed     SUPERSEDED; HASH_MISMATCH (the stored copy changed while it
                                     waited); RELEASE_EXPIRED (while it waited); ROLLBACK_LOOP
    activating ─► rolling_back       ACTIVATE_FAILED (the reload command failed, or the agent died
                                     while it ran more than update.max_trial_restarts times); ROLLBACK_LOOP
    trial ─► rolling_back            TRIAL_FAILED (a health check failed, or the agent died while the
                                     health command ran more than update.max_trial_restarts times);
                                     ROLLBACK_LOOP
    rolling_back ─► rolled_back      previous model active again (or none), the new sha deny-listed
    rolling_back ─► failed           ROLLBACK_FAILED: previous failed re-verification, new model kept

A directive with maintenance windows (agent.windows) goes from prechecking to waiting_for_window,
whose step activates at once if a window is open and otherwise *parks* the update: it leaves the
in-flight slot for the journal's `waiting` (one per model, keeping its phase) and reports
`waiting_for_window` with the next opening, so another model's update can run meanwhile. The run
loop, when idle, puts a parked update back in the slot once one of its windows is open
(Agent.wake_parked), and the step runs again: it hashes the stored copy once more and activates.
Parking and unparking are no moves of the table; a parked update is superseded like a
preemptible one.

`directive` and `request` are where an update's life starts (a directive payload, a local
rollback request file); they are never journalled. The eight phases in between are
`update.phase` in the journal. committed, failed, rolled_back and rejected are outcomes: exactly
one event per directive seq reports one of them, and the in-flight update is gone afterwards.
ROLLBACK_LOOP is the loop guard in Agent.drive(): past update.max_transitions journal writes
for one directive, every phase but rolling_back leaves along its arrow above.

SUPERSEDED is preemption: a newer directive for the same model, admitted while the update is in
one of the PREEMPTIBLE phases (before activation, `current` untouched), ends it along its arrow
to failed, and the newer one enters at `directive` in the same journal write
(Agent._preempt, crash point `superseded`). Activating, trial and rolling_back are never
preempted: they finish or roll back, and the newer directive waits (agent.admission: Defer).

Each arrow is a journal write made *before* the side effects of the next step, and every step is
safe to run twice, so a SIGKILL anywhere resumes at the journalled phase. `current` is touched
only in activating and rolling_back; before that, any failure leaves the active model as it was.

The diagram is checked against TABLE (tests/test_agent_machine.py): every arrow above is an edge
of TABLE and every edge of TABLE is an arrow above. Keep `─►` out of the prose so it stays so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class Phase(StrEnum):
    """Where an in-flight update stands. The values are the journal's `update.phase` strings."""

    RECEIVED = "received"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    PRECHECKING = "prechecking"
    WAITING_FOR_WINDOW = "waiting_for_window"
    ACTIVATING = "activating"
    TRIAL = "trial"
    ROLLING_BACK = "rolling_back"


class Outcome(StrEnum):
    """How a directive ends; the values are the terminal event states of agent.protocol.State."""

    COMMITTED = "committed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    REJECTED = "rejected"


class Entry(StrEnum):
    """What starts an update or a report without one. Never journalled."""

    DIRECTIVE = "directive"  # a directive payload, judged by agent.admission
    REQUEST = "request"  # a local rollback request (requests/rollback-*.json or the CLI)


class IllegalTransition(RuntimeError):
    """A move the table does not allow: a bug in the agent, never a verdict on input."""


@dataclass(frozen=True)
class Row:
    """One source of the table: the step that runs it, and where it may go.

    `step` names a method of agent.steps.Steps taking the InFlightUpdate; Agent.drive() calls it
    while the journal's update is in this phase. Entries have no step: Agent.handle_payload()
    (agent.directives) and Agent.start_local_rollback() (agent.local_rollback) leave them.
    """

    step: str | None
    to: frozenset[Phase | Outcome]


def _row(step: str | None, *to: Phase | Outcome) -> Row:
    return Row(step, frozenset(to))


TABLE: Mapping[Entry | Phase, Row] = {
    Entry.DIRECTIVE: _row(None, Phase.RECEIVED, Outcome.REJECTED, Outcome.COMMITTED),
    Entry.REQUEST: _row(None, Phase.ROLLING_BACK),
    Phase.RECEIVED: _row("received", Phase.DOWNLOADING, Outcome.FAILED),
    Phase.DOWNLOADING: _row("downloading", Phase.VERIFYING, Outcome.FAILED),
    Phase.VERIFYING: _row("verifying", Phase.PRECHECKING, Phase.DOWNLOADING, Outcome.FAILED),
    Phase.PRECHECKING: _row("prechecking", Phase.ACTIVATING, Phase.WAITING_FOR_WINDOW, Outcome.FAILED),
    Phase.WAITING_FOR_WINDOW: _row("waiting_for_window", Phase.ACTIVATING, Outcome.FAILED),
    Phase.ACTIVATING: _row("activating", Phase.TRIAL, Phase.ROLLING_BACK),
    Phase.TRIAL: _row("trial", Outcome.COMMITTED, Phase.ROLLING_BACK),
    Phase.ROLLING_BACK: _row("rolling_back", Outcome.ROLLED_BACK, Outcome.FAILED),
}


# The phases a newer directive for the same model may cancel (ending the update `failed`,
# SUPERSEDED): everything before activation. Each has an edge to Outcome.FAILED in TABLE.
PREEMPTIBLE: frozenset[Phase] = frozenset({Phase.RECEIVED, Phase.DOWNLOADING, Phase.VERIFYING, Phase.PRECHECKING,
                                           Phase.WAITING_FOR_WINDOW})


def preemptible(phase: Phase | str | None) -> bool:
    """Whether an update in `phase` may be cancelled by a newer directive for its model."""
    return phase in PREEMPTIBLE


def edges() -> set[tuple[str, str]]:
    """Every (source, target) pair TABLE allows, as plain strings."""
    return {(str(source), str(target)) for source, row in TABLE.items() for target in row.to}


def check(source: Entry | Phase | str, target: Phase | Outcome | str) -> None:
    """Raise IllegalTransition unless TABLE allows source → target.

    Called before the journal write that makes the move, so a bug stops the agent with the
    journal still at `source` (the restart resumes there) instead of recording a move nobody
    designed. Plain strings are accepted: the enums are str-valued.
    """
    row = TABLE.get(source)  # type: ignore[call-overload]  # a str looks up its StrEnum member
    if row is None or target not in row.to:
        raise IllegalTransition(f"{source} → {target} is not in the agent's transition table")


def check_preempt(source: Phase | str) -> None:
    """Raise IllegalTransition unless an update in `source` may be superseded (→ failed)."""
    if not preemptible(source):
        raise IllegalTransition(f"{source} → {Outcome.FAILED} (SUPERSEDED): only {', '.join(sorted(PREEMPTIBLE))} "
                                "may be preempted")
    check(source, Outcome.FAILED)
