"""Offline: the broker goes away in the middle of an update. The agent still finishes and commits
locally (it never waits for the server), keeps its events in the on-disk outbox, and delivers
them in order once the broker is back; after a broker crash it sends again what the broker had
acknowledged recently, since the crash may have lost it."""

from __future__ import annotations

import json
import os
import time

from agent.outbox import Outbox
from agent.protocol import Topics, ingest_status_payload
from tests.support.agent_harness import (
    PROGRESS,
    Artifact,
    Subscriber,
    active_file,
    journal,
    linear_contract,
    publish_retained,
    release_envelope,
    wait_for,
)
from tests.support.onnx_models import linear_model



def test_it_commits_while_the_broker_is_down_and_delivers_the_outbox_later(rig, mosquitto):
    v1 = Artifact(linear_model(scale=2.0, bias=1.0, padding_bytes=100_000))
    v2 = Artifact(linear_model(scale=3.0, bias=0.5, padding_bytes=2_000_000))
    rel1 = release_envelope(rig.keys, model="detector", version="1", counter=1, artifacts=[v1.entry()])
    rel2 = release_envelope(rig.keys, model="detector", version="2", counter=2, artifacts=[v2.entry()],
                            health=linear_contract(scale=3.0, bias=0.5))
    state = rig.tmp / "dev-off" / "state"
    rig.config("dev-off", update={"trial_seconds": 2})
    agent = rig.agent("dev-off").start()
    rig.publish_directive("dev-off", rig.directive("dev-off", 1, "detector", rel1, v1))
    assert rig.subscriber.wait_outcome("dev-off", 1, agent=agent)["state"] == "committed"

    rig.server.rate = 1 * 2**20  # ~2 s of download: time to pull the plug on the broker
    rig.publish_directive("dev-off", rig.directive("dev-off", 2, "detector", rel2, v2))
    wait_for(lambda: any(e["state"] == "downloading" for e in rig.subscriber.events_for("dev-off", 2)), 30,
             "the download to start", agent=agent)
    mosquitto.stop()

    wait_for(lambda: (journal(state).get("last_outcome") or {}).get("seq") == 2, 60, "a local commit", agent=agent)
    assert journal(state)["last_outcome"]["state"] == "committed"
    assert active_file(state, "detector").read_bytes() == v2.data
    pending = sorted(p.name for p in (state / "outbox").glob("*.json"))
    assert len(pending) >= 5, pending  # verifying .. committed are waiting on disk

    mosquitto.start()
    late = Subscriber(mosquitto.port).start()
    try:
        wait_for(lambda: late.outcomes("dev-off", 2), 30, "the outbox to deliver", agent=agent)
        wait_for(lambda: not list((state / "outbox").glob("*.json")), 15, "an empty outbox", agent=agent)
        seen = {e["event_no"]: e for e in rig.subscriber.events_for("dev-off", 2) + late.events_for("dev-off", 2)}
        assert [seen[n]["state"] for n in sorted(seen)] == PROGRESS
        assert late.outcomes("dev-off", 2)[0]["active_sha256"] == v2.sha256
        wait_for(lambda: late.presence.get("dev-off", {}).get("online") is True, 10, "presence after reconnect")
    finally:
        late.stop()


def test_it_sends_again_what_a_crashed_broker_may_have_lost_when_ingest_starts_a_new_session(rig, mosquitto):
    # A PUBACK means the broker has the event, not that the server does: Mosquitto killed -9
    # loses what it queued since its last save, and ingest's subscription. Ingest, subscribed
    # again, announces a new session; the agent then sends again what the broker acknowledged
    # within mqtt.resend_window_seconds. The server keeps one copy.
    v1 = Artifact(linear_model(scale=2.0, bias=1.0))
    rel1 = release_envelope(rig.keys, model="detector", version="1", counter=1, artifacts=[v1.entry()])
    state = rig.tmp / "dev-crash" / "state"
    rig.config("dev-crash")
    agent = rig.agent("dev-crash").start()
    rig.publish_directive("dev-crash", rig.directive("dev-crash", 1, "detector", rel1, v1))
    assert rig.subscriber.wait_outcome("dev-crash", 1, agent=agent)["state"] == "committed"
    wait_for(lambda: not list((state / "outbox").glob("*.json")), 15, "every event acknowledged", agent=agent)
    first = [e["event_no"] for e in rig.subscriber.events_for("dev-crash", 1)]

    mosquitto.kill()
    mosquitto.start()
    late = Subscriber(mosquitto.port).start()  # the server, reconnected to a broker that lost its queue
    try:
        wait_for(lambda: late.presence.get("dev-crash", {}).get("online") is True, 30, "the agent back", agent=agent)
        time.sleep(1)
        assert late.events_for("dev-crash", 1) == []  # a reconnect alone sends nothing again
        publish_retained(mosquitto.port, Topics("fleet").ingest_status(), ingest_status_payload(epoch="ingest-1:b"))
        wait_for(lambda: late.outcomes("dev-crash", 1), 30, "the events again", agent=agent)
        wait_for(lambda: len(late.events_for("dev-crash", 1)) == len(first), 10, "every one of them", agent=agent)
        assert [e["event_no"] for e in late.events_for("dev-crash", 1)] == first
        assert [e["state"] for e in late.events_for("dev-crash", 1)] == PROGRESS
    finally:
        late.stop()


def test_it_keeps_acknowledged_events_only_within_the_resend_window(tmp_path):
    outbox = Outbox(tmp_path / "outbox")
    for n in range(1, 6):
        outbox.put(n, json.dumps({"device_id": "dev-a", "event_no": n}).encode())
    for path in outbox.pending():
        outbox.mark_sent(path)
    assert outbox.count() == 0 and outbox.sent_watermark == 5
    old = time.time() - 3600
    for n in (1, 2):
        os.utime(outbox.acked_dir / f"{n:012d}.json", (old, old))

    assert outbox.requeue_acked(1800, keep=2) == 2  # 1 and 2 too old; of 3, 4, 5 the newest two
    assert [p.name for p in outbox.pending()] == ["000000000004.json", "000000000005.json"]
    assert not list(outbox.acked_dir.glob("*.json"))
    outbox.put(3, b"{}")  # the journal replaying an event already delivered: never queued again
    assert outbox.count() == 2
    assert outbox.requeue_acked(0) == 0  # off
