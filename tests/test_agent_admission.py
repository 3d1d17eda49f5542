"""Directive admission, table-driven: each forged or edge-case directive goes to the pure admit()
and, with the same device state in a real journal, through a real Agent's handle_payload; both
must reach the same decision, with the same error code, seq and message. The table and the
signed documents are in tests.support.directives (the simulator's admission test uses them too)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from datetime import timedelta
from hashlib import sha256
from pathlib import Path

import pytest

from agent.admission import Accept, AlreadyActive, Defer, Ignore, Preempt, Refuse, admit
from agent.daemon import Agent
from agent.machine import Phase
from agent.protocol import parse_time, utcnow
from agent.signing import Keyring
from tests.support.directives import (
    CASES,
    DENIED,
    IN_FLIGHT,
    MODEL,
    RELEASE_PEM,
    ROLLOUT_PEM,
    STRANGER_KEY,
    V1,
    V2,
    Known,
    agent_for,
    busy,
    directive,
    entry,
    events,
    release,
)


def decide(payload: bytes, known: Known):
    return admit(payload=payload, device=known.view(), release_keys=Keyring.from_pems(RELEASE_PEM),
                 rollout_keys=Keyring.from_pems(ROLLOUT_PEM), now=utcnow())


def what_the_agent_did(agent: Agent, payload: bytes) -> tuple[type, str | None, int, str]:
    """Handle the payload and read the decision back from the journal, the outbox and the inbox.
    Preempt: the type is (Preempt, what it carried out), the code and detail the superseded update's."""
    before = json.loads((agent.state_dir / "journal.json").read_text())
    agent.handle_payload(payload)
    after = json.loads((agent.state_dir / "journal.json").read_text())
    sent = events(agent)
    if sent and sent[0]["error_code"] == "SUPERSEDED":
        superseded, then = sent
        assert (superseded["state"], superseded["seq"], superseded["model"]) == ("failed", before["update"]["seq"],
                                                                               before["update"]["model"])
        assert after["seqs"][then["model"]] == then["seq"]
        if then["state"] == "received":
            assert after["update"]["phase"] == "received" and after["update"]["seq"] == then["seq"]
            assert (after["last_outcome"]["seq"], after["last_outcome"]["error_code"]) == (superseded["seq"], "SUPERSEDED")
            return (Preempt, Accept), "SUPERSEDED", then["seq"], superseded["detail"]
        assert then["state"] == "committed" and after["update"] is None
        assert after["last_outcome"]["seq"] == then["seq"]
        return (Preempt, AlreadyActive), "SUPERSEDED", then["seq"], superseded["detail"]
    if not sent:
        assert after == before, "no event, yet the journal changed"
        if agent.inbox.empty():
            return Ignore, None, 0, ""
        assert agent.inbox.get_nowait() == payload
        return Defer, None, 0, ""
    [event] = sent
    if event["state"] == "rejected":
        return Refuse, event["error_code"], event["seq"], event["detail"]
    if event["state"] == "committed":
        assert after["update"] is None and after["last_seq"] == event["seq"]
        return AlreadyActive, None, event["seq"], event["detail"]
    assert event["state"] == "received" and after["update"]["phase"] == "received"
    return Accept, None, event["seq"], ""


@pytest.mark.parametrize("name", CASES)
def test_it_decides_the_same_as_the_agent(tmp_path, name):
    case = CASES[name]
    payload = case.payload()

    decision = decide(payload, case.known)
    assert type(decision) is case.decision, decision
    agent = agent_for(tmp_path, case.known)
    kind, code, seq, detail = what_the_agent_did(agent, payload)
    if isinstance(decision, Preempt):
        assert kind == (Preempt, case.then) and type(decision.then) is case.then
        assert (decision.seq, decision.superseded, decision.model) == (case.seq, 5, MODEL) == (seq, 5, MODEL)
        assert decision.message == detail and "superseded by directive 6" in detail
        return
    assert kind is case.decision

    if isinstance(decision, Refuse):
        assert (decision.code, decision.seq) == (case.code, case.seq) == (code, seq), decision
        assert case.message in decision.message and decision.message == detail
        assert decision.record_seq == (case.seq > 0 and case.code != "REPLAYED")
        journal = json.loads((agent.state_dir / "journal.json").read_text())
        assert journal["last_seq"] == (case.seq if decision.record_seq else case.known.last_seq)
    elif isinstance(decision, (Ignore, Defer)):
        assert decision.seq == case.seq
    elif isinstance(decision, AlreadyActive):
        assert (decision.seq, decision.sha, decision.message) == (case.seq, V1, detail) == (seq, V1, detail)
    else:
        assert decision.update.seq == case.seq == seq


