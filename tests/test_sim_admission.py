"""The fleet simulator admits directives exactly as the agent does.

Every forged or edge-case directive of the admission table (tests.support.directives) goes to a
real Agent and to a SimDevice in the same state, twice (a retained directive comes again after
every reconnect), and both must report the same events and end at the same last seq. No broker:
a SimDevice that never connected keeps its events in its outbox, as the agent keeps them in its
on-disk outbox, and they are read there.
"""

from __future__ import annotations

import json
from hashlib import sha256

import paho.mqtt.client as mqtt
import pytest

from agent.admission import Accept, AlreadyActive, Defer, Preempt, Refuse
from agent.protocol import ErrorCode, Topics
from ota.sim.enroll import SimCredentials
from ota.sim.fleet import FleetSimulator, SimDevice
from tests.support.directives import (
    CASES,
    DENIED,
    DEVICE,
    HARDWARE,
    MODEL,
    RELEASE_PEM,
    ROLLOUT_PEM,
    V2,
    Known,
    agent_for,
    busy,
    directive,
    entry,
    events,
    release,
)

# What an event says about the directive; event_no and ts are each reporter's own.
REPORTED = ("state", "error_code", "seq", "model", "sha256", "active_sha256", "rollout_id", "detail", "health")


def reported(payloads: list[dict]) -> list[tuple]:
    return [tuple(event[k] for k in REPORTED) for event in payloads]


def sim_device(known: Known, *, behaviour: str = "healthy") -> SimDevice:
    """A SimDevice (never connected) holding what `known` says, as the agent's journal would."""
    sim = FleetSimulator([], host="127.0.0.1", port=9, release_pems=[RELEASE_PEM], rollout_pems=[ROLLOUT_PEM])
    device = SimDevice(sim, SimCredentials(device_id=DEVICE, password="unused", hardware=HARDWARE), behaviour)
    device.floors = dict(known.floors)
    device.denylist = set(known.denylist)
    device.models = {m: (r["current"], bool(r.get("committed"))) for m, r in known.models.items()}
    if known.busy:
        # Busy the way a device gets busy: an update (of Known.busy_model, as in Known.journal())
        # accepted from the directive with the seq it has handled last, stepped on to busy_phase.
        device.handle_directive(known.in_flight())
        assert device.update is not None and sim_events(device)[0]["state"] == "received"
        while device.update.phase != known.busy_phase:
            device.step()
        device.outbox.clear()
    device.seqs = known.seqs()
    return device


def sim_events(device: SimDevice) -> list[dict]:
    return [json.loads(payload) for payload in device.outbox]


def finish_update(device: SimDevice) -> None:
    """Run the update in flight to its outcome now instead of on the simulator's timers (the
    next update, started from a directive that waited for this one, is left where it begins)."""
    update = device.update
    while update is not None and device.update is update:
        device.step()


def expected(case) -> tuple[list[tuple], int]:
    """(state, error code, seq) of the one event the table's decision makes, and the last seq after."""
    if case.decision is Refuse:
        record_seq = case.seq > 0 and case.code != ErrorCode.REPLAYED
        return [("rejected", case.code, case.seq)], case.seq if record_seq else case.known.last_seq
    if case.decision is AlreadyActive:
        return [("committed", None, case.seq)], case.seq
    if case.decision is Accept:
        return [("received", None, case.seq)], case.seq
    if case.decision is Preempt:
        then = ("received", None, case.seq) if case.then is Accept else ("committed", None, case.seq)
        return [("failed", "SUPERSEDED", case.known.last_seq), then], case.seq
    return [], case.known.last_seq  # Ignore, Defer


@pytest.mark.parametrize("name", CASES)
def test_it_reports_what_the_agent_reports(tmp_path, name):
    case = CASES[name]
    payload = case.payload()
    agent = agent_for(tmp_path, case.known)
    device = sim_device(case.known)

    for _delivery in range(2):
        agent.handle_payload(payload)
        device.handle_directive(payload)

    by_agent, by_sim = events(agent), sim_events(device)
    want_events, want_last_seq = expected(case)
    assert [e[:3] for e in reported(by_sim)] == want_events
    assert reported(by_sim) == reported(by_agent)
    journal = json.loads((agent.state_dir / "journal.json").read_text())
    assert max(device.seqs.values(), default=0) == journal["last_seq"] == want_last_seq
    assert device.seqs == journal["seqs"]  # judged per model, the same way
    assert bool(device.pending) == (not agent.inbox.empty()) == (case.decision is Defer)
    assert device.sim.stats.rejected == sum(e["state"] == "rejected" for e in by_sim)
    assert (device.update is not None) == (journal["update"] is not None)


def test_it_no_longer_calls_an_artifact_mismatch_no_artifact():
    # The simulator used to answer NO_ARTIFACT here, and to accept a directive whose length or
    # hardware disagreed with the signed release: a more permissive fleet than the real one.
    for name in ("directive_sha_differs", "directive_length_differs", "directive_hardware_differs"):
        device = sim_device(Known())
        device.handle_directive(CASES[name].payload())
        assert [(e["state"], e["error_code"], e["seq"]) for e in sim_events(device)] == [
            ("rejected", "ARTIFACT_MISMATCH", 6)], name
        assert device.update is None and device.seqs[MODEL] == 6


