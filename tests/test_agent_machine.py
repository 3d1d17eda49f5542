"""The agent's update machine: the diagram in agent/machine.py is the transition table, the table
names steps the agent has, and a move the table does not allow raises before it is journalled."""

from __future__ import annotations

import json
import re

import pytest

from agent import machine
from agent.admission import Preempt, admit
from agent.config import Config
from agent.daemon import Agent
from agent.inflight import InFlightUpdate
from agent.journal import atomic_write_json, empty_journal
from agent.machine import TABLE, Entry, IllegalTransition, Outcome, Phase
from agent.protocol import State, utcnow
from agent.signing import Keyring
from agent.steps import Steps
from tests.support.directives import RELEASE_PEM, ROLLOUT_PEM, Known, directive

ARROW = re.compile(r"(\w+) ─► (?=(\w+))")


def diagram_edges(text: str) -> set[tuple[str, str]]:
    return {(m.group(1), m.group(2)) for line in text.splitlines() for m in ARROW.finditer(line)}


def test_it_draws_every_edge_of_the_table_and_no_other():
    drawn = diagram_edges(machine.__doc__)
    assert drawn - machine.edges() == set(), "drawn but not in TABLE"
    assert machine.edges() - drawn == set(), "in TABLE but not drawn"


def test_it_draws_the_edges_the_old_diagram_left_out():
    drawn = diagram_edges(machine.__doc__)
    for edge in [("verifying", "downloading"), ("received", "failed"), ("activating", "rolling_back"),
                 ("rolling_back", "failed"), ("request", "rolling_back"), ("directive", "committed")]:
        assert edge in drawn


def test_it_reads_arrows_wherever_they_are_on_a_line():
    assert diagram_edges("  a ─► b ─► c   d ─► e  why ─ not an arrow") == {("a", "b"), ("b", "c"), ("d", "e")}


def test_it_names_a_step_the_agent_has_for_every_phase():
    assert set(TABLE) == set(Phase) | set(Entry)
    for phase in Phase:
        assert callable(getattr(Steps, TABLE[phase].step)), phase
    for entry in Entry:
        assert TABLE[entry].step is None  # entries are left by handle_payload / start_local_rollback


def test_it_keeps_the_journal_and_event_strings():
    assert [p.value for p in Phase] == [
        "received", "downloading", "verifying", "prechecking", "waiting_for_window", "activating", "trial",
        "rolling_back"]
    assert {o.value for o in Outcome} == State.TERMINAL
    assert {p.value for p in Phase} - {"rolling_back"} <= State.ALL


def test_it_reaches_an_outcome_from_every_phase():
    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(TABLE[node].to if node in TABLE else ())
        return seen

    for source in TABLE:
        assert reachable(source) & set(Outcome), source


@pytest.mark.parametrize("source,target", [
    (Phase.RECEIVED, Phase.TRIAL),
    (Phase.TRIAL, Outcome.FAILED),
    (Phase.ROLLING_BACK, Phase.TRIAL),
    (Phase.ACTIVATING, Outcome.COMMITTED),
    (Entry.DIRECTIVE, Phase.ROLLING_BACK),
    (Entry.REQUEST, Outcome.REJECTED),
    (Outcome.COMMITTED, Phase.RECEIVED),
])
def test_it_refuses_a_move_not_in_the_table(source, target):
    with pytest.raises(IllegalTransition):
        machine.check(source, target)


def test_it_allows_every_move_in_the_table_also_as_plain_strings():
    for source, target in machine.edges():
        machine.check(source, target)


# --- through a real agent ------------------------------------------------------------------------


def _agent(tmp_path, phase: Phase) -> Agent:
    data = empty_journal()
    data["last_seq"] = 4
    data["update"] = InFlightUpdate.new(phase=phase, seq=4, model="detector", sha="ab" * 32, file_name="m.onnx",
                                        version="4", counter=4, rollback_floor=0, length=10,
                                        url="http://127.0.0.1:9/m", transitions=1).to_json()
    state = tmp_path / "state"
    state.mkdir()
    atomic_write_json(state / "journal.json", data)
    return Agent(Config(device_id="box-1", hardware="hw", state_dir=state))