def test_it_records_the_update_the_agent_starts():
    decision = decide(directive(), Known())
    assert isinstance(decision, Accept)
    upd = decision.update
    assert (upd.phase, upd.seq, upd.model, upd.version, upd.counter, upd.rollback_floor) == (
        Phase.RECEIVED, 6, MODEL, "4.0", 4, 0)
    assert (upd.sha, upd.length, upd.file_name, upd.format, upd.url) == (
        sha256(V2).hexdigest(), len(V2), "model.onnx", "onnx", "http://127.0.0.1:9/a/v2")
    assert (upd.rollout_id, upd.health, upd.transitions) == ("r-9", None, 1)
    assert set(upd.to_json()) == {"phase", "seq", "model", "version", "counter", "rollback_floor", "rollout_id",
                                  "sha", "length", "file_name", "format", "url", "health", "transitions",
                                  "started"}
    assert decision.release.model == MODEL and decision.directive.seq == 6


def test_it_lifts_the_denylist_entry_an_operators_retry_names(tmp_path):
    denied = sha256(DENIED).hexdigest()
    payload = directive(rel=release(artifacts=[entry(DENIED)]), artifact=entry(DENIED), retry_denied=True)
    decision = decide(payload, Known())
    assert isinstance(decision, Accept) and decision.lifted == denied and "retry_denied" in decision.detail
    agent = agent_for(tmp_path, Known())
    agent.handle_payload(payload)
    journal = json.loads((agent.state_dir / "journal.json").read_text())
    assert denied not in journal["denylist"] and journal["update"]["sha"] == denied  # in the same write
    [received] = events(agent)
    assert received["state"] == "received" and received["detail"] == decision.detail
    # Without the field, as before: refused.
    plain = decide(directive(seq=7, rel=release(artifacts=[entry(DENIED)]), artifact=entry(DENIED)), Known())
    assert isinstance(plain, Refuse) and plain.code == "DENYLISTED"
    # Another artifact's retry lifts nothing.
    other = decide(directive(retry_denied=True), Known())
    assert isinstance(other, Accept) and other.lifted is None and other.detail == ""


def test_it_supersedes_the_update_in_flight_and_drops_its_download(tmp_path):
    agent = agent_for(tmp_path, busy(MODEL, "downloading"))
    part = agent.store.part_path(sha256(IN_FLIGHT).hexdigest())
    part.write_bytes(b"half of it")
    agent.handle_payload(directive())
    journal = json.loads((agent.state_dir / "journal.json").read_text())
    assert (journal["update"]["seq"], journal["update"]["sha"]) == (6, sha256(V2).hexdigest())
    assert journal["seqs"][MODEL] == 6 and journal["last_outcome"]["error_code"] == "SUPERSEDED"
    assert [(e["state"], e["error_code"], e["seq"]) for e in events(agent)] == [
        ("failed", "SUPERSEDED", 5), ("received", None, 6)]
    assert not part.exists(), "the superseded download's partial file is cleaned up"


def test_it_takes_an_envelope_already_decoded():
    payload = directive()
    assert decide(json.loads(payload), Known()) == decide(payload, Known())
    assert decide({"payloadType": 1}, Known()).code == "WRONG_PAYLOAD_TYPE"


def test_it_treats_expiry_at_now_as_expired():
    payload = directive(expires_in=timedelta(minutes=5))
    expires = parse_time(json.loads(base64.b64decode(json.loads(payload)["payload"]))["expires"], "expires")
    keys = {"release_keys": Keyring.from_pems(RELEASE_PEM), "rollout_keys": Keyring.from_pems(ROLLOUT_PEM)}
    at = admit(payload=payload, device=Known().view(), now=expires, **keys)
    before = admit(payload=payload, device=Known().view(), now=expires - timedelta(seconds=1), **keys)
    assert isinstance(at, Refuse) and at.code == "EXPIRED"
    assert isinstance(before, Accept)


def test_it_leaves_a_payload_it_cannot_decode_to_the_callers_safety_net(tmp_path):
    # json cannot nest this deep; admit() says so by raising, and the agent refuses the payload.
    payload = b"[" * 60_000
    with pytest.raises(RecursionError):
        decide(payload, Known())
    agent = agent_for(tmp_path, Known())
    assert what_the_agent_did(agent, payload)[:3] == (Refuse, "MALFORMED", 0)
    assert "could not be processed: RecursionError" in events(agent)[0]["detail"]


def test_it_reports_an_unauthenticated_payload_once(tmp_path):
    agent = agent_for(tmp_path, Known())
    payload = directive(key=STRANGER_KEY)
    agent.handle_payload(payload)
    agent.handle_payload(payload)
    assert [(e["state"], e["error_code"]) for e in events(agent)] == [("rejected", "UNKNOWN_KEY")]


def test_it_needs_nothing_but_the_wire_format():
    # The server's simulator calls admit() for thousands of devices: no journal, store, daemon or
    # server stack behind it.
    probe = ("import sys, agent.admission; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in {'django', 'celery', 'boto3', 'ota'} "
             "or m in {'agent.journal', 'agent.daemon', 'agent.install', 'agent.download', 'agent.outbox'}))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "[]"
