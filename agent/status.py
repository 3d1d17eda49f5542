"""`fleet-agent status`: what the state directory says, read without taking the agent's lock.

Safe while the daemon runs: the journal is only ever replaced atomically (agent.journal), so this
reads either the old or the new version.
"""

from __future__ import annotations

from agent.config import Config
from agent.journal import Journal


def status(cfg: Config) -> dict:
    """What `fleet-agent status` prints as JSON (agent/README.md, CLI)."""
    journal = Journal.load(cfg.state_dir / "journal.json")
    outbox_dir = cfg.state_dir / "outbox"
    pending = len(list(outbox_dir.glob("*.json"))) if outbox_dir.is_dir() else 0
    upd = journal.get("update")
    return {
        "device_id": cfg.device_id,
        "hardware": cfg.hardware,
        "state_dir": str(cfg.state_dir),
        "state": upd["phase"] if upd else "idle",
        "update": {k: upd.get(k) for k in ("seq", "model", "version", "sha", "phase", "trial_restarts")} if upd else None,
        "models": {
            name: {k: m.get(k) for k in ("current", "previous", "file_name", "version", "committed")}
            for name, m in journal["models"].items()
        },
        # Updates parked until a maintenance window opens (agent.machine): model -> seq, version, next opening.
        "waiting": {
            name: {k: parked.get(k) for k in ("seq", "version", "sha", "next_opening", "windows")}
            for name, parked in (journal.get("waiting") or {}).items()
        },
        "last_seq": journal["last_seq"],
        "seqs": journal.get("seqs") or {},
        "last_outcome": journal.get("last_outcome"),
        "last_health": journal.get("last_health"),
        "denylist": journal["denylist"],
        "pending_outbox": pending,
    }