def test_it_raises_on_an_illegal_transition_and_journals_nothing(tmp_path):
    agent = _agent(tmp_path, Phase.RECEIVED)
    before = (agent.state_dir / "journal.json").read_bytes()
    with pytest.raises(IllegalTransition, match="received → trial"):
        agent._transition(Phase.TRIAL, event=True)
    with pytest.raises(IllegalTransition, match="received → committed"):
        agent._finish(Outcome.COMMITTED, None, "trial passed")
    assert (agent.state_dir / "journal.json").read_bytes() == before
    assert agent.outbox.pending() == []


def test_it_stops_drive_when_a_step_moves_off_the_table(tmp_path, monkeypatch):
    agent = _agent(tmp_path, Phase.PRECHECKING)
    monkeypatch.setattr(agent.steps, "prechecking", lambda upd: agent._transition(Phase.TRIAL, event=True))
    with pytest.raises(IllegalTransition):
        agent.drive()
    assert json.loads((agent.state_dir / "journal.json").read_text())["update"]["phase"] == "prechecking"


def test_it_refuses_to_start_an_update_while_one_is_in_flight(tmp_path):
    agent = _agent(tmp_path, Phase.TRIAL)
    with pytest.raises(IllegalTransition, match="in flight"):
        agent._start(Entry.REQUEST, InFlightUpdate.new(phase=Phase.ROLLING_BACK, seq=0, model="detector",
                                                       sha="cd" * 32, local=True))


def test_it_lets_a_newer_directive_supersede_an_update_only_before_activation():
    assert machine.PREEMPTIBLE == {Phase.RECEIVED, Phase.DOWNLOADING, Phase.VERIFYING, Phase.PRECHECKING,
                                   Phase.WAITING_FOR_WINDOW}
    for phase in machine.PREEMPTIBLE:
        machine.check_preempt(phase)  # each has its arrow to failed (SUPERSEDED) in TABLE
        machine.check_preempt(phase.value)
        assert "SUPERSEDED" in next(line for line in machine.__doc__.splitlines()
                                    if line.strip().startswith(f"{phase.value} ─► failed"))
    for phase in (Phase.ACTIVATING, Phase.TRIAL, Phase.ROLLING_BACK):
        with pytest.raises(IllegalTransition, match="may be preempted"):
            machine.check_preempt(phase)


def test_it_refuses_to_supersede_a_trial_and_journals_nothing(tmp_path):
    accepted = admit(payload=directive(seq=5, model="detector"), device=Known(last_seq=4).view(),
                     release_keys=Keyring.from_pems(RELEASE_PEM), rollout_keys=Keyring.from_pems(ROLLOUT_PEM),
                     now=utcnow())
    agent = _agent(tmp_path, Phase.TRIAL)
    before = (agent.state_dir / "journal.json").read_bytes()
    with pytest.raises(IllegalTransition, match="may be preempted"):
        agent._preempt(Preempt(superseded=4, then=accepted, message="superseded"))
    assert (agent.state_dir / "journal.json").read_bytes() == before
    assert agent.outbox.pending() == []


def test_it_leaves_drive_to_judge_a_superseding_directive_before_the_next_step(tmp_path, monkeypatch):
    agent = _agent(tmp_path, Phase.DOWNLOADING)
    ran = []
    monkeypatch.setattr(agent.steps, "downloading", lambda upd: ran.append(upd.phase))
    agent.preempt.set()
    agent.drive()  # returns at once: the run loop judges the inbox first
    assert ran == []
    agent.preempt.clear()
    monkeypatch.setattr(agent.steps, "downloading", lambda upd: (ran.append(upd.phase), agent.stop.set()))
    agent.drive()
    assert ran == [Phase.DOWNLOADING]


def test_it_does_not_leave_an_activation_for_a_superseding_directive(tmp_path, monkeypatch):
    agent = _agent(tmp_path, Phase.ACTIVATING)
    ran = []
    monkeypatch.setattr(agent.steps, "activating", lambda upd: (ran.append(upd.phase), agent.stop.set()))
    agent.preempt.set()
    agent.drive()
    assert ran == [Phase.ACTIVATING]
