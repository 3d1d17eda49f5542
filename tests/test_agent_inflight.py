"""The typed in-flight update reads and writes the journal layout agents have always written.

The JSON below was captured from journals the agent wrote before the record was typed (the
commit before agent/inflight.py existed): a first install, an update with a previous model, a
failed trial on its way back, and a local rollback. Only the artifact server's port was fixed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config import Config, UpdateConfig
from agent.daemon import Agent
from agent.inflight import InFlightUpdate
from agent.journal import Journal, atomic_write_json, empty_journal
from agent.machine import Phase

V1 = "b016cb54874747f7e8f86aaa3f0cc31610e55a4aa630251012ea06a66d8f63cc"
V2 = "9f8541ec24901c02de60c73089b7002c3ee25fa2d3d8c1128c067573a963b7d9"

RECEIVED = """{"phase": "received", "seq": 1, "model": "detector", "version": "1.0", "counter": 1, "rollback_floor": 0, "rollout_id": "r-1", "sha": "b016cb54874747f7e8f86aaa3f0cc31610e55a4aa630251012ea06a66d8f63cc", "length": 152, "file_name": "model.onnx", "url": "http://127.0.0.1:8000/a/b016cb54874747f7e8f86aaa3f0cc31610e55a4aa630251012ea06a66d8f63cc", "health": {"atol": 1e-05, "inputs": {"x": {"data": [0.0, 0.3333333432674408], "dtype": "float32", "shape": [2, 1]}}, "latency_budget_ms": 1000.0, "outputs": {"y": {"data": [1.0, 1.6666667461395264], "dtype": "float32", "shape": [2, 1]}}, "rtol": 0.0001}, "transitions": 1, "started": "2026-12-01T13:03:56Z"}"""  # noqa: E501
ACTIVATING_FIRST = """{"phase": "activating", "seq": 1, "model": "detector", "version": "1.0", "counter": 1, "rollback_floor": 0, "rollout_id": "r-1", "sha": "b016cb54874747f7e8f86aaa3f0cc31610e55a4aa630251012ea06a66d8f63cc", "length": 152, "file_name": "model.onnx", "url": "http://127.0.0.1:8000/a/b016cb54874747f7e8f86aaa3f0cc31610e55a4aa630251012ea06a66d8f63cc", "health": {"atol": 1e-05, "inputs": {"x": {"data": [0.0, 0.3333333432674408], "dtype": "float32", "shape": [2, 1]}}, "latency_budget_ms": 1000.0, "outputs": {"y": {"data": [1.0, 1.6666667461395264], "dtype": "float32", "shape": [2, 1]}}, "rtol": 0.0001}, "transitions": 5, "started": "2026-12-01T13:03:56Z", "previous_model": null, "precheck_latency_ms": 0.006167000037748949}"""  # noqa: E501
TRIAL = """{"phase": "trial", "seq": 2, "model": "detector", "version": "2.0", "counter": 2, "rollback_floor": 1, "rollout_id": "r-1", "sha": "9f8541ec24901c02de60c73089b7002c3ee25fa2d3d8c1128c067573a963b7d9", "length": 152, "file_name": "model.onnx", "url": "http://127.0.0.1:8000/a/9f8541ec24901c02de60c73089b7002c3ee25fa2d3d8c1128c067573a963b7d9", "health": {"atol": 1e-05, "inputs": {"x": {"data": [0.0, 0.3333333432674408], "dtype": "float32", "shape": [2, 1]}}, "latency_budget_ms": 1000.0, "outputs": {"y": {"data": [0.5, 1.5], "dtype": "float32", "shape": [2, 1]}}, "rtol": 0.0001}, "transitions": 6, "started": "2026-12-01T13:03:56Z", "previous_model": {"committed": true, "counter": 1, "current": "b016cb54874747f7e8f86aaa3f0cc31610e55a4aa630251012ea06a66d8f63cc", "file_name": "model.onnx", "previous": null, "version": "1.0"}, "precheck_latency_ms": 0.006521000045722758, "trial_restarts": 0}"""  # noqa: E501
ROLLING_BACK_TRIAL_FAILED = """{"phase": "rolling_back", "seq": 2, "model": "detector", "version": "2.0", "counter": 2, "rollback_floor": 1, "rollout_id": "r-1", "sha": "9f8541ec24901c02de60c73089b7002c3ee25fa2d3d8c1128c067573a963b7d9", "length": 152, "file_name": "model.onnx", "url": "http://127.0.0.1:8000/a/9f8541ec24901c02de60c73089b7002c3ee25fa2d3d8c1128c067573a963b7d9", "health": {}, "transitions": 7, "started": "2026-12-01T13:03:56Z", "previous_model": {"committed": true, "counter": 1, "current": "b016cb54874747f7e8f86aaa3f0cc31610e55a4aa630251012ea06a66d8f63cc", "file_name": "model.onnx", "previous": null, "version": "1.0"}, "precheck_latency_ms": 0.006521000045722758, "trial_restarts": 0, "error_code": "TRIAL_FAILED", "detail": "health command exited 3: inference server is down"}"""  # noqa: E501
LOCAL_ROLLBACK = """{"phase": "rolling_back", "seq": 0, "model": "detector", "sha": "1d9a8e29c63f883fcfe5ac310e9dc99422f91e23827603013a9a9295ec9bf145", "file_name": "model.onnx", "version": "3.0", "rollout_id": null, "transitions": 1, "local": true, "previous_model": {"current": "b016cb54874747f7e8f86aaa3f0cc31610e55a4aa630251012ea06a66d8f63cc", "previous": null, "file_name": "model.onnx", "committed": true}, "error_code": "LOCAL_ROLLBACK", "detail": "rolled back locally by an operator", "started": "2026-12-01T13:03:56Z"}"""  # noqa: E501

OLD = {
    "received": RECEIVED,
    "activating_first": ACTIVATING_FIRST,
    "trial": TRIAL,
    "rolling_back_trial_failed": ROLLING_BACK_TRIAL_FAILED,
    "local_rollback": LOCAL_ROLLBACK,
}


def _refetched() -> dict:
    # What verifying → downloading wrote after a bad resumed .part: the downloading record plus the flag.
    return {**json.loads(RECEIVED), "phase": "downloading", "transitions": 4, "refetched": True}


@pytest.mark.parametrize("name", sorted(OLD))
def test_it_loads_and_rewrites_an_old_journal_update_key_for_key(name):
    raw = json.loads(OLD[name])
    upd = InFlightUpdate.from_json(raw)
    assert upd.to_json() == raw
    assert upd.phase is Phase(raw["phase"])


def test_it_reads_the_fields_the_steps_use():
    trial = InFlightUpdate.from_json(json.loads(TRIAL))
    assert (trial.seq, trial.model, trial.sha, trial.file_name, trial.length) == (2, "detector", V2, "model.onnx", 152)
    assert (trial.version, trial.counter, trial.rollback_floor, trial.rollout_id) == ("2.0", 2, 1, "r-1")
    assert trial.previous_sha == V1 and trial.previous_model["version"] == "1.0"
    assert trial.health["atol"] == 1e-05 and trial.trial_restarts == 0 and trial.transitions == 6
    assert (trial.error_code, trial.detail, trial.refetched, trial.local) == (None, "", False, False)

    first = InFlightUpdate.from_json(json.loads(ACTIVATING_FIRST))
    assert first.previous_model is None and first.previous_sha is None
    assert "previous_model" in first.to_json()  # null stays null, not absent

    local = InFlightUpdate.from_json(json.loads(LOCAL_ROLLBACK))
    assert local.local and local.seq == 0 and local.error_code == "LOCAL_ROLLBACK"
    assert (local.counter, local.length, local.url, local.health) == (None, None, None, None)
    assert not {"counter", "length", "url", "health", "trial_restarts", "refetched"} & set(local.to_json())

    refetched = InFlightUpdate.from_json(_refetched())
    assert refetched.refetched and refetched.to_json() == _refetched()


def test_it_writes_a_changed_key_even_at_its_default_as_the_dict_did():
    upd = InFlightUpdate.from_json(json.loads(RECEIVED))
    moved = upd.evolve(phase=Phase.TRIAL, trial_restarts=0, previous_model=None, transitions=2)
    out = moved.to_json()
    assert (out["phase"], out["trial_restarts"], out["previous_model"], out["transitions"]) == ("trial", 0, None, 2)
    assert "refetched" not in out and "error_code" not in out


def test_it_keeps_keys_it_does_not_know():
    raw = {**json.loads(TRIAL), "download_mirror": "http://mirror/x"}
    assert InFlightUpdate.from_json(raw).evolve(transitions=7).to_json() == {**raw, "transitions": 7}


def test_it_refuses_a_phase_it_does_not_know():
    with pytest.raises(ValueError):
        InFlightUpdate.from_json({**json.loads(TRIAL), "phase": "flashing"})


# --- a real agent on an old journal file ----------------------------------------------------------


def _old_journal(tmp_path, update: dict, **top) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    data = {**empty_journal(), "last_seq": update["seq"], "event_no": 6, **top, "update": update}
    atomic_write_json(state / "journal.json", data)
    return state


def test_it_drives_an_update_from_an_old_journal(tmp_path):
    state = _old_journal(tmp_path, json.loads(RECEIVED))
    assert Journal(state).update == InFlightUpdate.from_json(json.loads(RECEIVED))
    agent = Agent(Config(device_id="box-1", hardware="test-hw", state_dir=state,
                         update=UpdateConfig(disk_reserve_mb=1e9)))
    agent.recover()
    agent.drive()
    data = json.loads((state / "journal.json").read_text())
    assert data["update"] is None
    assert (data["last_outcome"]["state"], data["last_outcome"]["error_code"]) == ("failed", "DISK_FULL")
    event = json.loads(agent.outbox.pending()[-1].read_bytes())
    assert (event["seq"], event["event_no"], event["state"]) == (1, 7, "failed")


def test_it_resumes_an_old_trial_journal_after_a_restart_without_judging_the_restart(tmp_path):
    # An old journal has no hook mark: nothing says the model caused the restart (a power cut
    # looks the same), so even with no restart tolerated the trial goes on; the restart is counted.
    models = {"detector": {"current": V2, "previous": V1, "file_name": "model.onnx", "committed": False,
                           "version": "2.0", "counter": 2}}
    state = _old_journal(tmp_path, json.loads(TRIAL), models=models)
    agent = Agent(Config(device_id="box-1", hardware="test-hw", state_dir=state,
                         update=UpdateConfig(max_trial_restarts=0)))
    agent.recover()
    expected = {**json.loads(TRIAL), "transitions": 7, "trial_restarts": 1}
    assert json.loads((state / "journal.json").read_text())["update"] == expected


@pytest.mark.parametrize("command,phase,code", [("health", "trial", "TRIAL_FAILED"),
                                                ("reload", "activating", "ACTIVATE_FAILED")])
def test_it_rolls_back_when_the_agent_died_in_a_model_hook_too_often(tmp_path, command, phase, code):
    from agent.daemon import boot_id

    models = {"detector": {"current": V2, "previous": V1, "file_name": "model.onnx", "committed": False,
                           "version": "2.0", "counter": 2}}
    marked = {**json.loads(TRIAL), "phase": phase, "hook": {"command": command, "boot_id": boot_id()},
              "hook_deaths": 1}
    state = _old_journal(tmp_path, marked, models=models)
    Agent(Config(device_id="box-1", hardware="test-hw", state_dir=state,
                 update=UpdateConfig(max_trial_restarts=1))).recover()
    upd = json.loads((state / "journal.json").read_text())["update"]
    assert (upd["phase"], upd["error_code"], upd["hook_deaths"], upd["hook"]) == ("rolling_back", code, 2, None)
    assert upd["detail"] == f"the agent died 2 times while the model's {command} command ran"


def test_it_does_not_count_a_hook_cut_short_by_a_reboot(tmp_path):
    marked = {**json.loads(TRIAL), "hook": {"command": "health", "boot_id": "another-boot"}, "hook_deaths": 3}
    state = _old_journal(tmp_path, marked)
    Agent(Config(device_id="box-1", hardware="test-hw", state_dir=state,
                 update=UpdateConfig(max_trial_restarts=0))).recover()
    upd = json.loads((state / "journal.json").read_text())["update"]
    assert (upd["phase"], upd["hook_deaths"], upd["hook"], upd["trial_restarts"]) == ("trial", 3, None, 1)
