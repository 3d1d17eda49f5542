"""Running the real `make run` in tests: its output collected, its processes found, stopped
the way a service manager would; ports for it; another terminal's environment."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.support.net import free_port

ROOT = Path(__file__).resolve().parents[2]
LOGIN_RE = re.compile(r"admin login:\s+username: (\S+)\s+password: (\S+)")
MQTT_LINE_RE = re.compile(r"MQTT:\s+127\.0\.0\.1:(\d+)")
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else "python3"



class Output:
    """Collects a process's merged output on a thread so the pipe never fills up."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: re.Pattern, process: subprocess.Popen, timeout: float,
                 what: str = "the admin login") -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = pattern.search(self.text)
            if match:
                return match
            if process.poll() is not None:
                self.thread.join(5)
                pytest.fail(f"make run exited with {process.returncode}:\n{self.text[-5000:]}")
            time.sleep(0.2)
        pytest.fail(f"no {what} printed within {timeout} s:\n{self.text[-5000:]}")


def listen_port() -> int:
    """A port for make run to listen on: tests.support.net.free_port(), which already keeps below
    the kernel's ephemeral range (no outgoing connection takes it before gunicorn or Mosquitto
    binds it) and reserves it against the other test processes on this machine."""
    return free_port()


class MakeRun:
    """One `make run` in its own session, its merged output collected."""

    def __init__(self, env: dict[str, str], *, cwd: Path = ROOT):
        self.env = env
        self.cwd = cwd
        self.process = subprocess.Popen(
            ["make", "run"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        self.output = Output(self.process.stdout)

    def __enter__(self) -> MakeRun:
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    @property
    def text(self) -> str:
        return self.output.text

    def login(self) -> tuple[str, str]:
        return self.output.wait_for(LOGIN_RE, self.process, timeout=120).groups()

    def processes(self) -> list[psutil.Process]:
        return [p for p in psutil.Process(self.process.pid).children(recursive=True) if p.is_running()]

    def program(self, needle: str) -> psutil.Process:
        """The process supervisord started whose command line contains `needle`."""
        for child in self.processes():
            try:
                under_supervisord = "supervisord" in " ".join(child.parent().cmdline())
                if needle in " ".join(child.cmdline()) and under_supervisord:
                    return child
            except psutil.NoSuchProcess:
                continue
        raise AssertionError(f"no {needle!r} under supervisord:\n{self.text[-3000:]}")

    def until(self, predicate, what: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if self.process.poll() is not None:
                self.output.thread.join(5)
                pytest.fail(f"make run exited with {self.process.returncode} waiting for {what}:\n"
                            f"{self.text[-5000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout} s waiting for {what}:\n{self.text[-5000:]}")
            time.sleep(0.2)

    def stop(self, *, ctrl_c: bool = False) -> None:
        """SIGTERM, as a service manager or `kill` would, or (`ctrl_c`) what a terminal does on
        Ctrl-C, SIGINT to the whole foreground process group: everything it started goes away."""
        children = self.processes()
        if ctrl_c:
            os.killpg(self.process.pid, signal.SIGINT)
        else:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        _gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"still running after {'Ctrl-C' if ctrl_c else 'SIGTERM'}: {[p.cmdline() for p in alive]}"
        self.output.thread.join(5)
        assert "run: error" not in self.text, self.text[-3000:]  # a requested stop, not a failure


class PortTaken:
    """Something listening on 127.0.0.1:`port` for the duration (nothing to do when something
    already listens there, as a system Mosquitto does on 1883)."""

    def __init__(self, port: int):
        self.port = port
        self.sock: socket.socket | None = None

    def __enter__(self) -> PortTaken:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a stopped server's TIME_WAITs
        try:
            sock.bind(("127.0.0.1", self.port))
        except OSError:
            sock.close()
            with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                pass  # taken, and by a listener: what make run sees too
            return self
        sock.listen(8)
        self.sock = sock
        return self

    def __exit__(self, *exc) -> None:
        if self.sock is not None:
            self.sock.close()


def second_shell(run_env: dict[str, str]) -> dict[str, str]:
    """Another terminal: none of the settings make run exported, only DATA_DIR (when not var/)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DATABASE_URL", "SECRET_KEY", "MQTT_", "REDIS_", "DEBUG", "WEB_PORT"))}
    env["DATA_DIR"] = run_env["DATA_DIR"]
    return env


