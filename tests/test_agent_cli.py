"""fleet-agent CLI: `verify` checks envelopes offline, `rollback` switches to `previous` (through
the running daemon, or directly when it is stopped), `status` shows the state."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys


from tests.support.agent_harness import (
    REPO,
    Artifact,
    active_fingerprint,
    journal,
    other_key,
    release_envelope,
    wait_for,
)
from tests.support.onnx_models import linear_model


def cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def test_it_verifies_envelopes_offline(rig, tmp_path):
    config = rig.config("dev-v")
    v1 = Artifact(linear_model())
    rel = release_envelope(rig.keys, model="m", version="1", counter=1, artifacts=[v1.entry()])
    directive = rig.directive("dev-v", 4, "m", rel, v1)
    (tmp_path / "release.json").write_text(json.dumps(rel))
    (tmp_path / "directive.json").write_bytes(directive)

    ok = cli("verify", str(tmp_path / "release.json"), "--config", str(config))
    assert ok.returncode == 0 and ok.stdout.startswith("OK ") and '"has_artifact_for_this_device": true' in ok.stdout
    ok = cli("verify", str(tmp_path / "directive.json"), "--config", str(config))
    assert ok.returncode == 0 and '"seq": 4' in ok.stdout and '"for_this_device": true' in ok.stdout

    tampered = json.loads(directive)
    tampered["payload"] = base64.b64encode(base64.b64decode(tampered["payload"]).replace(b'"seq":4', b'"seq":5')).decode()
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    bad = cli("verify", str(tmp_path / "tampered.json"), "--config", str(config))
    assert bad.returncode == 1 and bad.stdout.startswith("REFUSED SIGNATURE_INVALID")

    foreign = release_envelope(rig.keys, model="m", version="1", counter=1, artifacts=[v1.entry()], key=other_key())
    (tmp_path / "foreign.json").write_text(json.dumps(foreign))
    bad = cli("verify", str(tmp_path / "foreign.json"), "--config", str(config))
    assert bad.returncode == 1 and bad.stdout.startswith("REFUSED UNKNOWN_KEY")

    (tmp_path / "junk.json").write_text("{nope")
    bad = cli("verify", str(tmp_path / "junk.json"), "--config", str(config))
    assert bad.returncode == 1 and bad.stdout.startswith("REFUSED MALFORMED")
    missing = cli("verify", str(tmp_path / "missing.json"), "--config", str(config))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_it_rolls_back_locally_through_the_daemon_and_without_it(rig):
    v1 = Artifact(linear_model(scale=2.0, bias=1.0))
    v2 = Artifact(linear_model(scale=3.0, bias=0.5))
    rel1 = release_envelope(rig.keys, model="m", version="1", counter=1, artifacts=[v1.entry()])
    rel2 = release_envelope(rig.keys, model="m", version="2", counter=2, artifacts=[v2.entry()])
    config = rig.config("dev-rb")
    state = rig.tmp / "dev-rb" / "state"
    agent = rig.agent("dev-rb").start()
    rig.publish_directive("dev-rb", rig.directive("dev-rb", 1, "m", rel1, v1))
    assert rig.subscriber.wait_outcome("dev-rb", 1, agent=agent)["state"] == "committed"
    rig.publish_directive("dev-rb", rig.directive("dev-rb", 2, "m", rel2, v2))
    assert rig.subscriber.wait_outcome("dev-rb", 2, agent=agent)["state"] == "committed"
    v1_store_mtime = (state / "store" / v1.sha256 / "model.onnx").stat().st_mtime_ns

    done = cli("rollback", "m", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert f"active {v1.sha256}" in done.stdout
    assert active_fingerprint(state, "m") == (f"../../store/{v1.sha256}", v1.sha256, v1_store_mtime)
    event = wait_for(lambda: [e for e in rig.subscriber.events_for("dev-rb", 0) if e["state"] == "rolled_back"], 15,
                     "the rollback event", agent=agent)[0]
    assert event["error_code"] == "LOCAL_ROLLBACK" and event["active_sha256"] == v1.sha256
    assert v2.sha256 in journal(state)["denylist"]

    # Nothing older left to go back to, and now with the daemon stopped: refused, exit 1.
    assert agent.stop() == 0
    again = cli("rollback", "m", "--config", str(config))
    assert again.returncode == 1 and "no previous version" in again.stderr
    unknown = cli("rollback", "nope", "--config", str(config))
    assert unknown.returncode == 1 and "not installed" in unknown.stderr

    status = json.loads(cli("status", "--config", str(config)).stdout)
    assert status["models"]["m"]["current"] == v1.sha256 and status["state"] == "idle"
    assert status["last_outcome"]["error_code"] == "LOCAL_ROLLBACK"
    assert status["models"]["m"]["committed"] and status["update"] is None
    # The last directive seq and the outbox, which every event above has left (all were delivered).
    assert status["last_seq"] == 2 and status["pending_outbox"] == 0


def test_it_refuses_a_second_agent_on_the_same_state_dir(rig):
    config = rig.config("dev-lock")
    first = rig.agent("dev-lock").start()
    wait_for(first.ready, 20, "first agent up", agent=first)
    second = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(config)], capture_output=True,
                            text=True, cwd=REPO, timeout=30, env={k: v for k, v in os.environ.items()})
    assert second.returncode == 3 and "another fleet-agent is running" in second.stderr
