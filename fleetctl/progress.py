"""Upload progress on stderr: a live bar on a terminal, plain lines in CI logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


class Progress:
    """Callable as progress(sent, total). Reports percentage, bytes and rate.

    On a TTY the line is redrawn at most ten times a second; otherwise (CI logs) one plain line
    is written per 25 % step so logs stay short but still show that the upload moves.
    """

    BAR_WIDTH = 24
    PLAIN_STEP = 25

    def __init__(self, label: str, stream: TextIO | None = None, *, tty: bool | None = None):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.started = time.monotonic()
        self.last_draw = 0.0
        self.next_step = 0
        self.finished = False

    def __call__(self, sent: int, total: int) -> None:
        now = time.monotonic()
        percent = 100 if total == 0 else int(sent * 100 / total)
        elapsed = max(now - self.started, 1e-6)
        rate = sent / elapsed
        line = f"{self.label}  {percent:3d}%  {human_bytes(sent)} / {human_bytes(total)}  {human_bytes(rate)}/s"
        done = sent >= total
        if self.tty:
            if done or now - self.last_draw >= 0.1:
                filled = self.BAR_WIDTH * percent // 100
                bar = "#" * filled + "-" * (self.BAR_WIDTH - filled)
                self.stream.write(f"\r\x1b[K[{bar}] {line}")
                if done and not self.finished:
                    self.stream.write("\n")
                self.stream.flush()
                self.last_draw = now
        elif percent >= self.next_step and not self.finished:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.next_step = (percent // self.PLAIN_STEP + 1) * self.PLAIN_STEP
        if done:
            self.finished = True
