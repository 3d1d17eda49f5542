"""Real `fleet-agent` processes for end-to-end tests: enrolled through the live API, each with its
own state directory and broker credentials, started, stopped, killed -9 and checked on disk."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.support.agent_harness import HEALTH_OK, toml_value
from tests.support.platform import REPO
from tests.support.waiting import wait_for

FLEET_AGENT = str(REPO / ".venv" / "bin" / "fleet-agent")
# Test pacing only (a one-second trial instead of production's minutes); everything else about
# the agent, its restart and crash-loop rules included, is the default configuration.
AGENT_UPDATE = {
    "disk_reserve_mb": 1,
    "trial_seconds": 1,
    "health_interval_seconds": 0.4,
    "health_command": HEALTH_OK,
    "precheck_timeout_seconds": 60,
    "download_backoff_seconds": 0.2,
    "download_backoff_max_seconds": 1,
}


class Agents:
    def __init__(self, workdir: Path, env: dict):
        self.workdir = workdir
        self.env = {k: v for k, v in env.items() if k != "DJANGO_SETTINGS_MODULE"}
        self.procs: dict[str, subprocess.Popen] = {}
        self.configs: dict[str, Path] = {}

    def enroll(self, server: str, token: str, count: int, *, labels: dict | None = None,
               prefix: str = "box", update: dict | None = None) -> list[str]:
        """Enroll `count` agents at once; returns their device ids (sorted), all enrolled so far.
        `update` overrides the test pacing in AGENT_UPDATE."""
        labels = {"site": "berlin", **(labels or {})}
        pacing = {**AGENT_UPDATE, **(update or {})}
        pending = []
        first = len(self.configs)
        for i in range(first, first + count):
            state_dir = self.workdir / f"{prefix}-{i:02d}"
            label_args = [arg for k, v in labels.items() for arg in ("--label", f"{k}={v}")]
            pending.append((state_dir, subprocess.Popen(
                [FLEET_AGENT, "enroll", "--server", server, "--token", token, "--hardware", "rpi4",
                 *label_args, "--label", f"box={i}", "--state-dir", str(state_dir)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env)))
        for state_dir, proc in pending:
            out, _ = proc.communicate(180)  # many interpreters starting at once on a busy 2-core box
            assert proc.returncode == 0, out.decode()
            config = state_dir / "agent.toml"
            assert config.stat().st_mode & 0o777 == 0o600
            device_id = out.decode().split("enrolled as ", 1)[1].split(";", 1)[0]
            with config.open("a") as handle:
                handle.write("\n[update]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in pacing.items()))
            self.configs[device_id] = config
        return sorted(self.configs)

    def add_table(self, device_id: str, table: str, values: dict) -> None:
        """Append a TOML table the enrollment did not write (e.g. [metrics], [telemetry])."""
        with self.configs[device_id].open("a") as handle:
            handle.write(f"\n[{table}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))

    def state_dir(self, device_id: str) -> Path:
        return self.configs[device_id].parent

    def start(self, device_id: str) -> None:
        with open(self.configs[device_id].parent / "agent.log", "ab") as log:  # the child keeps its own copy
            self.procs[device_id] = subprocess.Popen(
                [FLEET_AGENT, "run", "--config", str(self.configs[device_id])],
                stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def stop(self, device_id: str) -> None:
        proc = self.procs.pop(device_id, None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill(self, device_id: str) -> None:
        """kill -9: a power loss as far as the agent can tell."""
        proc = self.procs.pop(device_id, None)
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def running(self, device_id: str) -> bool:
        proc = self.procs.get(device_id)
        return proc is not None and proc.poll() is None

    def stop_all(self) -> None:
        """SIGTERM every agent at once, then wait for each: one by one, a fleet's shutdowns add up."""
        procs = [self.procs.pop(d) for d in list(self.procs)]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 15
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def model_sha(self, device_id: str, model: str, file_name: str = "model.onnx") -> str | None:
        """sha256 of the bytes the box's app would load now (models/<model>/current/<file>)."""
        path = self.configs[device_id].parent / "models" / model / "current" / file_name
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest()
        except FileNotFoundError:
            return None

    def logs(self) -> str:
        return "\n".join(
            f"===== agent {d} =====\n{(c.parent / 'agent.log').read_text(errors='replace')[-1500:]}"
            for d, c in self.configs.items() if (c.parent / "agent.log").exists()
        )


def wait_until(predicate, timeout, what, platform, agents):
    """`wait_for` with the server's and the agents' logs on a timeout; prints how long it took."""
    start = time.monotonic()
    wait_for(predicate, timeout=timeout, what=what, interval=0.5,
             diagnostics=lambda: f"{platform.logs()}\n{agents.logs()}")
    print(f"{time.strftime('%H:%M:%S')} {what}: {time.monotonic() - start:.1f}s")
