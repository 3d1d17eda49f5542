"""An operator's explicit retry lifts a deny-list entry, with a real agent process: a device that
rolled v2 back refuses it (DENYLISTED) ever after, unless a directive says `retry_denied`; then
the entry comes off in the journal write that starts the update (a kill -9 right after it resumes
the retry, never refuses it), and the retried v2 commits."""

from __future__ import annotations

import signal

import pytest

from tests.support.agent_fixtures import MODEL, add_v2, close_rig, device_from, install_template, make_rig
from tests.support.agent_harness import (
    HEALTH_FAILS,
    PROGRESS,
    active_fingerprint,
    journal,
    wait_for,
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    rig, _ = make_rig(tmp_path_factory.mktemp("retry"))
    try:
        inst = install_template(rig, update={"reload_command": "true"})
        add_v2(inst, padding_bytes=200_000)
        yield inst
    finally:
        close_rig(rig)


def test_an_operators_retry_lifts_the_denylist_entry(installed):
    inst, device = installed, "r-retry"
    rig = inst.rig
    # The app is broken during the first try: v2 fails its trial and is deny-listed.
    state = device_from(inst, device, reload_command="true", health_command=HEALTH_FAILS)
    agent = rig.agent(device).start()
    rig.publish_directive(device, rig.directive(device, 2, MODEL, inst.rel2, inst.v2))
    first = rig.subscriber.wait_outcome(device, 2, agent=agent)
    assert (first["state"], first["error_code"]) == ("rolled_back", "TRIAL_FAILED"), first
    assert inst.v2.sha256 in journal(state)["denylist"]
    wait_for(agent.ready, 30, "agent ready", agent=agent)
    assert agent.stop() == 0

    # The app is fixed. A plain retry is refused, as before.
    rig.config(device, state_dir=state, update={"reload_command": "true"})
    agent.start()
    rig.publish_directive(device, rig.directive(device, 3, MODEL, inst.rel2, inst.v2))
    plain = rig.subscriber.wait_outcome(device, 3, agent=agent)
    assert (plain["state"], plain["error_code"]) == ("rejected", "DENYLISTED"), plain
    wait_for(agent.ready, 30, "agent ready", agent=agent)
    assert agent.stop() == 0

    # The operator's explicit retry: killed right after the journal write that lifts the entry.
    agent.start(env={"FLEET_AGENT_CRASH_AT": "received"})
    rig.publish_directive(device, rig.directive(device, 4, MODEL, inst.rel2, inst.v2, retry_denied=True))
    assert agent.wait(30) == -signal.SIGKILL, agent.log_text()[-3000:]
    j = journal(state)
    assert inst.v2.sha256 not in j["denylist"] and j["update"]["seq"] == 4
    agent.start(env={"FLEET_AGENT_CRASH_AT": ""})
    retried = rig.subscriber.wait_outcome(device, 4, agent=agent)
    assert retried["state"] == "committed", retried
    events = rig.subscriber.events_for(device, 4)
    assert [e["state"] for e in events] == PROGRESS
    assert "retry_denied" in events[0]["detail"]
    assert active_fingerprint(state, MODEL)[1] == inst.v2.sha256
    assert journal(state)["denylist"] == []
    wait_for(agent.ready, 30, "agent ready", agent=agent)
    assert agent.stop() == 0
