"""The agent daemon (DESIGN.md §5): runs the update machine of agent.machine from the journal.

The machine's phases, its one transition table and its diagram are in agent/machine.py; this
module holds the steps the table names and the journal writes that move between them. Every move
is checked against the table before it is written (machine.IllegalTransition otherwise), and
events go to the on-disk outbox in the same breath as the journal write that caused them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from hashlib import sha256
from pathlib import Path

from agent import __version__ as AGENT_VERSION
from agent.admission import Accept, AlreadyActive, Defer, DeviceView, Ignore, Refuse, admit, could_not_process
from agent.config import Config
from agent.download import DownloadError, Interrupted, fetch
from agent.health import run_health, run_shell
from agent.install import Store, StoreError, sha256_file
from agent.inflight import InFlightUpdate
from agent.journal import Journal, atomic_write_json, child_env, crash_point
from agent.machine import TABLE, Entry, IllegalTransition, Outcome, Phase, check
from agent.outbox import Outbox
from agent.precheck import run_precheck
from agent.protocol import ErrorCode, Event, format_time, presence_payload, utcnow
from agent.signing import Keyring

log = logging.getLogger("fleet_agent")


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
    def __init__(self, cfg: Config, *, link_factory=None):
        self.cfg = cfg
        self.state_dir = cfg.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.state_dir)
        self.journal = Journal(self.state_dir)
        self.outbox = Outbox(self.state_dir / "outbox")
        self.requests_dir = self.state_dir / "requests"
        self.requests_dir.mkdir(exist_ok=True)
        self.release_keys = Keyring.from_pems(*cfg.keys.release)
        self.rollout_keys = Keyring.from_pems(*cfg.keys.rollout)
        self.inbox: queue.Queue[bytes] = queue.Queue()
        self.stop = threading.Event()
        self._digests: dict[str, str] = {}  # sha -> digest computed while downloading (this process)
        self.link = None
        if link_factory is not None:
            self.link = link_factory(
                cfg.mqtt, device_id=cfg.device_id, on_directive=self.inbox.put, presence=self._presence
            )

    # --- running --------------------------------------------------------------------------

    def run(self) -> int:
        lock = lock_state_dir(self.state_dir)
        try:
            signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
            signal.signal(signal.SIGINT, lambda *_: self.stop.set())
            self.recover()
            threads = [
                threading.Thread(target=self.outbox.drain, args=(self._publish_event, self.stop), daemon=True),
                threading.Thread(target=self._telemetry_loop, daemon=True),
            ]
            if self.link:
                self.link.start()
            for t in threads:
                t.start()
            log.info("fleet-agent %s running for %s (%s), pid %d", AGENT_VERSION, self.cfg.device_id,
                     self.cfg.hardware, os.getpid())
            while not self.stop.is_set():
                if self.journal.update:
                    self.drive()
                    self._publish_presence()
                    continue
                self._handle_requests()
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

    def recover(self) -> None:
        """After a (re)start: re-queue the last transition's events, count trial restarts."""
        for item in self.journal.data.get("last_events") or []:
            self.outbox.put(item["event_no"], item["payload"].encode("utf-8"))
        upd = self.journal.update
        if not upd:
            return
        u = upd.evolve(transitions=upd.transitions + 1)  # a crash loop counts too
        if u.phase is Phase.TRIAL:
            u = u.evolve(trial_restarts=u.trial_restarts + 1)
            if u.trial_restarts > self.cfg.update.max_trial_restarts:
                check(u.phase, Phase.ROLLING_BACK)
                u = u.evolve(phase=Phase.ROLLING_BACK, error_code=ErrorCode.TRIAL_FAILED,
                             detail=f"agent restarted {u.trial_restarts} times during the trial")
        data = self.journal.snapshot()
        data["update"] = u.to_json()
        data["last_events"] = []
        self.journal.commit(data, "trial-restart" if upd.phase is Phase.TRIAL else "resume")

    def drive(self) -> None:
        """Run the step machine.TABLE names for the journalled phase until the update reaches an
        outcome (or we are told to stop)."""
        while not self.stop.is_set() and (upd := self.journal.update):
            if upd.transitions > self.cfg.update.max_transitions and upd.phase is not Phase.ROLLING_BACK:
                detail = f"more than {self.cfg.update.max_transitions} transitions for directive {upd.seq}"
                if upd.phase in (Phase.ACTIVATING, Phase.TRIAL):
                    # `current` may already be the new model: only the way back is safe.
                    self._transition(Phase.ROLLING_BACK, event=False, error_code=ErrorCode.ROLLBACK_LOOP, detail=detail)
                else:
                    self._finish(Outcome.FAILED, ErrorCode.ROLLBACK_LOOP, detail)
                continue
            step = getattr(self, TABLE[upd.phase].step)
            try:
                step(upd)
            except Interrupted:
                return

    # --- journal + events -----------------------------------------------------------------

    def _event(self, data: dict, *, state: str, seq: int, model: str, sha: str | None, rollout_id: str | None,
               code: str | None = None, detail: str = "", health: dict | None = None) -> dict:
        data["event_no"] = data.get("event_no", 0) + 1
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
        )
        log.info("event %d seq=%d %s %s %s %s", event.event_no, seq, model, state, code or "", detail[:200])
        return {"event_no": event.event_no, "payload": event.to_payload().decode("utf-8")}

    def _commit(self, data: dict, point: str, events: list[dict]) -> None:
        data["last_events"] = events
        self.journal.commit(data, point)
        for item in events:
            self.outbox.put(item["event_no"], item["payload"].encode("utf-8"))

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
                                      rollout_id=upd.rollout_id))
        self._commit(data, phase, events)

    def _finish(self, state: Outcome, code: str | None, detail: str = "", *, health: dict | None = None,
                mutate=None) -> None:
        """End the in-flight update with an outcome event."""
        data = self.journal.snapshot()
        upd = InFlightUpdate.from_json(data["update"])
        check(upd.phase, state)
        if mutate:
            mutate(data)
        data["update"] = None
        data["last_outcome"] = {
            "seq": upd.seq, "model": upd.model, "sha256": upd.sha, "state": state.value,
            "error_code": code, "detail": detail[:500], "ts": format_time(utcnow()),
        }
        event = self._event(data, state=state.value, seq=upd.seq, model=upd.model, sha=upd.sha,
                            rollout_id=upd.rollout_id, code=code, detail=detail, health=health)
        self._commit(data, state, [event])
        self._gc()

    def _report(self, state: Outcome, *, seq: int, model: str, sha: str | None, rollout_id: str | None,
                code: str | None, detail: str, record_seq: bool, health: dict | None = None,
                refused: str | None = None) -> None:
        """A terminal event for a directive that never became an update (refused or already there)."""
        check(Entry.DIRECTIVE, state)
        data = self.journal.snapshot()
        if refused:
            data["refused"] = (data.get("refused") or [])[-31:] + [refused]
        if record_seq:
            data["last_seq"] = max(data["last_seq"], seq)
            data["last_outcome"] = {
                "seq": seq, "model": model, "sha256": sha, "state": state.value, "error_code": code,
                "detail": detail[:500], "ts": format_time(utcnow()),
            }
        event = self._event(data, state=state.value, seq=seq, model=model, sha=sha, rollout_id=rollout_id, code=code,
                            detail=detail, health=health)
        self._commit(data, state, [event])

    def _gc(self) -> None:
        keep = set()
        for m in self.journal.data["models"].values():
            keep.update(s for s in (m.get("current"), m.get("previous")) if s)
        if upd := self.journal.update:
            keep.add(upd.sha)
        try:
            self.store.gc(keep)
        except OSError as exc:
            log.warning("store clean-up failed: %s", exc)

    # --- directives -----------------------------------------------------------------------

    def handle_payload(self, payload: bytes) -> None:
        """Judge one directive payload (agent.admission) and act on the decision."""
        digest = sha256(payload).hexdigest()
        try:
            decision = admit(payload=payload, device=self._device_view(), release_keys=self.release_keys,
                             rollout_keys=self.rollout_keys, now=utcnow())
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
        self._report(Outcome.REJECTED, seq=decision.seq, model=decision.model, sha=decision.sha,
                     rollout_id=decision.rollout_id, code=decision.code, detail=decision.message,
                     record_seq=decision.record_seq, refused=None if decision.record_seq else digest)

    def _device_view(self) -> DeviceView:
        data = self.journal.data
        return DeviceView(
            device_id=self.cfg.device_id,
            hardware=self.cfg.hardware,
            last_seq=data["last_seq"],
            floors=data["floors"],
            denylist=data["denylist"],
            active={name: (m.get("current"), bool(m.get("committed"))) for name, m in data["models"].items()},
            busy=bool(data.get("update")),
        )

    def _act(self, decision: Ignore | Defer | AlreadyActive | Accept, payload: bytes) -> None:
        if isinstance(decision, Ignore):
            return  # already handled (or in flight)
        if isinstance(decision, Defer):
            # One update at a time; the retained directive is re-delivered after a reconnect anyway.
            self.inbox.put(payload)
            return
        if isinstance(decision, AlreadyActive):
            # Desired state already reached: converge by confirming it under the new seq.
            self._report(Outcome.COMMITTED, seq=decision.seq, model=decision.model, sha=decision.sha,
                         rollout_id=decision.rollout_id, code=None, detail=decision.message,
                         record_seq=True, health=self.journal.data.get("last_health"))
            return
        self._start(Entry.DIRECTIVE, decision.update)

    def _start(self, entry: Entry, upd: InFlightUpdate) -> None:
        """Journal a new in-flight update; a directive's also records its seq and reports `received`."""
        data = self.journal.snapshot()
        if data.get("update"):
            raise IllegalTransition(f"{entry} → {upd.phase} while an update of {data['update']['model']} is in flight")
        check(entry, upd.phase)
        data["update"] = upd.to_json()
        events = []
        if entry is Entry.DIRECTIVE:
            data["last_seq"] = upd.seq
            events.append(self._event(data, state=upd.phase.value, seq=upd.seq, model=upd.model, sha=upd.sha,
                                      rollout_id=upd.rollout_id))
        self._commit(data, upd.phase, events)

    # --- steps ------------------------------------------------------------------------------

    def _step_received(self, upd: InFlightUpdate) -> None:
        part = self.store.part_path(upd.sha)
        have = part.stat().st_size if part.exists() else 0
        need = 0 if self.store.has(upd.sha, upd.file_name) else max(0, upd.length - have)
        free = shutil.disk_usage(self.state_dir).free
        reserve = int(self.cfg.update.disk_reserve_mb * 2**20)
        if free - need < reserve:
            self._finish(Outcome.FAILED, ErrorCode.DISK_FULL,
                         f"needs {need / 2**20:.1f} MiB plus a reserve of {reserve / 2**20:.0f} MiB, "
                         f"{free / 2**20:.1f} MiB free")
            return
        self._transition(Phase.DOWNLOADING, event=True)

    def _step_downloading(self, upd: InFlightUpdate) -> None:
        sha = upd.sha
        if not self.store.has(sha, upd.file_name):
            u = self.cfg.update
            try:
                result = fetch(
                    upd.url, self.store.part_path(sha), length=upd.length, token=self.cfg.server.token,
                    timeout=u.download_timeout_seconds, retries=u.download_retries, backoff=u.download_backoff_seconds,
                    backoff_max=u.download_backoff_max_seconds, byte_budget_factor=u.download_byte_budget_factor,
                    stop=self.stop, on_chunk=lambda _pos: crash_point("download-chunk"),
                    ssl_context=self._ssl_context(),
                )
            except DownloadError as exc:
                if exc.code == ErrorCode.TOO_LARGE:
                    self.store.part_path(sha).unlink(missing_ok=True)
                self._finish(Outcome.FAILED, exc.code, str(exc))
                return
            except OSError as exc:  # the local side: staging file or disk
                self.store.part_path(sha).unlink(missing_ok=True)
                code = ErrorCode.DISK_FULL if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ErrorCode.DOWNLOAD_FAILED
                self._finish(Outcome.FAILED, code, f"writing the download failed: {exc}")
                return
            self._digests[sha] = result.sha256
            log.info("downloaded %s: %d bytes received (resumed from %d)", sha[:12], result.bytes_received,
                     result.resumed_from)
        self._transition(Phase.VERIFYING, event=True)

    def _ssl_context(self):
        if not self.cfg.server.ca_file:
            return None
        import ssl

        return ssl.create_default_context(cafile=self.cfg.server.ca_file)

    def _step_verifying(self, upd: InFlightUpdate) -> None:
        sha, name, length = upd.sha, upd.file_name, upd.length
        part = self.store.part_path(sha)
        if self.store.has(sha, name):
            stored = self.store.stored_file(sha, name)
            if stored.stat().st_size != length or sha256_file(stored) != sha:
                self.store.remove(sha)
                self._finish(Outcome.FAILED, ErrorCode.HASH_MISMATCH, f"stored copy of {sha} is corrupt")
                return
        elif part.exists():
            size = part.stat().st_size
            digest = self._digests.pop(sha, None) or sha256_file(part)
            if size != length or digest != sha:
                part.unlink(missing_ok=True)
                if not upd.refetched:
                    # A part file resumed after a power cut can hold bytes that never reached the
                    # disk: one clean download from zero before calling the artifact bad.
                    log.warning("sha256 mismatch for %s; downloading once more from zero", sha[:12])
                    self._transition(Phase.DOWNLOADING, event=False, refetched=True)
                    return
                self._finish(Outcome.FAILED, ErrorCode.HASH_MISMATCH,
                             f"downloaded {size} bytes with sha256 {digest}, signed {length} bytes with sha256 {sha}")
                return
            self.store.stage(sha, name)
            crash_point("staged")
        else:
            try:
                self.store.stage(sha, name)  # a crash between the move and the rename
            except StoreError:
                self._transition(Phase.DOWNLOADING, event=False)
                return
            if sha256_file(self.store.stored_file(sha, name)) != sha:
                self.store.remove(sha)
                self._finish(Outcome.FAILED, ErrorCode.HASH_MISMATCH, "staged copy does not match its sha256")
                return
        self._transition(Phase.PRECHECKING, event=True)

    def _step_prechecking(self, upd: InFlightUpdate) -> None:
        path = self.store.stored_file(upd.sha, upd.file_name)
        u = self.cfg.update
        result = run_precheck(path, upd.health, timeout=u.precheck_timeout_seconds, memory_mb=u.precheck_memory_mb)
        if not result.ok:
            self._finish(Outcome.FAILED, ErrorCode.PRECHECK_FAILED, result.detail)
            return
        old = self.journal.data["models"].get(upd.model)
        previous_model = old if old and old.get("current") and old["current"] != upd.sha else None
        self._transition(Phase.ACTIVATING, event=True, previous_model=previous_model,
                         precheck_latency_ms=result.latency_ms)

    def _run_reload(self) -> tuple[bool, str]:
        command = self.cfg.update.reload_command
        if not command:
            return True, ""
        try:
            proc = run_shell(command, env=child_env(), timeout=self.cfg.update.command_timeout_seconds)
        except subprocess.TimeoutExpired:
            return False, f"reload command timed out after {self.cfg.update.command_timeout_seconds:g}s"
        if proc.returncode != 0:
            return False, f"reload command exited {proc.returncode}: {proc.stderr.decode('utf-8', 'replace')[-300:]}"
        return True, ""

    def _step_activating(self, upd: InFlightUpdate) -> None:
        model, sha = upd.model, upd.sha
        if upd.previous_model:
            self.store.point(model, "previous", upd.previous_sha)
        self.store.point(model, "current", sha)
        crash_point("swapped")
        record = {
            "current": sha, "previous": upd.previous_sha, "file_name": upd.file_name,
            "committed": False, "version": upd.version, "counter": upd.counter,
        }

        def mutate(data):
            data["models"][model] = record

        ok, detail = self._run_reload()
        if not ok:
            self._transition(Phase.ROLLING_BACK, event=False, mutate=mutate, error_code=ErrorCode.ACTIVATE_FAILED,
                             detail=detail)
            return
        crash_point("reloaded")
        self._transition(Phase.TRIAL, event=True, mutate=mutate, trial_restarts=0)

    def _step_trial(self, upd: InFlightUpdate) -> None:
        u = self.cfg.update
        deadline = time.monotonic() + u.trial_seconds
        figures: dict = {}
        checks = 0
        app_path = str(self.store.app_path(upd.model, upd.file_name))
        while True:
            if u.health_command:
                result = run_health(
                    u.health_command, model=upd.model, model_path=app_path, expected_sha256=upd.sha,
                    timeout=u.command_timeout_seconds, max_error_rate=u.max_error_rate,
                    max_latency_ms_p95=u.max_latency_ms_p95,
                )
                checks += 1
                if not result.ok:
                    self._transition(Phase.ROLLING_BACK, event=False, error_code=ErrorCode.TRIAL_FAILED,
                                     detail=result.detail, health=result.figures)
                    return
                figures = result.figures
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if self.stop.wait(min(u.health_interval_seconds, remaining)):
                raise Interrupted()
        health = {
            **{k: v for k, v in figures.items() if k in ("model_sha256", "error_rate", "latency_ms_p95")},
            "checks": checks,
            "trial_seconds": u.trial_seconds,
            "trial_restarts": upd.trial_restarts,
            "precheck_latency_ms": upd.precheck_latency_ms,
        }
        model = upd.model

        def mutate(data):
            data["models"][model]["committed"] = True
            data["floors"][model] = max(data["floors"].get(model, 0), upd.rollback_floor)
            data["last_health"] = health

        self._finish(Outcome.COMMITTED, None, "trial passed", health=health, mutate=mutate)

    def _step_rolling_back(self, upd: InFlightUpdate) -> None:
        model, sha = upd.model, upd.sha
        prev = upd.previous_model
        code = upd.error_code or ErrorCode.TRIAL_FAILED
        detail = upd.detail
        if prev:
            prev_sha = prev["current"]
            prev_file = self.store.stored_file(prev_sha, prev["file_name"])
            try:
                intact = sha256_file(prev_file) == prev_sha
            except OSError:
                intact = False
            if not intact:
                # Switching to bytes we cannot vouch for would be worse than keeping the new model.
                self._finish(Outcome.FAILED, ErrorCode.ROLLBACK_FAILED,
                             f"{detail}; previous model {prev_sha} failed re-verification, kept {sha}")
                return
            self.store.point(model, "current", prev_sha)
            self.store.point(model, "previous", None)
        else:
            self.store.point(model, "current", None)
            self.store.point(model, "previous", None)
        crash_point("swapped-back")
        if upd.transitions > self.cfg.update.max_transitions + 3:
            # The reload hook itself keeps killing us: the switch back is done, so stop calling it.
            detail = f"{detail}; reload command skipped after repeated restarts"
        else:
            ok, reload_detail = self._run_reload()
            if not ok:
                detail = f"{detail}; {reload_detail}"

        def mutate(data):
            if prev:
                data["models"][model] = {**prev, "committed": True}
            else:
                data["models"].pop(model, None)
            if sha not in data["denylist"]:
                data["denylist"].append(sha)

        self._finish(Outcome.ROLLED_BACK, code, detail, health=upd.health or None, mutate=mutate)

    # --- local rollback -----------------------------------------------------------------------

    def start_local_rollback(self, model: str) -> None:
        """Queue a rollback of `model` to its `previous` (re-verified) as a journalled update."""
        if upd := self.journal.update:
            raise ValueError(f"an update of {upd.model} is in progress; try again after it ends")
        current = self.journal.data["models"].get(model)
        if not current:
            raise ValueError(f"model {model!r} is not installed here")
        prev_sha = current.get("previous")
        if not prev_sha:
            raise ValueError(f"model {model!r} has no previous version to roll back to")
        files = [p.name for p in (self.store.store / prev_sha).iterdir()] if (self.store.store / prev_sha).is_dir() else []
        if len(files) != 1:
            raise ValueError(f"previous version {prev_sha} of {model!r} is missing from the store")
        self._start(Entry.REQUEST, InFlightUpdate.new(
            phase=Phase.ROLLING_BACK, seq=0, model=model, sha=current["current"],
            file_name=current.get("file_name"), version=current.get("version"),
            rollout_id=None, transitions=1, local=True,
            previous_model={"current": prev_sha, "previous": None, "file_name": files[0], "committed": True},
            error_code=ErrorCode.LOCAL_ROLLBACK, detail="rolled back locally by an operator",
            started=format_time(utcnow()),
        ))

    def _handle_requests(self) -> None:
        for request in sorted(self.requests_dir.glob("rollback-*.json")):
            try:
                model = json.loads(request.read_text())["model"]
                self.start_local_rollback(model)
                answer = {"ok": True}
            except (ValueError, KeyError, OSError) as exc:
                answer = {"ok": False, "error": str(exc)}
            atomic_write_json(request.with_suffix(".done"), answer)
            request.unlink(missing_ok=True)

    # --- mqtt side ----------------------------------------------------------------------------

    def active_models(self) -> dict[str, str]:
        return {name: m["current"] for name, m in self.journal.data["models"].items() if m.get("current")}

    def _presence(self, online: bool) -> bytes:
        return presence_payload(online=online, agent_version=AGENT_VERSION, active=self.active_models())

    def _publish_presence(self) -> None:
        if self.link and self.link.connected.is_set():
            self.link.publish("presence", self._presence(True), qos=1, retain=True, timeout=0)

    def _publish_event(self, payload: bytes) -> bool:
        return bool(self.link) and self.link.publish("events", payload, qos=1, timeout=10)

    def _telemetry_loop(self) -> None:
        from agent.telemetry import collect

        collect(device_id=self.cfg.device_id, state_dir=self.state_dir, active={}, health=None)  # primes cpu_percent
        while not self.stop.wait(self.cfg.telemetry.interval_seconds):
            if not (self.link and self.link.connected.is_set()):
                continue
            try:
                payload = collect(device_id=self.cfg.device_id, state_dir=self.state_dir,
                                  active=self.active_models(), health=self.journal.data.get("last_health"))
                self.link.publish("telemetry", payload, qos=0)
            except Exception:  # telemetry must never take the agent down
                log.exception("telemetry failed")


def status(cfg: Config) -> dict:
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
        "last_seq": journal["last_seq"],
        "last_outcome": journal.get("last_outcome"),
        "last_health": journal.get("last_health"),
        "denylist": journal["denylist"],
        "pending_outbox": pending,
    }
