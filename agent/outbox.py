"""On-disk outbox: every event is a file until the broker acknowledged it (QoS 1 PUBACK).

Files are named by event number, so they go out in order and survive restarts and broker
outages. `sent` records the highest acknowledged number, so re-queueing the journal's last
events after a crash never produces a second copy of something already delivered.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from agent.journal import atomic_write_bytes, crash_point

log = logging.getLogger("fleet_agent.outbox")


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

    def count(self) -> int:
        return len(self.pending())

    def mark_sent(self, path: Path) -> None:
        with self._lock:
            number = int(path.stem)
            if number > self.sent_watermark:
                atomic_write_bytes(self.dir / "sent", str(number).encode())
            path.unlink(missing_ok=True)

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
