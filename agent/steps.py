"""The update steps: what the agent does in each phase of agent.machine.TABLE.

One method of `Steps` per phase, named after it (`Steps.downloading` is the download step);
Agent.drive() calls the one TABLE names for the journalled phase. A step ends by moving the update
on through `transition` or ending it through `finish` (both Agent's journal writes, checked against
the table), or by raising agent.download.Interrupted when the agent is told to stop, or (download
and precheck, the long steps before activation) when a newer directive may supersede the update:
then the run loop judges it, and either ends this update (SUPERSEDED) or runs the step again.

The model's hooks (the reload and health commands) run between two journal writes, `hook(name)`
and `hook(None)` (or the transition that follows): a restart that finds the mark in the journal
was a death during the hook, which counts against the model (Agent.recover).

Each step is safe to run twice: the journal write comes before the side effects of the next step,
so after a SIGKILL the restarted agent runs the journalled phase's step again. The crash points
(agent.journal.crash_point) between the side effects are here: download-chunk, staged, swapped,
reloaded, swapped-back.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent import deltas, windows
from agent.config import Config
from agent.download import AnyEvent, DownloadError, Interrupted, fetch_from_server
from agent.health import judge_figures, run_health, run_shell
from agent.inflight import InFlightUpdate
from agent.install import Store, StoreError, sha256_file
from agent.journal import Journal, child_env, crash_point
from agent.machine import Outcome, Phase
from agent.precheck import run_precheck
from agent.protocol import ErrorCode, format_time, parse_time, utcnow
from agent.shadow import ShadowResult, run_shadow, shadow_settings, spool_dir, spool_samples

if TYPE_CHECKING:
    from agent.metrics.book import MetricsBook

log = logging.getLogger("fleet_agent")


class Steps:
    """The steps of one agent, with what they need of it.

    transition(phase, *, event, mutate=None, **changes), finish(outcome, code, detail="", *,
    health=None, mutate=None), hook(command | None) and park(next_opening) are Agent._transition,
    Agent._finish, Agent._hook and Agent._park. stop: the agent is stopping; preempt: a newer directive may supersede the update
    (only the steps before activation heed it: `halt` is either).
    """

    def __init__(self, *, cfg: Config, store: Store, journal: Journal, stop: threading.Event,
                 transition: Callable[..., None], finish: Callable[..., None],
                 preempt: threading.Event | None = None, hook: Callable[[str | None], None] | None = None,
                 metrics: MetricsBook | None = None, park: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.store = store
        self.journal = journal
        self.stop = stop
        self.halt = AnyEvent(stop, preempt) if preempt is not None else stop
        self.transition = transition
        self.finish = finish
        self.hook = hook or (lambda _command: None)
        self.park = park
        self.metrics = metrics
        self.digests: dict[str, str] = {}  # sha -> digest computed while downloading (this process)

    def received(self, upd: InFlightUpdate) -> None:
        """Check the disk has room for what is left to download, plus update.disk_reserve_mb."""
        part = self.store.part_path(upd.sha)
        have = part.stat().st_size if part.exists() else 0
        need = 0 if self.store.has(upd.sha, upd.file_name) else max(0, upd.length - have)
        free = shutil.disk_usage(self.cfg.state_dir).free
        reserve = int(self.cfg.update.disk_reserve_mb * 2**20)
        if free - need < reserve:
            self.finish(Outcome.FAILED, ErrorCode.DISK_FULL,
                        f"needs {need / 2**20:.1f} MiB plus a reserve of {reserve / 2**20:.0f} MiB, "
                        f"{free / 2**20:.1f} MiB free")
            return
        self.transition(Phase.DOWNLOADING, event=True)

    def downloading(self, upd: InFlightUpdate) -> None:
        """Fetch the artifact into staging/<sha>.part (resumable), unless the store has it already:
        first as a delta from the model running here when the directive offers one (once: after
        any failure of it, or a resumed download that failed verification, the full artifact)."""
        sha = upd.sha
        delta_bytes, fallback = 0, {}
        # A failed delta is remembered beside the staging files until the update ends (the store's
        # gc removes it), so an agent restarted mid full download does not fetch the delta again.
        marker = self.store.part_path(sha).with_suffix(".nodelta")
        if upd.delta and marker.exists():
            try:
                noted = json.loads(marker.read_text())
                delta_bytes, fallback = int(noted["bytes"]), {"delta_fallback": str(noted["why"])}
            except (OSError, ValueError, KeyError, TypeError):
                fallback = {"delta_fallback": "an earlier attempt at the delta failed"}
        wants_delta = upd.delta and upd.delivery is None and not upd.refetched and not fallback
        if wants_delta and not self.store.has(sha, upd.file_name):
            ok, delta_bytes, why = self._delta(upd)
            if ok:
                self.transition(Phase.VERIFYING, event=True, delivery="delta", bytes_downloaded=delta_bytes)
                return
            log.warning("delta for %s not used, downloading the full artifact: %s", sha[:12], why)
            fallback = {"delta_fallback": why}
            marker.write_text(json.dumps({"why": why, "bytes": delta_bytes}))
        if not self.store.has(sha, upd.file_name):
            try:
                result = fetch_from_server(self.cfg, upd.url, self.store.part_path(sha), length=upd.length,
                                           stop=self.halt, on_chunk=lambda _pos: crash_point("download-chunk"))
            except DownloadError as exc:
                if exc.code == ErrorCode.TOO_LARGE:
                    self.store.part_path(sha).unlink(missing_ok=True)
                self.finish(Outcome.FAILED, exc.code, str(exc))
                return
            except OSError as exc:  # the local side: staging file or disk
                self.store.part_path(sha).unlink(missing_ok=True)
                code = ErrorCode.DISK_FULL if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ErrorCode.DOWNLOAD_FAILED
                self.finish(Outcome.FAILED, code, f"writing the download failed: {exc}")
                return
            self.digests[sha] = result.sha256
            log.info("downloaded %s: %d bytes received (resumed from %d)", sha[:12], result.bytes_received,
                     result.resumed_from)
            self.transition(Phase.VERIFYING, event=True, delivery="full",
                            bytes_downloaded=delta_bytes + _fetched(result), **fallback)
            return
        self.transition(Phase.VERIFYING, event=True)

    def _delta(self, upd: InFlightUpdate) -> tuple[bool, int, str]:
        """Rebuild the artifact from the delta and the model running here into staging/<sha>.part.
        Returns (ok, delta bytes fetched, why not). Nothing is trusted on the way: the base is
        hashed again, the delta checked against its signed length and sha256, and the result
        against the artifact's; a failure leaves no part file behind for the full download."""
        delta, sha = upd.delta, upd.sha
        if delta.get("method") != deltas.METHOD:
            return False, 0, f"delta method {delta.get('method')!r} is not supported here"
        if not deltas.available():
            return False, 0, "the zstandard module is not installed here"
        running = self.journal.data["models"].get(upd.model) or {}
        if running.get("current") != delta["base_sha256"]:
            return False, 0, "the delta's base is not the model running here"
        base = self.store.stored_file(delta["base_sha256"], running.get("file_name") or "")
        try:
            if sha256_file(base) != delta["base_sha256"]:
                return False, 0, "the base model here does not match its sha256 (tampered or corrupt)"
        except OSError as exc:
            return False, 0, f"the base model here cannot be read: {exc}"
        part = self.store.part_path(delta["sha256"]).with_suffix(".delta")
        built = self.store.part_path(sha).with_suffix(".patched")
        try:
            result = fetch_from_server(self.cfg, delta["url"], part, length=delta["length"], stop=self.halt,
                                       on_chunk=lambda _pos: crash_point("download-chunk"))
        except (DownloadError, OSError) as exc:
            part.unlink(missing_ok=True)
            return False, 0, f"the delta download failed: {exc}"
        # (Interrupted passes through with the part file kept: the delta resumes after a restart.)
        fetched = _fetched(result)
        try:
            if result.length != delta["length"] or result.sha256 != delta["sha256"]:
                return False, fetched, (f"the delta has sha256 {result.sha256}, "
                                                      f"signed {delta['sha256']}")
            try:
                digest = deltas.delta_apply(base=base, delta=part, out=built, length=upd.length)
            except (deltas.DeltaError, OSError, MemoryError) as exc:
                return False, fetched, str(exc)
            if built.stat().st_size != upd.length or digest != sha:
                return False, fetched, ("the rebuilt artifact does not match "
                                                      "its signed length and sha256")
            built.replace(self.store.part_path(sha))
            self.digests[sha] = digest
            log.info("rebuilt %s from a %d-byte delta on %s", sha[:12], delta["length"],
                     delta["base_sha256"][:12])
            return True, fetched, ""
        finally:
            part.unlink(missing_ok=True)
            built.unlink(missing_ok=True)

    def verifying(self, upd: InFlightUpdate) -> None:
        """Check the bytes against the signed sha256 and length; move them into the store."""
        sha, name, length = upd.sha, upd.file_name, upd.length
        part = self.store.part_path(sha)
        if self.store.has(sha, name):
            stored = self.store.stored_file(sha, name)
            if stored.stat().st_size != length or sha256_file(stored) != sha:
                self.store.remove(sha)
                self.finish(Outcome.FAILED, ErrorCode.HASH_MISMATCH, f"stored copy of {sha} is corrupt")
                return
        elif part.exists():
            size = part.stat().st_size
            digest = self.digests.pop(sha, None) or sha256_file(part)
            if size != length or digest != sha:
                part.unlink(missing_ok=True)
                if not upd.refetched:
                    # A part file resumed after a power cut can hold bytes that never reached the
                    # disk: one clean download from zero before calling the artifact bad.
                    log.warning("sha256 mismatch for %s; downloading once more from zero", sha[:12])
                    self.transition(Phase.DOWNLOADING, event=False, refetched=True)
                    return
                self.finish(Outcome.FAILED, ErrorCode.HASH_MISMATCH,
                            f"downloaded {size} bytes with sha256 {digest}, signed {length} bytes with sha256 {sha}")
                return
            self.store.stage(sha, name)
            crash_point("staged")
        else:
            try:
                self.store.stage(sha, name)  # a crash between the move and the rename
            except StoreError:
                self.transition(Phase.DOWNLOADING, event=False)
                return
            if sha256_file(self.store.stored_file(sha, name)) != sha:
                self.store.remove(sha)
                self.finish(Outcome.FAILED, ErrorCode.HASH_MISMATCH, "staged copy does not match its sha256")
                return
        self.transition(Phase.PRECHECKING, event=True)

    def prechecking(self, upd: InFlightUpdate) -> None:
        """Load the model in a child process and check it against the release's health contract."""
        path = self.store.stored_file(upd.sha, upd.file_name)
        u = self.cfg.update
        result = run_precheck(path, upd.health, timeout=u.precheck_timeout_seconds, memory_mb=u.precheck_memory_mb,
                              stop=self.halt, format=upd.format)
        if result.interrupted:
            raise Interrupted()
        if not result.ok:
            self.finish(Outcome.FAILED, ErrorCode.PRECHECK_FAILED, result.detail)
            return
        old = self.journal.data["models"].get(upd.model)
        previous_model = old if old and old.get("current") and old["current"] != upd.sha else None
        shadow = self._shadow(upd, path, previous_model)
        if shadow is not None and not shadow.ok:
            code = ErrorCode.SHADOW_DISAGREES if shadow.disagrees else ErrorCode.PRECHECK_FAILED
            self.finish(Outcome.FAILED, code, shadow.detail, health={"shadow": shadow.figures})
            return
        checked = {"precheck_latency_ms": result.latency_ms, **({"shadow": shadow.figures} if shadow is not None else {})}
        if upd.windows:
            self.transition(Phase.WAITING_FOR_WINDOW, event=False, **checked)
            return
        self.transition(Phase.ACTIVATING, event=True, previous_model=previous_model, **checked)

    def waiting_for_window(self, upd: InFlightUpdate) -> None:
        """Activate if one of the directive's maintenance windows is open by this box's clock;
        else park the update until one opens (Agent._park; Agent.wake_parked brings it back).

        Hours may pass between the precheck and this step, so the release's expiry is checked
        again, the stored copy is hashed again before `current` may point at it, and the model it
        replaces is read afresh (a local rollback may have run meanwhile)."""
        found = windows.parse_windows(upd.windows or [])
        now = utcnow()
        if not windows.is_open(found, now):
            opening = windows.next_opening(found, now)
            assert opening is not None and self.park is not None
            self.park(format_time(opening))
            return
        if upd.release_expires and parse_time(upd.release_expires, "release_expires") <= now:
            # Admission refuses an expired release; one that expired while it waited is no better.
            self.finish(Outcome.FAILED, ErrorCode.RELEASE_EXPIRED,
                        f"the release expired at {upd.release_expires} while it waited for its maintenance window")
            return
        stored = self.store.stored_file(upd.sha, upd.file_name)
        try:
            intact = stored.stat().st_size == upd.length and sha256_file(stored) == upd.sha
        except OSError:
            intact = False
        if not intact:
            self.store.remove(upd.sha)
            self.finish(Outcome.FAILED, ErrorCode.HASH_MISMATCH,
                        f"the stored copy of {upd.sha} changed while it waited for its maintenance window")
            return
        old = self.journal.data["models"].get(upd.model)
        previous_model = old if old and old.get("current") and old["current"] != upd.sha else None
        self.transition(Phase.ACTIVATING, event=True, previous_model=previous_model)

    def _shadow(self, upd: InFlightUpdate, candidate: Path, previous_model: dict | None) -> ShadowResult | None:
        """The release's shadow evaluation against the model `current` points at (None: the
        contract asks for none, or nothing runs yet to compare with)."""
        settings = shadow_settings(upd.health)
        if settings is None or not previous_model:
            return None
        current = self.store.stored_file(previous_model["current"], previous_model["file_name"])
        s = self.cfg.shadow
        samples = spool_samples(spool_dir(self.cfg.state_dir, upd.model), max_files=s.spool_max_files,
                                max_file_bytes=int(s.spool_max_file_mb * 2**20))
        u = self.cfg.update
        result = run_shadow(candidate=candidate, candidate_format=upd.format or "onnx", current=current,
                            current_format=previous_model.get("format") or upd.format or "onnx",
                            settings=settings, samples=samples, timeout=u.precheck_timeout_seconds,
                            memory_mb=u.precheck_memory_mb, stop=self.halt)
        if result.interrupted:
            raise Interrupted()
        log.info("shadow evaluation of %s: %s %s", upd.sha[:12], result.detail, result.figures)
        return result

    def activating(self, upd: InFlightUpdate) -> None:
        """Point `current` (and `previous`) at the new model and run the reload command."""
        model, sha = upd.model, upd.sha
        if upd.previous_model:
            self.store.point(model, "previous", upd.previous_sha)
        self.store.point(model, "current", sha)
        crash_point("swapped")
        record = {
            "current": sha, "previous": upd.previous_sha, "file_name": upd.file_name,
            "committed": False, "version": upd.version, "counter": upd.counter, "format": upd.format,
            "activated": format_time(utcnow()),  # when `current` moved here (maintenance windows are judged by it)
        }

        def mutate(data):
            data["models"][model] = record

        ok, detail = self._reload()
        cleared = {"hook": None} if self.cfg.update.reload_command else {}
        if not ok:
            self.transition(Phase.ROLLING_BACK, event=False, mutate=mutate, error_code=ErrorCode.ACTIVATE_FAILED,
                            detail=detail, **cleared)
            return
        crash_point("reloaded")
        self.transition(Phase.TRIAL, event=True, mutate=mutate, trial_restarts=0, **cleared)

    def trial(self, upd: InFlightUpdate) -> None:
        """For trial_seconds, every health_interval_seconds: run the health command and judge what
        the application reported as StatsD metrics for this release since the trial began (once
        there are metrics.min_trial_requests requests); commit if every check passed.

        The metrics window starts again when the agent restarts mid-trial: figures from before
        a power loss cannot be told apart from the app's start-up."""
        u = self.cfg.update
        deadline = time.monotonic() + u.trial_seconds
        figures: dict = {}
        app_figures: dict | None = None
        checks = 0
        app_path = str(self.store.app_path(upd.model, upd.file_name))
        if self.metrics:
            self.metrics.trial_begin(upd.model, upd.sha)
        try:
            while True:
                if u.health_command:
                    self.hook("health")
                    result = run_health(
                        u.health_command, model=upd.model, model_path=app_path, expected_sha256=upd.sha,
                        timeout=u.command_timeout_seconds, max_error_rate=u.max_error_rate,
                        max_latency_ms_p95=u.max_latency_ms_p95,
                    )
                    checks += 1
                    if not result.ok:
                        self.transition(Phase.ROLLING_BACK, event=False, error_code=ErrorCode.TRIAL_FAILED,
                                        detail=result.detail, health=result.figures, hook=None)
                        return
                    self.hook(None)
                    figures = result.figures
                if self.metrics:
                    app_figures = self.metrics.trial_figures(upd.model, upd.sha)
                    if app_figures and app_figures["requests"] >= self.cfg.metrics.min_trial_requests:
                        verdict = judge_figures(app_figures, max_error_rate=u.max_error_rate,
                                                max_latency_ms_p95=u.max_latency_ms_p95)
                        if verdict is not None:
                            self.transition(Phase.ROLLING_BACK, event=False, error_code=ErrorCode.TRIAL_FAILED,
                                            detail=f"the application's metrics: {verdict}",
                                            health={"app_metrics": app_figures})
                            return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if self.stop.wait(min(u.health_interval_seconds, remaining)):
                    raise Interrupted()
        finally:
            if self.metrics:
                self.metrics.trial_end(upd.model, upd.sha)
        health = {
            **{k: v for k, v in figures.items() if k in ("model_sha256", "error_rate", "latency_ms_p95")},
            "checks": checks,
            "trial_seconds": u.trial_seconds,
            "trial_restarts": upd.trial_restarts,
            "precheck_latency_ms": upd.precheck_latency_ms,
            **({"shadow": upd.shadow} if upd.shadow is not None else {}),
        }
        if app_figures is not None:
            health["app_metrics"] = {**app_figures,
                                     "judged": app_figures["requests"] >= self.cfg.metrics.min_trial_requests}
        model = upd.model

        def mutate(data):
            data["models"][model]["committed"] = True
            data["floors"][model] = max(data["floors"].get(model, 0), upd.rollback_floor)
            data["last_health"] = health

        self.finish(Outcome.COMMITTED, None, "trial passed", health=health, mutate=mutate)

    def rolling_back(self, upd: InFlightUpdate) -> None:
        """Point `current` back at the re-verified previous model (or none) and deny-list the sha."""
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
                self.finish(Outcome.FAILED, ErrorCode.ROLLBACK_FAILED,
                            f"{detail}; previous model {prev_sha} failed re-verification, kept {sha}")
                return
            self.store.point(model, "current", prev_sha)
            self.store.point(model, "previous", None)
        else:
            self.store.point(model, "current", None)
            self.store.point(model, "previous", None)
        crash_point("swapped-back")
        if upd.hook:
            # The agent died while this rollback's reload ran (Agent.recover keeps the mark in
            # rolling_back): the switch back is done, so do not call it again.
            detail = f"{detail}; reload command skipped: the agent died while it ran"
        elif upd.transitions > self.cfg.update.max_transitions + 3:
            # The reload hook itself keeps killing us: the switch back is done, so stop calling it.
            detail = f"{detail}; reload command skipped after repeated restarts"
        else:
            ok, reload_detail = self._reload()
            if not ok:
                detail = f"{detail}; {reload_detail}"

        def mutate(data):
            if prev:
                data["models"][model] = {**prev, "committed": True}
            else:
                data["models"].pop(model, None)
            if sha not in data["denylist"]:
                data["denylist"].append(sha)

        self.finish(Outcome.ROLLED_BACK, code, detail, health=upd.health or None, mutate=mutate)

    def _reload(self) -> tuple[bool, str]:
        """Run the reload command (if any), marked in the journal as a model hook while it runs."""
        if not self.cfg.update.reload_command:
            return True, ""
        self.hook("reload")
        return _run_reload(self.cfg)


def _fetched(result) -> int:
    """Bytes fetched for a download, by this process and (the part it resumed) by earlier ones."""
    return result.resumed_from + result.bytes_received


def _run_reload(cfg: Config) -> tuple[bool, str]:
    command = cfg.update.reload_command
    if not command:
        return True, ""
    try:
        proc = run_shell(command, env=child_env(), timeout=cfg.update.command_timeout_seconds)
    except subprocess.TimeoutExpired:
        return False, f"reload command timed out after {cfg.update.command_timeout_seconds:g}s"
    if proc.returncode != 0:
        return False, f"reload command exited {proc.returncode}: {proc.stderr.decode('utf-8', 'replace')[-300:]}"
    return True, ""
