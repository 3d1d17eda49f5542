"""Preemption, with real agent processes: a newer directive for the model being updated cancels a
slow download of the older release (failed SUPERSEDED) and starts at once; an emergency revert to
the model already running is confirmed at once; a directive for another model still waits, without
disturbing the download. A kill -9 right after the preemption was journalled resumes correctly
(tests/test_agent_crash.py). Each test starts from a device with v1 installed and committed."""

from __future__ import annotations

import os
import time

import pytest

from tests.support.agent_fixtures import MODEL, add_v2, close_rig, device_from, install_template, make_rig
from tests.support.agent_harness import (
    PROGRESS,
    Artifact,
    active_fingerprint,
    journal,
    linear_contract,
    release_envelope,
    wait_for,
)
from tests.support.onnx_models import linear_model

SLOW = 64 * 1024  # bytes/s: the 4 MB release would take about a minute


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    rig, _ = make_rig(tmp_path_factory.mktemp("preempt"))
    try:
        inst = install_template(rig, update={"reload_command": "true"})
        add_v2(inst, padding_bytes=4_000_000)
        inst.slow_path = f"/slow/{inst.v2.sha256}"
        inst.slow_url = rig.server.add(inst.slow_path, inst.v2.data)
        rig.server.rates[inst.slow_path] = SLOW
        inst.v3 = Artifact(linear_model(scale=4.0, bias=0.25, padding_bytes=100_000))
        inst.rel3 = release_envelope(rig.keys, model=MODEL, version="3.0", counter=3, artifacts=[inst.v3.entry()],
                                     health=linear_contract(scale=4.0, bias=0.25))
        yield inst
    finally:
        close_rig(rig)


def _device(inst, device: str, **update):
    return inst.rig, device_from(inst, device, reload_command="true", **update)


def _slow_download_under_way(inst, device: str, agent, state) -> None:
    """Directive 2 (v2 from the slow path) is downloading, and some of it has arrived."""
    rig = inst.rig
    rig.publish_directive(device, rig.directive(device, 2, MODEL, inst.rel2, inst.v2, url=inst.slow_url))
    served = rig.server.bytes_served
    wait_for(lambda: [e for e in rig.subscriber.events_for(device, 2) if e["state"] == "downloading"]
             and rig.server.bytes_served > served + 3 * SLOW, 60, "the slow download under way", agent=agent)
    assert (journal(state)["update"] or {}).get("phase") == "downloading"


def _states(rig, device: str, seq: int) -> list[tuple]:
    return [(e["state"], e["error_code"]) for e in rig.subscriber.events_for(device, seq)]


def test_a_newer_directive_supersedes_a_slow_download(installed):
    inst = installed
    rig, state = _device(inst, "p-newer")
    agent = rig.agent("p-newer").start()
    _slow_download_under_way(inst, "p-newer", agent, state)

    published = time.monotonic()
    rig.publish_directive("p-newer", rig.directive("p-newer", 3, MODEL, inst.rel3, inst.v3))
    outcome = rig.subscriber.wait_outcome("p-newer", 3, timeout=60, agent=agent)
    took = time.monotonic() - published
    assert outcome["state"] == "committed", outcome
    assert took < 20, f"the newer directive took {took:.1f} s: it waited for the old download"

    superseded = rig.subscriber.outcomes("p-newer", 2)
    assert [(e["state"], e["error_code"]) for e in superseded] == [("failed", "SUPERSEDED")]
    assert "superseded by directive 3 while downloading" in superseded[0]["detail"]
    assert superseded[0]["active_sha256"] == inst.v1.sha256  # nothing was touched
    assert _states(rig, "p-newer", 2) == [("received", None), ("downloading", None), ("failed", "SUPERSEDED")]
    assert [s for s, _ in _states(rig, "p-newer", 3)] == PROGRESS
    superseded_no = superseded[0]["event_no"]
    assert all(e["event_no"] > superseded_no for e in rig.subscriber.events_for("p-newer", 3))

    # The old bytes never became current, and nothing of them is left.
    assert active_fingerprint(state, MODEL)[1] == inst.v3.sha256
    assert not (state / "store" / inst.v2.sha256).exists()
    assert not (state / "staging" / f"{inst.v2.sha256}.part").exists()
    j = journal(state)
    assert j["update"] is None and j["seqs"][MODEL] == 3 and j["models"][MODEL]["current"] == inst.v3.sha256
    assert os.readlink(state / "models" / MODEL / "previous") == f"../../store/{inst.v1.sha256}"
    # The retained directive 3 comes again on a restart: handled, nothing more happens.
    assert agent.stop() == 0
    agent.start()
    wait_for(agent.ready, 30, "agent ready", agent=agent)
    time.sleep(1)
    assert len(rig.subscriber.outcomes("p-newer", 3)) == 1 and len(rig.subscriber.outcomes("p-newer", 2)) == 1
    assert agent.stop() == 0


