"""On-disk outbox: every event is a file until the broker acknowledged it (QoS 1 PUBACK).

Files are named by event number, so they go out in order and survive restarts and broker
outages. `sent` records the highest acknowledged number, so re-queueing the journal's last
events after a crash never produces a second copy of something already delivered.

An acknowledged event moves to acked/ and is kept for `mqtt.resend_window_seconds`: a PUBACK
means the broker has it, not that the server does. A broker that crashes loses what it queued
for ingest since its last save (Mosquitto saves every autosave_interval, 30 minutes by
default), and ingest's subscription with it; so when the server's ingest announces a new
session (agent.mqtt, Topics.ingest_status), `requeue_acked` sends those events again. The
server stores each (device, seq, event_no) once.

Events made for another device id (the state directory was re-enrolled, agent.identity) are
never sent: `retire_foreign` moves them to retired/<their device id>/.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from agent.journal import atomic_write_bytes, crash_point, fsync_dir

log = logging.getLogger("fleet_agent.outbox")
ACKED_KEEP = 1000  # at most this many acknowledged events are kept for sending again


class Outbox:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.wake = threading.Event()
        self._lock = threading.Lock()

    @property
    def sent_watermark(self) -> int:
        try:
            return int((self.dir / "sent").read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def put(self, event_no: int, payload: bytes) -> None:
        with self._lock:
            if event_no <= self.sent_watermark:
                return
            atomic_write_bytes(self.dir / f"{event_no:012d}.json", payload)
        crash_point("event-queued")
        self.wake.set()

    def pending(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.json") if not p.name.startswith("."))

    @property
    def retired_dir(self) -> Path:
        return self.dir / "retired"

    def retire_foreign(self, device_id: str) -> int:
        """Move every pending event not made for `device_id` to retired/<its device id>/; the count."""
        moved = 0
        with self._lock:
            for path in self.pending():
                try:
                    claimed = json.loads(path.read_bytes()).get("device_id")
                except FileNotFoundError:
                    continue
                except (ValueError, AttributeError):
                    claimed = None
                if claimed == device_id:
                    continue
                name = claimed if isinstance(claimed, str) and claimed and "/" not in claimed and not claimed.startswith(".") else "unknown"
                target = self.retired_dir / name
                target.mkdir(parents=True, exist_ok=True)
                os.replace(path, target / path.name)
                fsync_dir(target)
                moved += 1
            if moved:
                fsync_dir(self.dir)
            # Acknowledged events of an earlier identity are never sent again.
            for path in self.acked_dir.glob("*.json") if self.acked_dir.is_dir() else ():
                try:
                    if json.loads(path.read_bytes()).get("device_id") != device_id:
                        path.unlink()
                except (FileNotFoundError, ValueError, AttributeError):
                    path.unlink(missing_ok=True)
        return moved

    def count(self) -> int:
        return len(self.pending())

    @property
    def acked_dir(self) -> Path:
        return self.dir / "acked"

    def mark_sent(self, path: Path) -> None:
        with self._lock:
            number = int(path.stem)
            if number > self.sent_watermark:
                atomic_write_bytes(self.dir / "sent", str(number).encode())
            self.acked_dir.mkdir(exist_ok=True)
            try:
                os.replace(path, self.acked_dir / path.name)
                os.utime(self.acked_dir / path.name)  # when the broker took it, not when it was made
            except FileNotFoundError:
                pass

    def requeue_acked(self, window_seconds: float, *, keep: int = ACKED_KEEP) -> int:
        """Queue again the events the broker acknowledged in the last `window_seconds` (see the
        module docstring); drop older ones, and all but the newest `keep`. Returns how many."""
        now = time.time()
        requeued = 0
        with self._lock:
            files = sorted(self.acked_dir.glob("*.json")) if self.acked_dir.is_dir() else []
            for i, path in enumerate(files):
                try:
                    fresh = window_seconds > 0 and now - path.stat().st_mtime <= window_seconds
                except FileNotFoundError:
                    continue
                if fresh and i >= len(files) - keep:
                    os.replace(path, self.dir / path.name)
                    requeued += 1
                else:
                    path.unlink(missing_ok=True)
        if requeued:
            log.info("sending again %d events the broker acknowledged in the last %.0f s", requeued, window_seconds)
            self.wake.set()
        return requeued

    def drain(self, publish, stop: threading.Event) -> None:
        """Sender thread body: publish pending events in order while `publish` succeeds."""
        while not stop.is_set():
            self.wake.wait(1.0)
            self.wake.clear()
            for path in self.pending():
                if stop.is_set():
                    return
                try:
                    payload = path.read_bytes()
                except FileNotFoundError:
                    continue
                if not publish(payload):
                    break  # offline or no PUBACK yet: keep it and retry later
                self.mark_sent(path)
