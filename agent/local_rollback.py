"""Local rollback: `fleet-agent rollback MODEL` switches a model back to its `previous` version.

It is an update like any other, entering agent.machine.TABLE at its `request` entry, straight
into rolling_back: `plan()` builds the in-flight update (seq 0, LOCAL_ROLLBACK) and
Agent.start_local_rollback journals it; the rolling_back step (agent.steps) re-verifies
`previous`, switches to it and deny-lists the rolled-back sha.

With the daemon stopped, the CLI runs that itself. With it running, the daemon owns the state
directory, so the CLI (agent/cli.py) writes a request file instead and waits for the answer:

    requests/rollback-<ms>.json   {"model": MODEL}                      written by the CLI
    requests/rollback-<ms>.done   {"ok": true} or {"ok": false, "error": why}   by the daemon

`handle_requests()` answers them from the daemon's run loop while no update is in flight.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from agent.inflight import InFlightUpdate
from agent.install import Store
from agent.journal import Journal, atomic_write_json
from agent.machine import Phase
from agent.protocol import ErrorCode, format_time, utcnow


def plan(model: str, *, journal: Journal, store: Store) -> InFlightUpdate:
    """The update that rolls `model` back to its `previous`; ValueError (said to the operator) if none can."""
    if upd := journal.update:
        raise ValueError(f"an update of {upd.model} is in progress; try again after it ends")
    current = journal.data["models"].get(model)
    if not current:
        raise ValueError(f"model {model!r} is not installed here")
    prev_sha = current.get("previous")
    if not prev_sha:
        raise ValueError(f"model {model!r} has no previous version to roll back to")
    files = [p.name for p in (store.store / prev_sha).iterdir()] if (store.store / prev_sha).is_dir() else []
    if len(files) != 1:
        raise ValueError(f"previous version {prev_sha} of {model!r} is missing from the store")
    return InFlightUpdate.new(
        phase=Phase.ROLLING_BACK, seq=0, model=model, sha=current["current"],
        file_name=current.get("file_name"), version=current.get("version"),
        rollout_id=None, transitions=1, local=True,
        previous_model={"current": prev_sha, "previous": None, "file_name": files[0], "committed": True},
        error_code=ErrorCode.LOCAL_ROLLBACK, detail="rolled back locally by an operator",
        started=format_time(utcnow()),
    )


def handle_requests(requests_dir: Path, *, start: Callable[[str], None]) -> None:
    """Answer every pending request file, oldest first; `start(model)` raises ValueError to refuse."""
    for request in sorted(requests_dir.glob("rollback-*.json")):
        try:
            model = json.loads(request.read_text())["model"]
            start(model)
            answer = {"ok": True}
        except (ValueError, KeyError, OSError) as exc:
            answer = {"ok": False, "error": str(exc)}
        atomic_write_json(request.with_suffix(".done"), answer)
        request.unlink(missing_ok=True)