def test_an_emergency_revert_does_not_wait_for_the_release_it_reverts(installed):
    # The incident: a revert to the model still running waited 200 s behind the download of
    # the release being reverted, which was then installed first.
    inst = installed
    rig, state = _device(inst, "p-revert")
    before = active_fingerprint(state, MODEL)
    agent = rig.agent("p-revert").start()
    _slow_download_under_way(inst, "p-revert", agent, state)

    published = time.monotonic()
    rig.publish_directive("p-revert", rig.directive("p-revert", 3, MODEL, inst.rel1, inst.v1))
    outcome = rig.subscriber.wait_outcome("p-revert", 3, timeout=30, agent=agent)
    assert time.monotonic() - published < 10
    assert (outcome["state"], outcome["detail"], outcome["active_sha256"]) == (
        "committed", "already active and committed", inst.v1.sha256)
    assert _states(rig, "p-revert", 2)[-1] == ("failed", "SUPERSEDED")
    assert active_fingerprint(state, MODEL) == before  # v1 was never switched away from
    wait_for(lambda: not (state / "staging" / f"{inst.v2.sha256}.part").exists(), 5, "the old download dropped")
    j = journal(state)
    assert j["update"] is None and j["last_outcome"]["seq"] == 3 and j["seqs"][MODEL] == 3
    assert agent.stop() == 0


def test_a_directive_for_another_model_still_waits(installed):
    inst = installed
    rig, state = _device(inst, "p-other")
    rig.server.rates[inst.slow_path] = 1_000_000  # a few seconds
    requests_before = len(rig.server.requests)
    try:
        seg = Artifact(linear_model(scale=5.0, bias=0.0, padding_bytes=50_000))
        seg_rel = release_envelope(rig.keys, model="segmenter", version="1.0", counter=1, artifacts=[seg.entry()],
                                   health=linear_contract(scale=5.0, bias=0.0))
        agent = rig.agent("p-other").start()
        rig.publish_directive("p-other", rig.directive("p-other", 2, MODEL, inst.rel2, inst.v2, url=inst.slow_url))
        wait_for(lambda: (journal(state)["update"] or {}).get("phase") == "downloading", 30, "downloading",
                 agent=agent)
        rig.publish_directive("p-other", rig.directive("p-other", 3, "segmenter", seg_rel, seg))

        first = rig.subscriber.wait_outcome("p-other", 2, timeout=90, agent=agent)
        second = rig.subscriber.wait_outcome("p-other", 3, timeout=60, agent=agent)
    finally:
        rig.server.rates[inst.slow_path] = SLOW
    assert first["state"] == "committed" and second["state"] == "committed", (first, second)
    received = rig.subscriber.events_for("p-other", 3)[0]
    assert received["state"] == "received" and received["event_no"] > first["event_no"], "it did not wait"
    # ... and did not disturb the download: one request, never resumed.
    slow_requests = [r for r in rig.server.requests[requests_before:] if r["path"] == inst.slow_path]
    assert [r["range"] for r in slow_requests] == [None], slow_requests
    assert active_fingerprint(state, MODEL)[1] == inst.v2.sha256
    assert agent.stop() == 0


def test_the_retained_presence_reports_models_seqs_and_the_update_in_flight(installed):
    inst = installed
    rig, state = _device(inst, "p-presence")
    agent = rig.agent("p-presence").start()

    def presence():
        return rig.subscriber.presence.get("p-presence") or {}

    wait_for(lambda: presence().get("online"), 15, "online presence", agent=agent)
    # seq 0: the cloned state was the template device's, whose seqs a new device id does not inherit.
    assert presence()["models"] == {MODEL: {"sha256": inst.v1.sha256, "version": "1.0", "committed": True,
                                            "seq": 0}}
    assert presence()["update"] is None and presence()["active"] == {MODEL: inst.v1.sha256}
    _slow_download_under_way(inst, "p-presence", agent, state)
    wait_for(lambda: presence().get("update") == {"model": MODEL, "seq": 2, "phase": "downloading"}, 10,
             "the update in flight in the presence", agent=agent)
    assert presence()["models"][MODEL]["seq"] == 2  # handled: it is the update in flight

    # A reconnect (a restart here) sends it again, from the journal.
    agent.proc.kill()
    agent.wait(10)
    wait_for(lambda: presence().get("online") is False, 25, "the last will")
    assert "models" not in presence()  # the will is fixed at connect time: it carries no figures
    agent.start()
    wait_for(lambda: presence().get("online") and presence().get("update", {}).get("seq") == 2, 20,
             "presence after the restart", agent=agent)
    rig.publish_directive("p-presence", rig.directive("p-presence", 3, MODEL, inst.rel3, inst.v3))
    assert rig.subscriber.wait_outcome("p-presence", 3, agent=agent)["state"] == "committed"
    wait_for(lambda: presence().get("update") is None and presence()["models"][MODEL]["seq"] == 3, 10,
             "presence after the update", agent=agent)
    assert presence()["models"][MODEL] == {"sha256": inst.v3.sha256, "version": "3.0", "committed": True, "seq": 3}
    assert agent.stop() == 0
