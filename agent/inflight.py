"""The in-flight update: a typed view of the journal's `update` object.

The JSON layout is the one the agent has always written, key for key, because journals outlive
agent versions: a box upgraded mid-update resumes from a journal its previous agent wrote, and
a downgraded one reads ours. So `from_json(j).to_json() == j` holds for every journal this agent
writes, and for older ones:

- an optional key is written when it was given (at creation, by `evolve`, or read from disk),
  even at its default: a journal that said `"previous_model": null` still says so;
- an optional key never given and at its default is left out, as before;
- keys this version does not know are kept verbatim in `extra` and written back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from agent.machine import Phase


@dataclass(frozen=True, kw_only=True)
class InFlightUpdate:
    """One directive's update (or a local rollback) between admission and its outcome."""

    phase: Phase
    seq: int  # the directive's seq; 0 for a local rollback
    model: str
    sha: str  # the artifact being installed (for a local rollback: the one being rolled back)

    file_name: str | None = None
    format: str | None = None  # the artifact's format, which picks the precheck runtime (None: onnx)
    version: str | None = None
    rollout_id: str | None = None
    transitions: int = 0  # journal writes for this update, restarts included (the loop guard's count)
    started: str | None = None  # RFC 3339 UTC, when the update was admitted

    # From the signed release and directive; a local rollback has none of them.
    counter: int | None = None
    rollback_floor: int | None = None
    length: int | None = None
    url: str | None = None
    # The release's health contract (golden inputs and outputs for the precheck). A failed trial
    # health check overwrites it with that check's figures, which the rolled_back event carries.
    health: dict | None = None

    # The directive's delta from the model running here ({base_sha256, url, length, sha256,
    # method}), kept only when its base is what `current` points at (agent.admission).
    delta: dict | None = None
    delivery: str | None = None  # "delta" or "full" once downloaded ("full" also after a failed delta)
    bytes_downloaded: int | None = None  # fetched for this update, a failed delta's bytes included
    delta_fallback: str = ""  # why a delta was not used, for the event's detail

    # The directive's maintenance windows (agent.windows texts): activate only while one is open.
    windows: list | None = None
    next_opening: str | None = None  # waiting_for_window: the opening last reported (RFC 3339 UTC)
    release_expires: str | None = None  # the signed release's expiry (RFC 3339 UTC), checked again at activation

    refetched: bool = False  # verifying sent a bad resumed download back once for a clean one
    previous_model: dict | None = None  # the journal's models[model] entry before activation
    precheck_latency_ms: float | None = None
    shadow: dict | None = None  # the shadow evaluation's figures (agent.shadow), reported with the commit
    trial_restarts: int = 0  # agent restarts during the trial, whatever the cause (reported, not judged)
    # A model hook (the reload or health command) running now: {"command": "reload"|"health",
    # "boot_id": ...}, journalled before it starts and cleared once it returns. Found set after a
    # restart in the same boot, the agent died while the hook ran: a restart caused by the model.
    hook: dict | None = None
    hook_deaths: int = 0  # restarts found with `hook` set in the same boot (agent.daemon.Agent.recover)
    error_code: str | None = None  # why rolling_back (or ROLLBACK_LOOP) was entered
    detail: str = ""
    local: bool = False  # started by `fleet-agent rollback`, not by a directive

    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)  # keys of a newer agent
    written: frozenset[str] = field(default=frozenset(), compare=False, repr=False)  # see the module doc

    @classmethod
    def new(cls, **values: Any) -> InFlightUpdate:
        """A record whose journal object has exactly the keys given (as a dict literal would)."""
        return cls(**values, written=frozenset(values) & _OPTIONAL)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InFlightUpdate:
        known = {k: v for k, v in data.items() if k in _FIELDS}
        extra = {k: v for k, v in data.items() if k not in _FIELDS}
        known["phase"] = Phase(data["phase"])
        return cls(**known, extra=extra, written=frozenset(known) & _OPTIONAL)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        for f in _DATA_FIELDS:
            value = getattr(self, f.name)
            if f.name in _REQUIRED or f.name in self.written or value != f.default:
                out[f.name] = value
        out["phase"] = self.phase.value
        return out

    def evolve(self, **changes: Any) -> InFlightUpdate:
        """A copy with `changes` applied; each changed key is written from now on."""
        return replace(self, **changes, written=self.written | (changes.keys() & _OPTIONAL))

    @property
    def previous_sha(self) -> str | None:
        return self.previous_model["current"] if self.previous_model else None


_DATA_FIELDS = tuple(f for f in fields(InFlightUpdate) if f.name not in ("extra", "written"))
_FIELDS = frozenset(f.name for f in _DATA_FIELDS)
_REQUIRED = frozenset({"phase", "seq", "model", "sha"})
_OPTIONAL = _FIELDS - _REQUIRED
