"""The on-disk journal: the single source of truth for what the agent has done and intends to do.

Every write goes temp file → fsync → os.replace → fsync of the directory, so after a power cut
the journal is either the old or the new version, never a torn one. The daemon writes the
journal *before* each side effect, and every step is safe to run twice.

Crash hook (test-only, compiled in): FLEET_AGENT_CRASH_AT=<point>[:<n>] makes the agent
SIGKILL itself the n-th time (default 1st) it passes <point>. Points are the journalled
transitions (received, downloading, verifying, prechecking, waiting_for_window, activating, trial,
trial-restart, resume, rolling_back, committed, failed, rolled_back, rejected, superseded), the
model-hook marks (model-hook, model-hook-done), parking (parked, unparked), plus side-effect points between them (download-chunk, staged,
swapped, reloaded, swapped-back, event-queued). Leave it unset in production.
"""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path
from typing import Any

from agent.inflight import InFlightUpdate

CRASH_ENV = "FLEET_AGENT_CRASH_AT"
_crash_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a command the agent runs: the crash hook is for the agent process alone."""
    env = {**os.environ, **extra}
    env.pop(CRASH_ENV, None)
    return env


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode("utf-8"))


def record_handled_seq(data: dict, *, model: str, seq: int) -> None:
    """Remember `seq` as handled for `model` (in a journal snapshot about to be committed)."""
    seqs = data.setdefault("seqs", {})
    seqs[model] = max(seqs.get(model, 0), seq)
    data["last_seq"] = max(data.get("last_seq", 0), seq)


def empty_journal() -> dict:
    return {
        "version": 1,
        "device_id": None,  # the device identity last_seq and the events belong to (agent.identity)
        "last_seq": 0,  # highest authentic directive seq this device accepted or refused (any model)
        # model -> the highest seq handled for that model. Seqs come from one per-device counter on
        # the server, but each model has its own retained directive, so after a reconnect an older
        # seq of one model may arrive after a newer one of another: replays are judged per model.
        "seqs": {},
        "seq_floor": 0,  # a journal from before per-model seqs: its last_seq bounds every model
        "event_no": 0,  # last event number handed out (per device, strictly increasing)
        "models": {},  # name -> {current, previous, file_name, committed, counter, version}
        "floors": {},  # name -> rollback floor from the newest committed release
        "denylist": [],  # artifact sha256s that failed a trial here
        "update": None,  # the in-flight update, with its phase (agent.inflight.InFlightUpdate)
        # model -> an update parked in waiting_for_window until one of its maintenance windows
        # opens (agent.machine): out of the in-flight slot, so other models' updates may run.
        "waiting": {},
        "last_outcome": None,
        "last_events": [],  # events written by the last transition (re-queued after a crash)
        "last_health": None,
        "refused": [],  # digests of the last unauthenticated payloads refused (reported once each)
    }


class Journal:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "journal.json"
        self.data = self.load(self.path)

    @staticmethod
    def load(path: Path) -> dict:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return empty_journal()
        data = json.loads(raw)
        if "seqs" not in data:  # written before per-model seqs: its one last_seq judged every model
            data["seq_floor"] = data.get("last_seq", 0)
        return {**empty_journal(), **data}

    def snapshot(self) -> dict:
        return copy.deepcopy(self.data)

    def commit(self, data: dict, point: str) -> None:
        """Make `data` the journal (durably), then pass the crash point named after the transition."""
        atomic_write_json(self.path, data)
        self.data = data
        crash_point(point)

    @property
    def update(self) -> InFlightUpdate | None:
        raw = self.data.get("update")
        return InFlightUpdate.from_json(raw) if raw else None
