"""Device agent, happy path end to end: a real ONNX model goes from v1 to v2 through a real
Mosquitto, a real HTTP artifact server (API host redirecting to a storage host) and a real
`fleet-agent run` subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from hashlib import sha256


from tests.support.agent_harness import (
    PROGRESS,
    REPO,
    Artifact,
    active_fingerprint,
    journal,
    linear_contract,
    release_envelope,
    wait_for,
)
from tests.support.onnx_models import linear_model



def test_it_updates_v1_to_v2_and_serves_the_exact_bytes(rig):
    v1 = Artifact(linear_model(scale=2.0, bias=1.0, padding_bytes=400_000))
    v2 = Artifact(linear_model(scale=3.0, bias=0.5, padding_bytes=400_000))
    rel1 = release_envelope(rig.keys, model="detector", version="1.0", counter=1, artifacts=[v1.entry()],
                            health=linear_contract(scale=2.0, bias=1.0))
    rel2 = release_envelope(rig.keys, model="detector", version="2.0", counter=2, rollback_floor=1,
                            artifacts=[v2.entry()], health=linear_contract(scale=3.0, bias=0.5))
    # v2 goes through the API host, which redirects to a storage host (another host name).
    storage_url = rig.server.add(f"/storage/{v2.sha256}?X-Amz-Signature=abc", v2.data)
    storage_url = storage_url.replace("127.0.0.1", "localhost")
    rig.server.redirects["/api/v1/models/detector/versions/2.0/artifacts/test-hw/download"] = storage_url
    rig.server.files[f"/storage/{v2.sha256}"] = v2.data
    api_url = rig.server.url("/api/v1/models/detector/versions/2.0/artifacts/test-hw/download")

    state = rig.tmp / "dev-1" / "state"
    # The agent enrolled with the API host: its token goes there and nowhere else.
    rig.config("dev-1", telemetry_interval=0.5, server_url=rig.server.url(""))
    agent = rig.agent("dev-1").start()

    rig.publish_directive("dev-1", rig.directive("dev-1", 1, "detector", rel1, v1))
    first = rig.subscriber.wait_outcome("dev-1", 1, agent=agent)
    assert first["state"] == "committed", first
    rig.publish_directive("dev-1", rig.directive("dev-1", 2, "detector", rel2, v2, url=api_url))
    outcome = rig.subscriber.wait_outcome("dev-1", 2, agent=agent)

    assert outcome["state"] == "committed", outcome
    assert [e["state"] for e in rig.subscriber.events_for("dev-1", 2)] == PROGRESS
    assert outcome["active_sha256"] == v2.sha256 and outcome["sha256"] == v2.sha256
    assert outcome["health"]["model_sha256"] == v2.sha256
    assert outcome["health"]["checks"] >= 2 and outcome["health"]["error_rate"] == 0.01
    assert outcome["rollout_id"] == "r-1" and outcome["error_code"] is None
    numbers = [e["event_no"] for e in rig.subscriber.events_for("dev-1")]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)

    app_file = state / "models" / "detector" / "current" / "model.onnx"
    assert app_file.read_bytes() == v2.data
    assert os.readlink(state / "models" / "detector" / "current") == f"../../store/{v2.sha256}"
    assert os.readlink(state / "models" / "detector" / "previous") == f"../../store/{v1.sha256}"
    assert not os.access(state / "store" / v2.sha256 / "model.onnx", os.W_OK) or os.geteuid() == 0
    assert (state / "store" / v2.sha256 / "model.onnx").stat().st_mode & 0o222 == 0
    assert list((state / "staging").iterdir()) == []

    # The device token went to the API host only, never to the storage host it redirected to.
    api_hits = [r for r in rig.server.requests if r["path"].startswith("/api/")]
    storage_hits = [r for r in rig.server.requests if r["path"].startswith("/storage/")]
    assert api_hits and all(r["authorization"] == "Bearer mfd_test_token" for r in api_hits)
    assert storage_hits and all(r["authorization"] is None for r in storage_hits)
    assert storage_hits[0]["host"].startswith("localhost")

    wait_for(lambda: rig.subscriber.presence.get("dev-1", {}).get("active", {}).get("detector") == v2.sha256, 10,
             "presence with the new active model")
    assert rig.subscriber.presence["dev-1"]["online"] is True
    wait_for(lambda: [t for t in rig.subscriber.telemetry if t["device"] == "dev-1"], 10, "telemetry")
    telemetry = [t for t in rig.subscriber.telemetry if t["device"] == "dev-1"][-1]
    for key in ("cpu_percent", "memory_percent", "disk_percent"):
        assert isinstance(telemetry[key], (int, float)), telemetry
    assert telemetry["active"] == {"detector": v2.sha256}

    # A new directive for what is already active converges at once: one committed event, no work.
    rig.publish_directive("dev-1", rig.directive("dev-1", 3, "detector", rel2, v2, url=api_url))
    again = rig.subscriber.wait_outcome("dev-1", 3, agent=agent)
    assert [e["state"] for e in rig.subscriber.events_for("dev-1", 3)] == ["committed"]
    assert again["active_sha256"] == v2.sha256

    # A fleet rollback is a new directive pointing at the previous release (allowed by v2's floor):
    # v1 is still in the store as `previous`, so it is re-verified and re-activated without a download.
    downloads_before = len(rig.server.requests)
    rig.publish_directive("dev-1", rig.directive("dev-1", 4, "detector", rel1, v1))
    back = rig.subscriber.wait_outcome("dev-1", 4, agent=agent)
    assert back["state"] == "committed" and back["active_sha256"] == v1.sha256, back
    assert app_file.read_bytes() == v1.data
    assert len(rig.server.requests) == downloads_before
    rig.publish_directive("dev-1", rig.directive("dev-1", 5, "detector", rel2, v2, url=api_url))
    assert rig.subscriber.wait_outcome("dev-1", 5, agent=agent)["state"] == "committed"

    wait_for(lambda: not list((state / "outbox").glob("*.json")), 15, "the outbox to drain", agent=agent)
    status = subprocess.run(
        [sys.executable, "-m", "agent.cli", "status", "--config", str(rig.tmp / "dev-1" / "agent.toml")],
        capture_output=True, text=True, cwd=REPO, check=True,
    )
    shown = json.loads(status.stdout)
    assert shown["state"] == "idle" and shown["last_seq"] == 5
    assert shown["models"]["detector"]["current"] == v2.sha256 and shown["models"]["detector"]["committed"]
    assert shown["pending_outbox"] == 0

    # Four prechecks ran, all in child processes: the model runtime never entered the daemon.
    maps = open(f"/proc/{agent.pid}/maps").read()
    assert "onnxruntime" not in maps and "libonnx" not in maps

    assert agent.stop() == 0
    wait_for(lambda: rig.subscriber.presence["dev-1"]["online"] is False, 10, "offline presence on stop")
    assert sha256(app_file.read_bytes()).hexdigest() == v2.sha256
    assert journal(state)["models"]["detector"]["committed"] is True
    assert active_fingerprint(state, "detector")[1] == v2.sha256


def test_it_reports_offline_through_its_last_will_when_killed(rig):
    rig.config("dev-w")
    agent = rig.agent("dev-w").start()
    wait_for(lambda: rig.subscriber.presence.get("dev-w", {}).get("online") is True, 15, "online presence", agent=agent)
    agent.proc.kill()
    agent.proc.wait()
    # keepalive 10 s: the broker fires the will after 1.5 x keepalive at the latest
    wait_for(lambda: rig.subscriber.presence["dev-w"]["online"] is False, 25, "the last will")
