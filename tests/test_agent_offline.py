"""Offline: the broker goes away in the middle of an update. The agent still finishes and commits
locally (it never waits for the server), keeps its events in the on-disk outbox, and delivers
them in order once the broker is back."""

from __future__ import annotations


from tests.support.agent_harness import (
    PROGRESS,
    Artifact,
    Subscriber,
    active_file,
    journal,
    linear_contract,
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
