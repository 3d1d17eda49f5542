"""A private Mosquitto per test (or per module) on a free port, so tests never depend on the
machine's shared broker and can stop/restart it to simulate outages."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.support.net import free_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class Mosquitto:
    def __init__(self, workdir: Path, config: str = "", port: int | None = None, *, persistent: bool = False):
        """`config` is extra mosquitto.conf text (auth, ACL, plugins); the listener is added here.
        Without it the broker allows anonymous clients, which suits agent-only tests. `persistent`
        keeps sessions and retained messages in the workdir as `make run` does (saved at the
        default autosave interval and at a clean stop: kill() loses what came since)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_config = config
        self.persistent = persistent
        self.process: subprocess.Popen | None = None
        self.log_path = self.workdir / "mosquitto.log"

    @property
    def conf_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    def write_config(self) -> None:
        extra = self.extra_config or "allow_anonymous true\n"
        persistence = (f"persistence true\npersistence_location {self.workdir}/\n" if self.persistent
                       else "persistence false\n")
        self.conf_path.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"{persistence}"
            f"log_dest file {self.log_path}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            "max_packet_size 1048576\n"
            f"{extra}\n"
        )

    def start(self) -> Mosquitto:
        self.write_config()
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.process.stderr.read().decode()} {self.log_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log_text()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """kill -9: a crash, so nothing since the last autosave reaches the persistence file."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
