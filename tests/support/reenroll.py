"""A device that has lived a little, for re-enrollment tests: a real agent installed v1 then v2
of a model, was stopped, and an operator rolled back to v1 with `fleet-agent rollback` (the
daemon stopped, so the `rolled_back` event waits in the outbox, undelivered). The state
directory then holds what a re-enrollment must keep (store, models/ links, floors, a deny-listed
sha) and what it must not carry over to a new identity (last_seq 2, an event for the old id)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support.agent_harness import REPO, Artifact, Rig, journal, release_envelope, wait_for
from tests.support.onnx_models import linear_model

MODEL = "m"


@dataclass
class LivedIn:
    device_id: str
    config: Path
    state: Path
    v1: Artifact
    v2: Artifact

    def pending_events(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((self.state / "outbox").glob("*.json"))]


def lived_in_device(rig: Rig, device_id: str) -> LivedIn:
    v1 = Artifact(linear_model(scale=2.0, bias=1.0))
    v2 = Artifact(linear_model(scale=3.0, bias=0.5))
    rel1 = release_envelope(rig.keys, model=MODEL, version="1", counter=1, artifacts=[v1.entry()])
    rel2 = release_envelope(rig.keys, model=MODEL, version="2", counter=2, artifacts=[v2.entry()])
    config = rig.config(device_id)
    state = rig.tmp / device_id / "state"
    agent = rig.agent(device_id).start()
    rig.publish_directive(device_id, rig.directive(device_id, 1, MODEL, rel1, v1))
    assert rig.subscriber.wait_outcome(device_id, 1, agent=agent)["state"] == "committed"
    rig.publish_directive(device_id, rig.directive(device_id, 2, MODEL, rel2, v2))
    assert rig.subscriber.wait_outcome(device_id, 2, agent=agent)["state"] == "committed"
    wait_for(lambda: not list((state / "outbox").glob("*.json")), 15, "the outbox drained", agent=agent)
    assert agent.stop() == 0

    rollback = subprocess.run([sys.executable, "-m", "agent.cli", "rollback", MODEL, "--config", str(config)],
                              capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert rollback.returncode == 0, rollback.stderr
    lived = LivedIn(device_id=device_id, config=config, state=state, v1=v1, v2=v2)
    [event] = lived.pending_events()
    assert (event["device_id"], event["state"], event["error_code"]) == (device_id, "rolled_back", "LOCAL_ROLLBACK")
    data = journal(state)
    assert data["last_seq"] == 2 and v2.sha256 in data["denylist"] and data["models"][MODEL]["current"] == v1.sha256
    return lived
