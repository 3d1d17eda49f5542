"""The agent daemon (DESIGN.md §5): runs the update machine of agent.machine from the journal.

This module is the run loop, the recovery after a restart, Agent.drive() (which runs the step
agent.machine.TABLE names for the journalled phase) and the journal writes that move an update:
every move is checked against the table before it is written (machine.IllegalTransition
otherwise), and events go to the on-disk outbox in the same breath as the journal write that
caused them. The rest is one topic per module:

    agent/steps.py           the update steps, one per phase (download, verify, precheck, ...)
    agent/directives.py      what a directive payload does (agent.admission decides)
    agent/local_rollback.py  `fleet-agent rollback`: the rollback update and the request files
    agent/publish.py         what the agent publishes: presence, events, telemetry
    agent/status.py          `fleet-agent status`
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import queue
import signal
import threading
from pathlib import Path

from agent import __version__ as AGENT_VERSION
from agent import identity, local_rollback, publish, windows
from agent.admission import Accept, Preempt
from agent.config import Config
from agent.directives import DirectiveHandler
from agent.download import Interrupted
from agent.inflight import InFlightUpdate
from agent.install import Store
from agent.journal import Journal, record_handled_seq
from agent.metrics import listener as metrics_listener
from agent.metrics.book import MetricsBook
from agent.machine import TABLE, Entry, IllegalTransition, Outcome, Phase, check, check_preempt, preemptible
from agent.outbox import Outbox
from agent.protocol import ErrorCode, Event, format_time, utcnow
from agent.signing import VerificationError
from agent.steps import Steps
from agent.trust import Trust

log = logging.getLogger("fleet_agent")


BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str | None:
    """This boot's id (Linux): a hook marker from another boot was cut short by a reboot or power
    loss, not by the hook."""
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


class AgentLocked(Exception):
    """Another agent process owns this state directory."""


def lock_state_dir(state_dir: Path, *, blocking: bool = False):
    """flock the state directory; the returned file object holds the lock until closed."""
    state_dir.mkdir(parents=True, exist_ok=True)
    handle = open(state_dir / "lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.close()
        raise AgentLocked(f"another fleet-agent is running on {state_dir}") from None
    return handle


class Agent:
    """The agent of one state directory: its journal, store, outbox and directive inbox.

    The steps (agent.steps) and directive handling (agent.directives) are handed what they need of
    it, and move an update only through its journal writes (_start, _transition, _finish, _report).
    """

    def __init__(self, cfg: Config, *, link_factory=None):
        self.cfg = cfg
        self.state_dir = cfg.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.state_dir)
        self.journal = Journal(self.state_dir)
        self.outbox = Outbox(self.state_dir / "outbox")
        self.requests_dir = self.state_dir / "requests"
        self.requests_dir.mkdir(exist_ok=True)
        self.inbox: queue.Queue[bytes] = queue.Queue()
        self.stop = threading.Event()
        # Set by the broker thread when a payload supersedes the update in flight (receive()): the
        # step running stops (download, precheck) and the run loop judges the inbox before going on.
        self.preempt = threading.Event()
        # Keyrings and timestamps from the broker (agent.trust), judged by the run loop, which alone
        # writes the journal: (kind, payload) with kind "keyring" or "timestamp".
        self.trust_inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.trust = Trust(cfg=cfg, journal=self.journal)
        self.directives = DirectiveHandler(cfg=cfg, journal=self.journal, requeue=self.inbox.put,
                                           report=self._report, start=self._start, preempt=self._preempt,
                                           trust=self.trust, stop=self.stop)
        # The app's own figures (agent/metrics): telemetry reports them, the trial judges on them.
        self.metrics = MetricsBook(releases=functools.partial(publish.active_models, self.journal))
        self.steps = Steps(cfg=cfg, store=self.store, journal=self.journal, stop=self.stop, preempt=self.preempt,
                           transition=self._transition, finish=self._finish, hook=self._hook,
                           metrics=self.metrics, park=self._park)
        self.link = None
        if link_factory is not None:
            self.link = link_factory(
                cfg.mqtt, device_id=cfg.device_id, on_directive=self.receive,
                presence=functools.partial(publish.presence, journal=self.journal),
                on_ingest_reset=functools.partial(self.outbox.requeue_acked, cfg.mqtt.resend_window_seconds),
                on_trust=(lambda kind, payload: self.trust_inbox.put((kind, payload))) if self.trust.enabled else None,
            )

    # --- running --------------------------------------------------------------------------

    def run(self) -> int:
        lock = lock_state_dir(self.state_dir)
        try:
            signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
            signal.signal(signal.SIGINT, lambda *_: self.stop.set())
            self.adopt_identity()
            self.recover()
            send_event = functools.partial(publish.publish_event, self.link)
            threads = [
                threading.Thread(target=self.outbox.drain, args=(send_event, self.stop), daemon=True),
                threading.Thread(target=publish.telemetry_loop, args=(self.link,), daemon=True,
                                 kwargs={"cfg": self.cfg, "journal": self.journal, "stop": self.stop,
                                         "metrics": self.metrics}),
            ]
            sock = metrics_listener.bind(self.cfg.metrics.statsd_listen) if self.cfg.metrics.statsd_listen else None
            if sock is not None:
                threads.append(threading.Thread(target=metrics_listener.serve, args=(sock, self.metrics, self.stop),
                                                daemon=True, name="statsd"))
            if self.link:
                self.link.start()
            for t in threads:
                t.start()
            log.info("fleet-agent %s running for %s (%s), pid %d", AGENT_VERSION, self.cfg.device_id,
                     self.cfg.hardware, os.getpid())
            while not self.stop.is_set():
                self.judge_trust()
                if self.preempt.is_set():
                    self.preempt.clear()
                    self.judge_waiting()
                if self.journal.update:
                    self.drive()
                    continue
                local_rollback.handle_requests(self.requests_dir, start=self.start_local_rollback)
                if self.wake_parked():
                    continue
                try:
                    payload = self.inbox.get(timeout=1.0)
                except queue.Empty:
                    continue
                self.handle_payload(payload)
            log.info("stopping")
            return 0
        finally:
            self.stop.set()
            self.outbox.wake.set()
            if self.link:
                self.link.stop()
            lock.close()

    def adopt_identity(self) -> None:
        """Make the journal and outbox this device id's (agent.identity.rebind): after a
        re-enrollment, the old identity's seq is forgotten and its unsent events are retired."""
        identity.rebind(self.journal, self.outbox, self.cfg.device_id)

    def recover(self) -> None:
        """After a (re)start: re-queue the last transition's events; count the restart, and judge it.

        A restart is not by itself a verdict on the model: a box that loses power during a trial
        restarts the agent as surely as a bad model could. What counts against the model is the
        agent dying while one of the model's hooks ran (the reload or health command; the journal
        marks each run, with the boot it ran in): more than update.max_trial_restarts such deaths
        for one update, in activating or trial, and it rolls back (ACTIVATE_FAILED, TRIAL_FAILED).
        Any other restart only starts the step again (a trial from its beginning); the loop guard
        in drive() (ROLLBACK_LOOP, update.max_transitions) still bounds them all.
        """
        for item in self.journal.data.get("last_events") or []:
            self.outbox.put(item["event_no"], item["payload"].encode("utf-8"))
        upd = self.journal.update
        if not upd:
            return
        u = upd.evolve(transitions=upd.transitions + 1)  # a crash loop counts too
        if u.phase is Phase.TRIAL:
            u = u.evolve(trial_restarts=u.trial_restarts + 1)  # reported with the commit
        if upd.hook:
            command = upd.hook.get("command", "?")
            if upd.hook.get("boot_id") not in (None, boot_id()):
                log.info("the box rebooted while the %s command ran: not counted against the model", command)
                u = u.evolve(hook=None)
            else:
                u = u.evolve(hook_deaths=u.hook_deaths + 1)
                log.warning("the agent died while the %s command ran (%d time(s) for directive %d)", command,
                            u.hook_deaths, u.seq)
                if u.phase is not Phase.ROLLING_BACK:
                    u = u.evolve(hook=None)  # in rolling_back it stays: the step then skips the reload
                if u.phase in (Phase.ACTIVATING, Phase.TRIAL) and u.hook_deaths > self.cfg.update.max_trial_restarts:
                    check(u.phase, Phase.ROLLING_BACK)
                    code = ErrorCode.ACTIVATE_FAILED if u.phase is Phase.ACTIVATING else ErrorCode.TRIAL_FAILED
                    u = u.evolve(phase=Phase.ROLLING_BACK, error_code=code,
                                 detail=f"the agent died {u.hook_deaths} times while the model's {command} command "
                                        "ran")
        data = self.journal.snapshot()
        data["update"] = u.to_json()
        data["last_events"] = []
        self.journal.commit(data, "trial-restart" if upd.phase is Phase.TRIAL else "resume")

    def drive(self) -> None:
        """Run the step machine.TABLE names for the journalled phase (a method of agent.steps.Steps)
        until the update reaches an outcome (or we are told to stop)."""
        while not self.stop.is_set() and (upd := self.journal.update):
            if self.preempt.is_set() and preemptible(upd.phase):
                return  # a newer directive may supersede this update: the run loop judges it first
            if upd.transitions > self.cfg.update.max_transitions and upd.phase is not Phase.ROLLING_BACK:
                detail = f"more than {self.cfg.update.max_transitions} transitions for directive {upd.seq}"
                if upd.phase in (Phase.ACTIVATING, Phase.TRIAL):
                    # `current` may already be the new model: only the way back is safe.
                    self._transition(Phase.ROLLING_BACK, event=False, error_code=ErrorCode.ROLLBACK_LOOP, detail=detail)
                else:
                    self._finish(Outcome.FAILED, ErrorCode.ROLLBACK_LOOP, detail)
                continue
            step = getattr(self.steps, TABLE[upd.phase].step)
            try:
                step(upd)
            except Interrupted:
                return

    # --- entries: a directive (agent.directives) or a local rollback request -----------------

    def handle_payload(self, payload: bytes) -> None:
        """Judge one directive payload (agent.admission) and act on the decision (agent.directives)."""
        self.directives.handle(payload)

    def receive(self, payload: bytes) -> None:
        """A directive payload from the broker (its network thread): into the inbox, and if it
        supersedes the update in flight, stop that update's step (`preempt`)."""
        self.inbox.put(payload)
        if self.directives.would_preempt(payload):
            log.info("a newer directive supersedes the update in flight; stopping its step")
            self.preempt.set()

    def judge_trust(self) -> None:
        """Take the keyrings and timestamps waiting (agent.trust), then judge freshness; a refused
        one is logged with its code (a forged or old keyring must not stop the agent)."""
        if not self.trust.enabled:
            return
        changed = False
        while True:
            try:
                kind, payload = self.trust_inbox.get_nowait()
            except queue.Empty:
                break
            try:
                envelope = json.loads(payload)
                if kind == "keyring":
                    taken = self.trust.accept_keyring(envelope, utcnow())
                    if taken is not None and self.link is not None:
                        self.link.resubscribe_directives()  # the retained directives, judged with the new keys
                else:
                    taken = self.trust.accept_timestamp(envelope, utcnow())
                changed = changed or taken is not None
            except Exception as exc:  # noqa: BLE001  (input must never crash the agent: it is retained)
                if not isinstance(exc, (VerificationError, ValueError)):
                    log.exception("%s handling failed", kind)
                code = getattr(exc, "code", ErrorCode.MALFORMED)
                log.warning("refused a %s from the broker: %s (%s)", kind, code, exc)
                self.trust.refused(kind, code, str(exc))
                changed = True
        if self.trust.check_staleness(utcnow()) or changed:
            publish.publish_presence(self.link, journal=self.journal)

    def judge_waiting(self) -> None:
        """Judge every payload in the inbox now, an update in flight or not: one that supersedes it
        preempts it; Defer puts the others back to wait for it."""
        waiting = []
        while True:
            try:
                waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for payload in waiting:
            self.handle_payload(payload)

    def wake_parked(self) -> bool:
        """With no update in flight: put back in the slot a parked update whose maintenance window
        is open (True: drive() has work), and report a new next opening for one whose window came
        and went while the agent was down or busy with another update.

        The inbox is judged first: a newer directive for a parked model supersedes it before its
        window could activate it."""
        if not self.journal.data.get("waiting"):
            return False
        self.judge_waiting()
        if self.journal.update:
            return True
        now = utcnow()
        for model, raw in sorted(self.journal.data["waiting"].items(), key=lambda kv: kv[1].get("next_opening") or ""):
            found = windows.parse_windows(raw.get("windows") or [])
            if windows.is_open(found, now):
                self._unpark(model)
                return True
            opening = windows.next_opening(found, now)
            if opening is not None and format_time(opening) != raw.get("next_opening"):
                self._park_again(model, format_time(opening))
        return False

    def start_local_rollback(self, model: str) -> None:
        """Queue a rollback of `model` to its `previous` (re-verified) as a journalled update."""
        self._start(Entry.REQUEST, local_rollback.plan(model, journal=self.journal, store=self.store))

    # --- journal + events -----------------------------------------------------------------

    def _event(self, data: dict, *, state: str, seq: int, model: str, sha: str | None, rollout_id: str | None,
               code: str | None = None, detail: str = "", health: dict | None = None,
               upd: InFlightUpdate | None = None, next_opening: str | None = None) -> dict:
        data["event_no"] = data.get("event_no", 0) + 1
        if upd is not None and upd.delta_fallback and not detail:
            detail = f"delta not used, full artifact downloaded: {upd.delta_fallback}"
        active = (data["models"].get(model) or {}).get("current") if model else None
        event = Event(
            device_id=self.cfg.device_id,
            event_no=data["event_no"],
            seq=seq,
            model=model,
            state=state,
            error_code=code,
            detail=detail[:2000],
            sha256=sha,
            active_sha256=active,
            rollout_id=rollout_id,
            health=health,
            ts=format_time(utcnow()),
            delivery=upd.delivery if upd else None,
            bytes_downloaded=upd.bytes_downloaded if upd else None,
            next_opening=next_opening,
        )
        log.info("event %d seq=%d %s %s %s %s", event.event_no, seq, model, state, code or "", detail[:200])
        return {"event_no": event.event_no, "payload": event.to_payload().decode("utf-8")}

    def _commit(self, data: dict, point: str, events: list[dict]) -> None:
        data["last_events"] = events
        self.journal.commit(data, point)
        for item in events:
            self.outbox.put(item["event_no"], item["payload"].encode("utf-8"))
        publish.publish_presence(self.link, journal=self.journal)

    def _start(self, entry: Entry, upd: InFlightUpdate, *, lift: str | None = None, detail: str = "") -> None:
        """Journal a new in-flight update; a directive's also records its seq and reports `received`
        (lifting `lift` off the denylist: an operator's retry)."""
        data = self.journal.snapshot()
        events = self._begin(data, entry, upd, lift=lift, detail=detail)
        self._commit(data, upd.phase, events)

    def _begin(self, data: dict, entry: Entry, upd: InFlightUpdate, *, lift: str | None, detail: str) -> list[dict]:
        if data.get("update"):
            raise IllegalTransition(f"{entry} → {upd.phase} while an update of {data['update']['model']} is in flight")
        check(entry, upd.phase)
        data["update"] = upd.to_json()
        events = []
        if lift and lift in data["denylist"]:
            data["denylist"].remove(lift)
            log.warning("artifact %s comes off the denylist: directive %d is an operator's retry", lift[:12], upd.seq)
        if entry is Entry.DIRECTIVE:
            record_handled_seq(data, model=upd.model, seq=upd.seq)
            events.append(self._event(data, state=upd.phase.value, seq=upd.seq, model=upd.model, sha=upd.sha,
                                      rollout_id=upd.rollout_id, detail=detail))
        return events

    def _preempt(self, decision: Preempt) -> None:
        """End the update in flight `failed` (SUPERSEDED) and carry out the newer directive (start
        its update, or confirm the model already running), in one journal write: after a SIGKILL
        the journal holds either the old update or the new state, never half of it."""
        data = self.journal.snapshot()
        if decision.parked:
            if data.get("update"):
                raise IllegalTransition(f"directive {decision.seq} supersedes a parked update while "
                                        f"{data['update']['model']} is in flight")
            old = InFlightUpdate.from_json(data["waiting"].pop(decision.model))
        else:
            old = InFlightUpdate.from_json(data["update"])
        if (old.model, old.seq) != (decision.model, decision.superseded):
            raise IllegalTransition(f"directive {decision.seq} supersedes {decision.model} seq {decision.superseded}, "
                                    f"but {old.model} seq {old.seq} is in flight")
        check_preempt(old.phase)
        events = [self._end(data, old, Outcome.FAILED, ErrorCode.SUPERSEDED, decision.message)]
        then = decision.then
        if isinstance(then, Accept):
            events += self._begin(data, Entry.DIRECTIVE, then.update, lift=then.lifted, detail=then.detail)
        else:
            events.append(self._reported(data, Outcome.COMMITTED, seq=then.seq, model=then.model, sha=then.sha,
                                         rollout_id=then.rollout_id, code=None, detail=then.message,
                                         record_seq=True, health=data.get("last_health")))
        log.info("directive %d supersedes directive %d of %s (%s)", decision.seq, old.seq, old.model, old.phase)
        self._commit(data, "superseded", events)
        self._gc()

    def _hook(self, command: str | None) -> None:
        """Journal that one of the model's hooks (`command`: "reload" or "health") is about to run, or
        (None) that it returned: a restart that finds the mark was caused by the model (recover())."""
        data = self.journal.snapshot()
        upd = InFlightUpdate.from_json(data["update"])
        data["update"] = upd.evolve(hook={"command": command, "boot_id": boot_id()} if command else None).to_json()
        self.journal.commit(data, "model-hook" if command else "model-hook-done")

    def _park(self, next_opening: str) -> None:
        """Move the in-flight update (waiting_for_window) out of the slot into `waiting` until a
        window opens; report waiting_for_window with `next_opening` unless it was reported already."""
        data = self.journal.snapshot()
        upd = InFlightUpdate.from_json(data["update"])
        if upd.phase is not Phase.WAITING_FOR_WINDOW:
            raise IllegalTransition(f"only an update in {Phase.WAITING_FOR_WINDOW} may be parked, not one in {upd.phase}")
        data["update"] = None
        events = self._waiting(data, upd, next_opening)
        log.info("%s seq %d waits for its maintenance window: next opening %s", upd.model, upd.seq, next_opening)
        self._commit(data, "parked", events)

    def _park_again(self, model: str, next_opening: str) -> None:
        """A parked update's window was missed (the agent was down, or busy): report the next one."""
        data = self.journal.snapshot()
        upd = InFlightUpdate.from_json(data["waiting"][model])
        events = self._waiting(data, upd, next_opening)
        log.info("%s seq %d missed its maintenance window: next opening %s", model, upd.seq, next_opening)
        self._commit(data, "parked", events)

    def _waiting(self, data: dict, upd: InFlightUpdate, next_opening: str) -> list[dict]:
        events = []
        if next_opening != upd.next_opening:
            events.append(self._event(data, state=Phase.WAITING_FOR_WINDOW.value, seq=upd.seq, model=upd.model,
                                      sha=upd.sha, rollout_id=upd.rollout_id, upd=upd, next_opening=next_opening,
                                      detail=f"downloaded and prechecked; activates when a maintenance window "
                                             f"opens ({'; '.join(upd.windows or [])})"))
        data.setdefault("waiting", {})[upd.model] = upd.evolve(next_opening=next_opening).to_json()
        return events

    def _unpark(self, model: str) -> None:
        """Put a parked update back in the in-flight slot: its window is open. Its step (still
        waiting_for_window) checks the stored copy again and activates."""
        data = self.journal.snapshot()
        if data.get("update"):
            raise IllegalTransition(f"{model} cannot leave {Phase.WAITING_FOR_WINDOW} while "
                                    f"{data['update']['model']} is in flight")
        data["update"] = data["waiting"].pop(model)
        log.info("%s seq %d: a maintenance window is open", model, data["update"]["seq"])
        self._commit(data, "unparked", [])

    def _transition(self, phase: Phase, *, event: bool, mutate=None, **changes) -> None:
        """Move the in-flight update to another phase; `event`: report the phase (same name)."""
        data = self.journal.snapshot()
        upd = InFlightUpdate.from_json(data["update"])
        check(upd.phase, phase)
        upd = upd.evolve(**changes, phase=phase, transitions=upd.transitions + 1)
        data["update"] = upd.to_json()
        if mutate:
            mutate(data)
        events = []
        if event:
            events.append(self._event(data, state=phase.value, seq=upd.seq, model=upd.model, sha=upd.sha,
                                      rollout_id=upd.rollout_id, upd=upd))
        self._commit(data, phase, events)

    def _finish(self, state: Outcome, code: str | None, detail: str = "", *, health: dict | None = None,
                mutate=None) -> None:
        """End the in-flight update with an outcome event."""
        data = self.journal.snapshot()
        upd = InFlightUpdate.from_json(data["update"])
        check(upd.phase, state)
        event = self._end(data, upd, state, code, detail, health=health, mutate=mutate)
        self._commit(data, state, [event])
        self._gc()

    def _end(self, data: dict, upd: InFlightUpdate, state: Outcome, code: str | None, detail: str, *,
             health: dict | None = None, mutate=None) -> dict:
        if mutate:
            mutate(data)
        data["update"] = None
        data["last_outcome"] = {
            "seq": upd.seq, "model": upd.model, "sha256": upd.sha, "state": state.value,
            "error_code": code, "detail": detail[:500], "ts": format_time(utcnow()),
        }
        return self._event(data, state=state.value, seq=upd.seq, model=upd.model, sha=upd.sha,
                           rollout_id=upd.rollout_id, code=code, detail=detail, health=health, upd=upd)

    def _report(self, state: Outcome, *, seq: int, model: str, sha: str | None, rollout_id: str | None,
                code: str | None, detail: str, record_seq: bool, health: dict | None = None,
                refused: str | None = None) -> None:
        """A terminal event for a directive that never became an update (refused or already there)."""
        data = self.journal.snapshot()
        event = self._reported(data, state, seq=seq, model=model, sha=sha, rollout_id=rollout_id, code=code,
                               detail=detail, record_seq=record_seq, health=health, refused=refused)
        self._commit(data, state, [event])

    def _reported(self, data: dict, state: Outcome, *, seq: int, model: str, sha: str | None,
                  rollout_id: str | None, code: str | None, detail: str, record_seq: bool,
                  health: dict | None = None, refused: str | None = None) -> dict:
        check(Entry.DIRECTIVE, state)
        if refused:
            data["refused"] = (data.get("refused") or [])[-31:] + [refused]
        if record_seq:
            record_handled_seq(data, model=model, seq=seq)
            data["last_outcome"] = {
                "seq": seq, "model": model, "sha256": sha, "state": state.value, "error_code": code,
                "detail": detail[:500], "ts": format_time(utcnow()),
            }
        return self._event(data, state=state.value, seq=seq, model=model, sha=sha, rollout_id=rollout_id, code=code,
                           detail=detail, health=health)

    def _gc(self) -> None:
        keep = set()
        for m in self.journal.data["models"].values():
            keep.update(s for s in (m.get("current"), m.get("previous")) if s)
        if upd := self.journal.update:
            keep.add(upd.sha)
        keep.update(parked["sha"] for parked in (self.journal.data.get("waiting") or {}).values())
        try:
            self.store.gc(keep)
        except OSError as exc:
            log.warning("store clean-up failed: %s", exc)
