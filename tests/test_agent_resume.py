"""Resumable downloads: a server that cuts connections at random offsets, and an agent killed in
the middle of a download. Either way the download finishes without starting over."""

from __future__ import annotations

import random
import signal

import pytest

from tests.support.agent_harness import (
    Artifact,
    ArtifactServer,
    active_file,
    linear_contract,
    release_envelope,
)
from tests.support.onnx_models import linear_model

AGENT_CHUNK = 1 << 20


def _release(rig, artifact):
    return release_envelope(rig.keys, model="detector", version="1.0", counter=1, artifacts=[artifact.entry()],
                            health=linear_contract(scale=3.0, bias=0.5))


@pytest.mark.parametrize("seed", [1, 2])
def test_it_resumes_after_connections_cut_at_random_offsets(rig, seed):
    artifact = Artifact(linear_model(scale=3.0, bias=0.5, padding_bytes=4_000_000))
    size = len(artifact.data)
    cuts = sorted(random.Random(seed).sample(range(1, size), 7))
    rig.server.cuts = list(cuts)
    device = f"cut-{seed}"
    rig.config(device)
    agent = rig.agent(device).start()
    rig.publish_directive(device, rig.directive(device, 1, "detector", _release(rig, artifact), artifact))

    outcome = rig.subscriber.wait_outcome(device, 1, agent=agent)
    assert outcome["state"] == "committed", (outcome, agent.log_text()[-2000:])
    assert active_file(rig.tmp / device / "state", "detector").read_bytes() == artifact.data
    assert rig.server.cuts == [], "every cut happened"
    assert rig.server.bytes_served < 1.2 * size + len(cuts) * ArtifactServer.CHUNK, rig.server.bytes_served
    ranges = [r["range"] for r in rig.server.requests if r["range"]]
    assert len(ranges) >= len(cuts)
    assert all(int(r[6:-1]) in cuts for r in ranges), (ranges, cuts)  # resumed exactly where each cut fell


def test_it_resumes_a_download_after_the_agent_is_killed(rig):
    artifact = Artifact(linear_model(scale=3.0, bias=0.5, padding_bytes=5_000_000))
    size = len(artifact.data)
    rig.server.rate = 16 * 2**20  # keep little in flight, as on a real link
    device = "killed"
    rig.config(device)
    rig.publish_directive(device, rig.directive(device, 1, "detector", _release(rig, artifact), artifact))
    agent = rig.agent(device).start(env={"FLEET_AGENT_CRASH_AT": "download-chunk:2"})
    assert agent.wait(60) == -signal.SIGKILL, agent.log_text()[-2000:]
    part = rig.tmp / device / "state" / "staging" / f"{artifact.sha256}.part"
    assert part.stat().st_size >= 2 * AGENT_CHUNK

    agent.start(env={"FLEET_AGENT_CRASH_AT": ""})
    outcome = rig.subscriber.wait_outcome(device, 1, agent=agent)
    assert outcome["state"] == "committed", (outcome, agent.log_text()[-2000:])
    assert active_file(rig.tmp / device / "state", "detector").read_bytes() == artifact.data
    assert rig.server.bytes_served < 1.2 * size + AGENT_CHUNK, rig.server.bytes_served
    resumed = [r["range"] for r in rig.server.requests if r["range"]]
    assert len(resumed) == 1 and int(resumed[0][6:-1]) >= 2 * AGENT_CHUNK


def test_it_downloads_once_more_when_a_resumed_part_file_is_corrupt(rig):
    # As after a power cut: the part file has the right size so far, but garbage in it.
    artifact = Artifact(linear_model(scale=3.0, bias=0.5, padding_bytes=2_000_000))
    device = "torn"
    rig.config(device)
    staging = rig.tmp / device / "state" / "staging"
    staging.mkdir(parents=True)
    (staging / f"{artifact.sha256}.part").write_bytes(b"\0" * 1_000_000)
    agent = rig.agent(device).start()
    rig.publish_directive(device, rig.directive(device, 1, "detector", _release(rig, artifact), artifact))
    outcome = rig.subscriber.wait_outcome(device, 1, agent=agent)
    assert outcome["state"] == "committed", (outcome, agent.log_text()[-2000:])
    assert active_file(rig.tmp / device / "state", "detector").read_bytes() == artifact.data
    assert [r["range"] for r in rig.server.requests] == ["bytes=1000000-", None]