def test_it_judges_directives_that_came_during_an_update_once_it_ends():
    device = sim_device(Known(busy=True))
    topic = Topics("fleet").directive(DEVICE, MODEL)
    seven = directive(seq=7)
    for payload in (directive(seq=6), seven, seven):  # 7 again: the retained directive after a reconnect
        message = mqtt.MQTTMessage(topic=topic.encode())
        message.payload = payload
        device._on_message(device.client, device, message)
    assert device.outbox == [] and len(device.pending) == 2
    assert device.sim.stats.directives == 3

    finish_update(device)  # "other" commits; 6 starts; 7 waits for it
    assert [(e["model"], e["state"], e["seq"]) for e in sim_events(device)][-2:] == [
        ("other", "committed", 5), (MODEL, "received", 6)]
    finish_update(device)  # 6 commits; 7 names the same artifact: already there
    assert [(e["state"], e["seq"]) for e in sim_events(device)][-2:] == [("committed", 6), ("committed", 7)]
    assert sim_events(device)[-1]["detail"] == "already active and committed"
    assert device.pending == [] and device.seqs[MODEL] == 7


def test_it_supersedes_a_download_and_never_steps_the_old_update_again():
    device = sim_device(busy(MODEL, "downloading"))
    old = device.update
    device.handle_directive(directive(seq=6))
    assert [(e["state"], e["error_code"], e["seq"]) for e in sim_events(device)] == [
        ("failed", "SUPERSEDED", 5), ("received", None, 6)]
    new = device.update
    device.step(old)  # the superseded update's timer fires: it must not move the new one
    assert device.update is new and new.phase == "received" and len(sim_events(device)) == 2
    finish_update(device)
    assert [(e["state"], e["seq"]) for e in sim_events(device)][-1] == ("committed", 6)
    assert device.models[MODEL] == (sha256(V2).hexdigest(), True)


def test_it_waits_for_a_trial_of_the_same_model():
    device = sim_device(busy(MODEL, "trial"))
    device.handle_directive(directive(seq=6))
    assert sim_events(device) == [] and len(device.pending) == 1
    finish_update(device)  # 5 commits; 6 starts then
    assert [(e["state"], e["seq"]) for e in sim_events(device)][-2:] == [("committed", 5), ("received", 6)]


def test_it_lifts_the_denylist_on_an_operators_retry():
    device = sim_device(Known())
    denied = sha256(DENIED).hexdigest()
    device.handle_directive(directive(rel=release(artifacts=[entry(DENIED)]), artifact=entry(DENIED),
                                      retry_denied=True))
    assert denied not in device.denylist and device.update.sha == denied
    assert "retry_denied" in sim_events(device)[0]["detail"]


def test_it_reports_models_seqs_and_the_update_in_flight_in_its_presence():
    from agent.protocol import parse_presence

    device = sim_device(busy(MODEL, "downloading"))
    online = parse_presence(device._presence(True))
    assert online["models"][MODEL] == {"sha256": Known().models[MODEL]["current"], "version": None,
                                       "committed": True, "seq": 5}
    assert online["update"] == {"model": MODEL, "seq": 5, "phase": "downloading"}
    finish_update(device)
    after = parse_presence(device._presence(True))
    assert after["update"] is None and after["models"][MODEL]["version"] == "4.0"
    assert set(parse_presence(device._presence(False))) == {"_type", "online", "agent_version", "active"}


def test_it_raises_the_rollback_floor_when_an_update_commits():
    device = sim_device(Known(last_seq=0, floors={}, models={}))
    floor_5 = release(counter=5, edit=lambda body: body.update(rollback_floor=5))
    device.handle_directive(directive(seq=1, rel=floor_5))
    finish_update(device)
    assert device.floors == {MODEL: 5} and device.models == {MODEL: (sha256(V2).hexdigest(), True)}

    older = entry(b"v4 bytes")
    device.handle_directive(directive(seq=2, rel=release(counter=4, artifacts=[older]), artifact=older))
    device.handle_directive(directive(seq=3, rel=floor_5))
    outcomes = [(e["state"], e["error_code"], e["seq"]) for e in sim_events(device)][-2:]
    assert outcomes == [("rejected", "BELOW_ROLLBACK_FLOOR", 2), ("committed", None, 3)]
    assert sim_events(device)[-1]["health"]["simulated"] is True, "the last trial's figures, as the agent sends"


def test_it_deny_lists_what_failed_its_trial_and_restores_the_previous_model():
    device = sim_device(Known(), behaviour="fail-trial")
    v1 = device.models[MODEL]
    device.handle_directive(directive(seq=6))
    finish_update(device)
    trial, rolled_back = sim_events(device)[-2:]
    assert (trial["state"], trial["active_sha256"]) == ("trial", sha256(V2).hexdigest())
    assert (rolled_back["state"], rolled_back["error_code"], rolled_back["active_sha256"]) == (
        "rolled_back", "TRIAL_FAILED", v1[0])
    assert device.models[MODEL] == v1 and sha256(V2).hexdigest() in device.denylist

    device.handle_directive(directive(seq=7))
    assert [(e["state"], e["error_code"], e["seq"]) for e in sim_events(device)][-1] == (
        "rejected", "DENYLISTED", 7)


def test_it_leaves_the_active_model_alone_when_the_precheck_fails():
    device = sim_device(Known(), behaviour="fail-precheck")
    before = dict(device.models)
    device.handle_directive(directive(seq=6))
    finish_update(device)
    assert sim_events(device)[-1]["error_code"] == "PRECHECK_FAILED"
    assert device.models == before and device.floors == Known().floors and device.sim.stats.failed == 1
