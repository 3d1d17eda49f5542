"""A state directory moved to another device identity (agent.identity): the agent started with a
config naming another device id than its journal's keeps the installed models, forgets the old
identity's directive seq (the new one's seq 1 is accepted), goes on numbering events, and never
publishes the events queued for the old identity. This is what an agent finds when agent.toml
was replaced by hand, or when `fleet-agent enroll --force` was cut short after writing it."""

from __future__ import annotations

import json

from agent.journal import Journal
from agent.outbox import Outbox
from tests.support.agent_harness import active_fingerprint, journal, release_envelope, wait_for
from tests.support.reenroll import MODEL, lived_in_device


def test_a_new_device_id_starts_a_new_seq_and_never_sends_the_old_identitys_events(rig):
    before = lived_in_device(rig, "dev-before")
    old = journal(before.state)
    fingerprint = active_fingerprint(before.state, MODEL)

    (rig.tmp / "dev-after").mkdir()
    rig.config("dev-after", state_dir=before.state)  # the same state directory, another device id
    agent = rig.agent("dev-after").start()
    wait_for(agent.ready, 20, "the agent up", agent=agent)
    rel1 = release_envelope(rig.keys, model=MODEL, version="1", counter=1, artifacts=[before.v1.entry()])
    rig.publish_directive("dev-after", rig.directive("dev-after", 1, MODEL, rel1, before.v1))
    outcome = rig.subscriber.wait_outcome("dev-after", 1, agent=agent)

    # Seq 1 is the new identity's first directive, not a replay of the old one's: v1 is already
    # active and committed, so it is acknowledged as such; the event number goes on.
    assert (outcome["state"], outcome["detail"]) == ("committed", "already active and committed"), outcome
    assert outcome["event_no"] == old["event_no"] + 1
    # The old identity's undelivered rollback event was retired, not sent (under either topic).
    assert not [e for e in rig.subscriber.events_for("dev-before") if e["error_code"] == "LOCAL_ROLLBACK"]
    assert [e["event_no"] for e in rig.subscriber.events_for("dev-after")] == [outcome["event_no"]]
    retired = sorted((before.state / "outbox" / "retired" / "dev-before").glob("*.json"))
    assert [json.loads(p.read_text())["error_code"] for p in retired] == ["LOCAL_ROLLBACK"]
    assert agent.stop() == 0

    now = journal(before.state)
    assert (now["device_id"], now["last_seq"]) == ("dev-after", 1)
    assert {k: now[k] for k in ("models", "floors", "denylist")} == {k: old[k] for k in ("models", "floors", "denylist")}
    assert active_fingerprint(before.state, MODEL) == fingerprint


def test_a_journal_from_before_the_identity_record_is_stamped_without_a_reset(tmp_path):
    from agent.identity import rebind

    state = tmp_path / "state"
    state.mkdir()
    legacy = {"last_seq": 7, "event_no": 12, "models": {}, "floors": {}, "denylist": [], "last_events": []}
    (state / "journal.json").write_text(json.dumps(legacy))
    journal_ = Journal(state)
    assert rebind(journal_, Outbox(state / "outbox"), "dev-same") is None
    assert (journal(state)["device_id"], journal(state)["last_seq"]) == ("dev-same", 7)

    # Its last events, though, say whose it was: made for another id, it is rebound.
    event = {"device_id": "dev-old", "event_no": 12, "seq": 7, "state": "committed"}
    legacy["last_events"] = [{"event_no": 12, "payload": json.dumps(event)}]
    (state / "journal.json").write_text(json.dumps(legacy))
    (state / "outbox" / f"{12:012d}.json").write_text(json.dumps(event))
    rebound = rebind(Journal(state), Outbox(state / "outbox"), "dev-new")
    assert (rebound.previous, rebound.retired_events, rebound.last_seq) == ("dev-old", 1, 7)
    now = journal(state)
    assert (now["device_id"], now["last_seq"], now["event_no"], now["last_events"]) == ("dev-new", 0, 12, [])
    assert not list((state / "outbox").glob("*.json"))
    assert (state / "outbox" / "retired" / "dev-old" / f"{12:012d}.json").exists()
