"""Crash matrix: the agent SIGKILLs itself (FLEET_AGENT_CRASH_AT test hook) at every journalled
transition and at the side-effect points between them, each twice (once; and once more with the
hook still armed on the restart, so points passed again on resume are killed again). In every run
the app-facing model is old or new and byte-identical to its signed sha at the moment of death,
the restarted agent converges to the directive, and a subscriber sees exactly one outcome event
for the directive seq.

Then restarts judged: power loss during a trial (kill -9 between the model's hooks) is no verdict on
the model; an agent killed by the model's own hooks (reload or health command) rolls back after
update.max_trial_restarts such deaths, and the loop guard (ROLLBACK_LOOP) still ends any loop. And
a preemption killed right after it was journalled resumes on the newer directive."""

from __future__ import annotations

import os
import signal
import threading
import time
from hashlib import sha256

import pytest

from tests.support.agent_fixtures import MODEL, add_v2, close_rig, device_from, install_template, make_rig
from tests.support.agent_harness import (
    HEALTH_FAILS,
    HEALTH_OK,
    PROGRESS,
    Artifact,
    active_file,
    journal,
    linear_contract,
    release_envelope,
    wait_for,
)
from tests.support.onnx_models import linear_model

# (crash point, its occurrence). download-chunk needs an artifact of several 1 MiB chunks.
POINTS = [
    "received",
    "event-queued",
    "downloading",
    "download-chunk:2",
    "verifying",
    "staged",
    "prechecking",
    "activating",
    "swapped",
    "reloaded",
    "trial",
    "model-hook",
    "committed",
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    rig, _ = make_rig(tmp_path_factory.mktemp("crash"))
    try:
        inst = install_template(rig, update={"reload_command": "true"})
        add_v2(inst, padding_bytes=3_500_000)
        yield inst
    finally:
        close_rig(rig)


def _check_active(state, allowed: dict[str, bytes]) -> str:
    """The app-facing file is one of the allowed versions, byte-identical to its sha, and the
    symlink names exactly that sha."""
    path = active_file(state, MODEL)
    assert path is not None, "no active model after a crash"
    digest = sha256(path.read_bytes()).hexdigest()
    assert digest in allowed, f"active file has sha {digest}, neither old nor new"
    assert os.readlink(state / "models" / MODEL / "current") == f"../../store/{digest}"
    return digest


def _run(inst, device: str, point: str, double: bool, update: dict | None = None, expect: str = "committed") -> None:
    rig = inst.rig
    state = device_from(inst, device, reload_command="true", **(update or {}))
    final = inst.v2 if expect == "committed" else inst.v1
    rig.publish_directive(device, rig.directive(device, 2, MODEL, inst.rel2, inst.v2))
    allowed = {inst.v1.sha256: inst.v1.data, inst.v2.sha256: inst.v2.data}
    crash_env = {"FLEET_AGENT_CRASH_AT": point}

    agent = rig.agent(device).start(env=crash_env)
    assert agent.wait(60) == -signal.SIGKILL, f"agent did not die at {point}:\n{agent.log_text()[-3000:]}"
    _check_active(state, allowed)
    if double:
        # Restart with the hook still armed: a point passed again while resuming kills again.
        agent.start(env=crash_env)
        wait_for(lambda: not agent.alive() or rig.subscriber.outcomes(device, 2), 60, "death or outcome", agent=agent)
        if not agent.alive():
            assert agent.proc.returncode == -signal.SIGKILL, agent.log_text()[-3000:]
            _check_active(state, allowed)
    if not agent.alive():
        agent.start(env={"FLEET_AGENT_CRASH_AT": ""})
    outcome = rig.subscriber.wait_outcome(device, 2, timeout=60, agent=agent)
    assert outcome["state"] == expect, (outcome, agent.log_text()[-3000:])
    wait_for(agent.ready, 30, "agent ready", agent=agent)
    assert agent.stop() == 0

    assert _check_active(state, allowed) == final.sha256
    assert active_file(state, MODEL).read_bytes() == final.data
    j = journal(state)
    assert j["update"] is None and j["models"][MODEL]["committed"] and j["last_seq"] == 2
    # Exactly one outcome per directive seq as the server would see it (deduplicated by event_no)...
    assert len(rig.subscriber.outcomes(device, 2)) == 1
    # ...and no event number was ever reused for a different message.
    with rig.subscriber.lock:
        raw = [e for e in rig.subscriber.events if e["device_id"] == device]
    by_no: dict[int, set] = {}
    for e in raw:
        by_no.setdefault(e["event_no"], set()).add((e["state"], e["seq"], e["error_code"]))
    assert all(len(v) == 1 for v in by_no.values()), by_no
    assert [e["state"] for e in rig.subscriber.events_for(device, 2)][-1] == expect
    if expect == "rolled_back":
        assert inst.v2.sha256 in j["denylist"]


def _both(inst, point: str, prefix: str, **kwargs) -> None:
    """Run a crash point twice in parallel: killed once, and killed again on every restart."""
    base = point.replace(":", "-")
    errors: list[BaseException] = []

    def run(device, double):
        try:
            _run(inst, device, point, double, **kwargs)
        except BaseException as exc:  # surfaced below, in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"{prefix}-{base}-{i}", i == 1)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    if errors:
        raise errors[0]


@pytest.mark.parametrize("point", POINTS)
def test_it_survives_sigkill_at_every_transition(installed, point):
    _both(installed, point, "c")


# The way back is journalled too: a kill while rolling back must still end on v1, reported once.
ROLLBACK_POINTS = ["rolling_back", "swapped-back", "rolled_back"]


@pytest.mark.parametrize("point", ROLLBACK_POINTS)
def test_it_survives_sigkill_while_rolling_back(installed, point):
    _both(installed, point, "cb", update={"health_command": HEALTH_FAILS}, expect="rolled_back")


def _fresh(inst, device: str, update: dict):
    rig = inst.rig
    state = device_from(inst, device, **update)
    rig.publish_directive(device, rig.directive(device, 2, MODEL, inst.rel2, inst.v2))
    return rig, state, rig.agent(device)


@pytest.mark.parametrize("health", ["app-probe", "none"])
def test_a_healthy_model_survives_power_loss_during_its_trial(installed, health):
    # Four power cuts during the trial, one more than update.max_trial_restarts (3): the agent used
    # to count each as a failed trial and roll back a model nothing had found wrong. With the
    # default configuration (no health command) nothing probes the app at all.
    device = f"c-power-{health}"
    update = {"trial_seconds": 4, "health_interval_seconds": 1.0, "reload_command": "true",
              "health_command": HEALTH_OK if health == "app-probe" else ""}
    rig, state, agent = _fresh(installed, device, update)
    for kills in range(4):
        agent.start()
        # Between two health checks (not while the hook runs: that would be the model's doing).
        wait_for(lambda k=kills: (u := journal(state).get("update") or {}).get("phase") == "trial"
                 and u.get("trial_restarts") == k and not u.get("hook") and agent.ready(), 60,
                 "the trial", agent=agent)
        agent.proc.kill()
        agent.wait(10)
        _check_active(state, {installed.v1.sha256: b"", installed.v2.sha256: b""})
    agent.start()
    outcome = rig.subscriber.wait_outcome(device, 2, agent=agent)
    assert (outcome["state"], outcome["error_code"]) == ("committed", None), outcome
    assert outcome["health"]["trial_restarts"] == 4
    assert outcome["health"]["checks"] >= (4 if health == "app-probe" else 0)
    assert _check_active(state, {installed.v2.sha256: b""}) == installed.v2.sha256
    assert installed.v2.sha256 not in journal(state)["denylist"]
    assert len(rig.subscriber.outcomes(device, 2)) == 1
    wait_for(agent.ready, 30, "agent ready", agent=agent)
    assert agent.stop() == 0


def _until_outcome(rig, device: str, agent, limit: int) -> int:
    """Start the agent again each time it dies, until the directive has an outcome; the restarts."""
    restarts = 0
    while not rig.subscriber.outcomes(device, 2):
        assert restarts < limit, f"no way out of the crash loop\n{agent.log_text()[-3000:]}"
        agent.start()
        wait_for(lambda: not agent.alive() or rig.subscriber.outcomes(device, 2), 60, "death or outcome",
                 agent=agent)
        restarts += 1
    return restarts


def test_it_rolls_back_when_the_health_command_kills_the_agent(installed):
    # The model's own probe takes the agent down at every check: that is the model's doing.
    rig, state, agent = _fresh(installed, "c-health-kills", {"health_command": "kill -9 $PPID",
                                                            "reload_command": "true", "trial_seconds": 30})
    _until_outcome(rig, "c-health-kills", agent, 8)
    outcome = rig.subscriber.outcomes("c-health-kills", 2)[0]
    assert (outcome["state"], outcome["error_code"]) == ("rolled_back", "TRIAL_FAILED"), outcome
    assert "the agent died 4 times while the model's health command ran" in outcome["detail"]
    assert _check_active(state, {installed.v1.sha256: b""}) == installed.v1.sha256
    assert installed.v2.sha256 in journal(state)["denylist"]
    wait_for(agent.ready, 30, "agent ready", agent=agent)
    assert agent.stop() == 0


@pytest.mark.parametrize("tolerated,code", [(3, "ACTIVATE_FAILED"), (50, "ROLLBACK_LOOP")])
def test_it_breaks_a_crash_loop(installed, tolerated, code):
    # The reload hook kills the agent every time it runs, at every start of the trial: without a
    # cap this never ends. The deaths are the model's (they happen inside its hook): past
    # max_trial_restarts it rolls back; tolerate more, and the loop guard ends it (ROLLBACK_LOOP).
    device = f"c-loop-{tolerated}"
    rig, state, agent = _fresh(installed, device, {"reload_command": "kill -9 $PPID", "max_transitions": 10,
                                                   "max_trial_restarts": tolerated})
    _until_outcome(rig, device, agent, 15)
    outcome = rig.subscriber.outcomes(device, 2)[0]
    assert (outcome["state"], outcome["error_code"]) == ("rolled_back", code), outcome
    # The way back does not run the hook that killed it again and again.
    assert "reload command skipped" in outcome["detail"]
    assert _check_active(state, {installed.v1.sha256: b""}) == installed.v1.sha256
    agent.stop()


def test_it_resumes_a_preemption_killed_right_after_it_was_journalled(installed):
    rig = installed.rig
    device = "c-superseded"
    state = device_from(installed, device, reload_command="true")
    slow = f"/slow-crash/{installed.v2.sha256}"
    rig.server.rates[slow] = 64 * 1024
    v3 = Artifact(linear_model(scale=4.0, bias=0.25, padding_bytes=100_000))
    rel3 = release_envelope(rig.keys, model=MODEL, version="3.0", counter=3, artifacts=[v3.entry()],
                            health=linear_contract(scale=4.0, bias=0.25))
    rig.publish_directive(device, rig.directive(device, 2, MODEL, installed.rel2, installed.v2,
                                                url=rig.server.add(slow, installed.v2.data)))
    agent = rig.agent(device).start(env={"FLEET_AGENT_CRASH_AT": "superseded"})
    wait_for(lambda: (journal(state)["update"] or {}).get("phase") == "downloading", 30, "downloading", agent=agent)
    time.sleep(1)
    rig.publish_directive(device, rig.directive(device, 3, MODEL, rel3, v3))
    assert agent.wait(30) == -signal.SIGKILL, agent.log_text()[-3000:]
    j = journal(state)
    assert (j["update"]["seq"], j["update"]["phase"], j["last_outcome"]["error_code"]) == (3, "received", "SUPERSEDED")
    _check_active(state, {installed.v1.sha256: b""})

    agent.start(env={"FLEET_AGENT_CRASH_AT": ""})
    outcome = rig.subscriber.wait_outcome(device, 3, agent=agent)
    assert outcome["state"] == "committed", outcome
    assert [(e["state"], e["error_code"]) for e in rig.subscriber.outcomes(device, 2)] == [("failed", "SUPERSEDED")]
    assert [e["state"] for e in rig.subscriber.events_for(device, 3)] == PROGRESS
    wait_for(agent.ready, 30, "agent ready", agent=agent)
    assert agent.stop() == 0
    assert _check_active(state, {v3.sha256: b""}) == v3.sha256
    assert not (state / "store" / installed.v2.sha256).exists()
    with rig.subscriber.lock:
        raw = [e for e in rig.subscriber.events if e["device_id"] == device]
    by_no: dict[int, set] = {}
    for e in raw:
        by_no.setdefault(e["event_no"], set()).add((e["state"], e["seq"], e["error_code"]))
    assert all(len(v) == 1 for v in by_no.values()), by_no


def test_it_keeps_the_new_model_when_previous_fails_re_verification(installed):
    # Bit rot in v1's stored bytes: switching back to them would be worse than keeping v2.
    rig, state, agent = _fresh(installed, "c-rotten-previous", {"health_command": HEALTH_FAILS})
    stored = state / "store" / installed.v1.sha256 / "model.onnx"
    stored.parent.chmod(0o755)
    stored.chmod(0o644)
    rotten = bytearray(stored.read_bytes())
    rotten[-1] ^= 0xFF
    stored.write_bytes(bytes(rotten))
    agent.start()
    outcome = rig.subscriber.wait_outcome("c-rotten-previous", 2, agent=agent)
    assert (outcome["state"], outcome["error_code"]) == ("failed", "ROLLBACK_FAILED"), outcome
    assert "failed re-verification" in outcome["detail"]
    assert _check_active(state, {installed.v2.sha256: b""}) == installed.v2.sha256
    assert len(rig.subscriber.outcomes("c-rotten-previous", 2)) == 1
    assert agent.stop() == 0
