"""make run's console: a supervisord event listener (deploy/supervisord.conf, [eventlistener:console]).

- Every line a program writes is printed once, prefixed by the program's name (`web    | ...`).
- Every start, death and restart is said on a line of its own (`run    | ...`); a program that
  died or failed to start is said loudly (`***`), with supervisord's reason (the exit status or
  signal) from DATA_DIR/log/supervisord.log. What is left of a dead program's process group (a
  Celery pool child, a gunicorn worker) is killed before its replacement settles in.
- A program supervisord gave up on (FATAL: it kept exiting within `startsecs`) ends make run:
  the reason goes into DATA_DIR/supervisor/failed, supervisord is asked to stop everything, and
  scripts/run.sh exits 1. make run never goes on with a process missing.

Protocol (supervisord's "event listener" protocol, version 3.0): write READY on stdout, read one
header line and `len` bytes of payload on stdin, answer `RESULT 2\\nOK`. The console is written
into RUN_CONSOLE, a FIFO scripts/run.sh copies to its own stdout (stderr without it); our own
errors go to stderr (DATA_DIR/log/console.log). Standard library only.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

WIDTH = 6  # the longest program name ("worker", "ingest")
DATA_DIR = Path(os.environ.get("DATA_DIR", "var"))
FAILED = DATA_DIR / "supervisor" / "failed"
SUPERVISORD_LOG = DATA_DIR / "log" / "supervisord.log"
RETRIES = int(os.environ.get("RUN_START_RETRIES", "5"))  # every program's startretries


OUT = sys.stderr  # main() opens RUN_CONSOLE


def say(name: str, text: str) -> None:
    OUT.write(f"{name:<{WIDTH}} | {text}\n")


def fields(line: str) -> dict[str, str]:
    return dict(token.split(":", 1) for token in line.split() if ":" in token)


def exit_reason(name: str) -> str:
    """supervisord's own words for the last exit of `name` ("terminated by SIGKILL; not expected")."""
    try:
        with open(SUPERVISORD_LOG, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 16384))
            tail = log.read().decode("utf-8", "replace")
    except OSError:
        return "see its log"
    found = re.findall(rf"exited: {re.escape(name)} \((.*)\)", tail)
    return found[-1] if found else "see its log"


class Console:
    def __init__(self) -> None:
        self.partial: dict[tuple[str, str], str] = {}
        self.seen_running: set[str] = set()
        self.restarting: set[str] = set()

    # --- program output ---------------------------------------------------------------------

    def output(self, header: dict[str, str], data: bytes) -> None:
        key = (header.get("processname", "?"), header.get("channel", "stdout"))
        text = self.partial.pop(key, "") + data.decode("utf-8", "replace")
        *lines, rest = text.split("\n")
        for line in lines:
            say(key[0], line.rstrip("\r"))
        if rest:
            self.partial[key] = rest

    def flush(self, name: str) -> None:
        for key in [k for k in self.partial if k[0] == name]:
            say(name, self.partial.pop(key))

    # --- process states ---------------------------------------------------------------------

    def state(self, event: str, header: dict[str, str]) -> None:
        name = header.get("processname", "?")
        pid = header.get("pid")
        if name == "console":
            return  # this listener itself
        if event == "PROCESS_STATE_RUNNING":
            if name in self.restarting:
                say("run", f"{name} is running again (pid {pid})")
                self.restarting.discard(name)
            elif name not in self.seen_running:
                say("run", f"{name} started (pid {pid})")
            self.seen_running.add(name)
        elif event == "PROCESS_STATE_EXITED":
            self.flush(name)
            self._kill_leftovers(pid)
            say("run", f"*** {name} (pid {pid}) DIED ({exit_reason(name)}); restarting it. "
                       f"Its log: {DATA_DIR / 'log' / (name + '.log')}")
            self.restarting.add(name)
        elif event == "PROCESS_STATE_BACKOFF":
            self.flush(name)
            tries = int(header.get("tries", "1") or 1)
            then = f"retry {tries} of {RETRIES} in {tries} s" if tries <= RETRIES else "no retries left"
            say("run", f"*** {name} did not stay up ({exit_reason(name)}); {then}. "
                       f"Its log: {DATA_DIR / 'log' / (name + '.log')}")
            self.restarting.add(name)
        elif event == "PROCESS_STATE_FATAL":
            self.flush(name)
            reason = (f"{name} could not be kept running: {RETRIES + 1} starts in a row failed "
                      f"({exit_reason(name)}); see {DATA_DIR / 'log' / (name + '.log')}")
            say("run", f"*** {reason}. Stopping everything.")
            FAILED.parent.mkdir(parents=True, exist_ok=True)
            FAILED.write_text(reason + "\n")
            os.kill(os.getppid(), signal.SIGTERM)

    @staticmethod
    def _kill_leftovers(pid: str | None) -> None:
        # supervisord starts each program as the leader of its own process group.
        if pid and pid.isdigit() and int(pid) > 1:
            try:
                os.killpg(int(pid), signal.SIGKILL)
            except OSError:
                pass


def main() -> None:
    global OUT
    if os.environ.get("RUN_CONSOLE"):
        OUT = open(os.environ["RUN_CONSOLE"], "w", buffering=1, encoding="utf-8",  # noqa: SIM115
                   errors="replace")
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    console = Console()
    while True:
        stdout.write(b"READY\n")
        stdout.flush()
        line = stdin.readline()
        if not line:
            return  # supervisord went away
        header = fields(line.decode("utf-8", "replace"))
        payload = stdin.read(int(header.get("len", "0")))
        event = header.get("eventname", "")
        try:
            if event.startswith("PROCESS_LOG"):
                head, _, data = payload.partition(b"\n")
                console.output(fields(head.decode("utf-8", "replace")), data)
            elif event.startswith("PROCESS_STATE"):
                console.state(event, fields(payload.decode("utf-8", "replace")))
        except Exception as exc:  # noqa: BLE001 - never stall supervisord: report and go on
            say("run", f"console: could not handle {event}: {exc!r}")
        stdout.write(b"RESULT 2\nOK")
        stdout.flush()


if __name__ == "__main__":
    main()
