"""What the agent does with a directive payload from the broker.

agent.admission.admit() decides (pure, shared with the server's fleet simulator); this module acts
on the decision through the agent's journal writes: Accept starts an update (TABLE's `directive`
entry, into received), AlreadyActive reports `committed` under the new seq, Refuse reports
`rejected` (an unauthenticated payload only the first time), Defer puts the payload back in the
inbox until the update in flight ends, Ignore does nothing, Preempt ends the update in flight
`failed` (SUPERSEDED) and carries out its Accept or AlreadyActive in the same journal write, and
NeedRelease (a lean directive whose release envelope is not cached) fetches it
(agent.releases) and judges the directive again; an envelope that cannot be had, or does not
match the directive's reference, refuses it under its seq.
Agent.handle_payload calls `DirectiveHandler.handle` for each payload the run loop takes from the
inbox; `would_preempt` is the early look the broker thread takes at a payload arriving during an
update, so that a download or precheck it supersedes stops at once instead of running to its end.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from hashlib import sha256

from agent.admission import (
    Accept,
    AlreadyActive,
    Defer,
    DeviceView,
    Ignore,
    NeedRelease,
    Preempt,
    Refuse,
    admit,
    could_not_process,
)
from agent.config import Config
from agent.download import Interrupted
from agent.journal import Journal
from agent.machine import Entry, IllegalTransition, Outcome, preemptible
from agent.protocol import ErrorCode, utcnow
from agent.releases import ReleaseCache, ReleaseUnavailable, fetch_release
from agent.runtimes import installed_formats
from agent.signing import Keyring
from agent.trust import Trust

log = logging.getLogger("fleet_agent")


class DirectiveHandler:
    """Directive handling for one agent.

    report(outcome, *, seq, model, sha, rollout_id, code, detail, record_seq, health=None,
    refused=None), start(entry, update, *, lift=None, detail="") and preempt(decision) are
    Agent._report, Agent._start and Agent._preempt; requeue(payload) puts a payload back in the
    agent's inbox.
    """

    def __init__(self, *, cfg: Config, journal: Journal, requeue: Callable[[bytes], None],
                 report: Callable[..., None], start: Callable[..., None], preempt: Callable[[Preempt], None],
                 trust: Trust | None = None, stop: threading.Event | None = None):
        self.cfg = cfg
        self.journal = journal
        self.requeue = requeue
        self.report = report
        self.start = start
        self.preempt = preempt
        # The keys in force: the pinned ones, or those of the newest root-signed keyring (agent.trust).
        self.trust = trust or Trust(cfg=cfg, journal=journal)
        # Release envelopes lean directives referenced (agent.releases), fetched on NeedRelease.
        self.releases = ReleaseCache(cfg.state_dir)
        self.stop = stop

    @property
    def release_keys(self) -> Keyring:
        return self.trust.release_keys

    @property
    def rollout_keys(self) -> Keyring:
        return self.trust.rollout_keys

    def handle(self, payload: bytes) -> None:
        """Judge one directive payload (agent.admission) and act on the decision."""
        digest = sha256(payload).hexdigest()
        try:
            decision = self._admit(payload)
            if isinstance(decision, NeedRelease):
                try:
                    decision = self._with_release(decision, payload)
                except Interrupted:
                    self.requeue(payload)  # the agent is stopping: judged again after the restart
                    return
            if not isinstance(decision, Refuse):
                self._act(decision, payload)
                return
        except IllegalTransition:
            raise  # a bug in the agent, not in the input: refusing the payload would hide it
        except Exception as exc:
            # Input must never crash the agent: a retained payload would crash it again on
            # every restart. Refuse it and keep the traceback in the log.
            log.exception("directive handling failed")
            decision = could_not_process(exc)
        if not decision.record_seq and digest in self.journal.data.get("refused", []):
            log.debug("ignoring a payload refused before (%s)", digest[:12])
            return  # the same retained payload again after a reconnect or restart: reported once
        self.report(Outcome.REJECTED, seq=decision.seq, model=decision.model, sha=decision.sha,
                    rollout_id=decision.rollout_id, code=decision.code, detail=decision.message,
                    record_seq=decision.record_seq, refused=None if decision.record_seq else digest)

    def _admit(self, payload: bytes):
        return admit(payload=payload, device=self.device_view(), release_keys=self.release_keys,
                     rollout_keys=self.rollout_keys, now=utcnow())

    def _with_release(self, need: NeedRelease, payload: bytes):
        """Fetch the envelope a lean directive references and judge the directive again; a
        release that cannot be had refuses the directive (authentic and fresh: under its seq)."""
        try:
            fetch_release(need.ref, cfg=self.cfg, cache=self.releases, stop=self.stop)
        except ReleaseUnavailable as exc:
            return Refuse(code=exc.code, message=str(exc), record_seq=True, seq=need.seq, model=need.model,
                          sha=need.sha, rollout_id=need.rollout_id)
        decision = self._admit(payload)
        if isinstance(decision, Refuse):  # e.g. signed by a key not held here: keep nothing of it
            self.releases.discard(need.ref.sha256)
        if isinstance(decision, NeedRelease):  # stored, yet not readable back: the disk failed us
            return Refuse(code=ErrorCode.DOWNLOAD_FAILED, message="the fetched release manifest could not be read back",
                          record_seq=True, seq=need.seq, model=need.model, sha=need.sha, rollout_id=need.rollout_id)
        return decision

    def would_preempt(self, payload: bytes) -> bool:
        """Whether `payload` supersedes the update in flight, judged now (any thread: admission is
        pure and the journal's data is replaced whole, never changed in place). Only a hint to stop
        the step early: the run loop judges the payload again before anything is journalled."""
        upd = self.journal.data.get("update")
        if not upd or not preemptible(upd.get("phase")):
            return False
        try:
            decision = admit(payload=payload, device=self.device_view(), release_keys=self.release_keys,
                             rollout_keys=self.rollout_keys, now=utcnow())
        except Exception:  # noqa: BLE001  (the run loop refuses it, could_not_process, when it judges it)
            return False
        # A lean directive whose release is not cached yet may supersede it once fetched.
        return isinstance(decision, Preempt) or (isinstance(decision, NeedRelease) and decision.preempting)

    def device_view(self) -> DeviceView:
        """What admission may know of this device: its identity and the journal's bookkeeping."""
        data = self.journal.data
        upd = data.get("update") or {}
        return DeviceView(
            device_id=self.cfg.device_id,
            hardware=self.cfg.hardware,
            seqs=data.get("seqs") or {},
            seq_floor=data.get("seq_floor", 0),
            floors=data["floors"],
            denylist=data["denylist"],
            active={name: (m.get("current"), bool(m.get("committed"))) for name, m in data["models"].items()},
            busy=bool(upd),
            busy_model=upd.get("model"),
            busy_seq=upd.get("seq", 0),
            busy_phase=upd.get("phase"),
            precheck_formats=installed_formats(),
            waiting={name: parked["seq"] for name, parked in (data.get("waiting") or {}).items()},
            releases=self.releases,
        )

    def _act(self, decision: Ignore | Defer | AlreadyActive | Accept | Preempt, payload: bytes) -> None:
        if isinstance(decision, Ignore):
            return  # already handled (or in flight)
        if isinstance(decision, Defer):
            # One update at a time; the retained directive is re-delivered after a reconnect anyway.
            self.requeue(payload)
            return
        if isinstance(decision, AlreadyActive):
            # Desired state already reached: converge by confirming it under the new seq.
            self.report(Outcome.COMMITTED, seq=decision.seq, model=decision.model, sha=decision.sha,
                        rollout_id=decision.rollout_id, code=None, detail=decision.message,
                        record_seq=True, health=self.journal.data.get("last_health"))
            return
        if isinstance(decision, Preempt):
            self.preempt(decision)
            return
        self.start(Entry.DIRECTIVE, decision.update, lift=decision.lifted, detail=decision.detail)
