"""The embedded default holds under load: a real `make run` on SQLite (its web, Celery worker,
beat and ingest all writing the one database file) rolls a release out to 200 simulated devices
(`manage.py simulate_fleet`, real MQTT connections, enrolling and reporting into the same file)
while a CI client keeps writing through the API, and no process ever meets "database is locked".

The same run shows the quiet tick: beat ticks every second here, and make run's console has no
routine tick line, but does have the engine's decisions."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support import makerun as make_run

ROOT = make_run.ROOT
DEVICES = 200


class Api:
    def __init__(self, base: str, token: str):
        self.base, self.token = base, token

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.base}/api/v1/{path}", data=data, method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_it_rolls_out_to_200_devices_on_sqlite_without_database_is_locked(tmp_path):
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DATABASE_URL", "SECRET_KEY", "MQTT_", "REDIS_"))}
    env.pop("DEBUG", None)
    env.update(
        DATA_DIR=str(data_dir),
        WEB_PORT=str(make_run.listen_port()),
        MQTT_PORT=str(make_run.listen_port()),
        REDIS_URL=f"redis://127.0.0.1:{make_run.listen_port()}/0",  # its own Redis, started by make run
        ROLLOUT_TICK_SECONDS="1",
    )
    base = f"http://127.0.0.1:{env['WEB_PORT']}"
    started = time.monotonic()
    with make_run.MakeRun(env) as run:
        run.login()
        up_seconds = time.monotonic() - started
        shell = make_run.second_shell(env)
        created = subprocess.run(
            [make_run.PYTHON, "manage.py", "tokens", "create", "--name", "load", "--scope", "admin"],
            cwd=ROOT, env=shell, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert created.returncode == 0, created.stderr[-3000:]
        api = Api(base, created.stdout.strip().splitlines()[-1])

        hardware = {"id": "rpi4", "description": "sim", "max_artifact_bytes": 10**6}
        assert api.call("POST", "hardware/", hardware)[0] == 201
        artifact = tmp_path / "model.bin"
        artifact.write_bytes(os.urandom(4096))
        # No runtime can precheck format other: the release says so, or the registry refuses it.
        contract = tmp_path / "health.json"
        contract.write_text('{"precheck": "none"}')
        pushed = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "fleetctl"), "push", "--url", base, "--token", api.token,
             "--model", "detector", "--version", "1.0", "--artifact", f"rpi4={artifact}", "--format", "other",
             "--health", str(contract), "--create-model", "--release", "-q"],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert pushed.returncode == 0, pushed.stderr[-3000:]

        # 200 devices enrolled (into the same SQLite file) and connected over MQTT, with the
        # broker settings make run wrote for other shells.
        sim_env = {**shell, **_env_file(data_dir / "run.env")}
        sim_log = tmp_path / "simulator.log"
        with open(sim_log, "wb") as log:
            sim = subprocess.Popen(
                [make_run.PYTHON, "manage.py", "simulate_fleet", "--devices", str(DEVICES),
                 "--hardware", "rpi4", "--label", "site=load", "--step-seconds", "0.05"],
                cwd=ROOT, env=sim_env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            def online() -> bool:
                assert sim.poll() is None, sim_log.read_text()[-3000:]
                status, page = api.call("GET", "devices/?online=true&limit=1")
                return status == 200 and page["count"] >= DEVICES

            run.until(online, f"{DEVICES} simulated devices online", timeout=120)

            # A CI client writing through the API the whole time (web writes with the rest).
            api_failures: list[tuple[int, dict]] = []
            api_writes = 0
            done = threading.Event()

            def keep_writing() -> None:
                nonlocal api_writes
                while not done.is_set():
                    status, body = api.call("POST", "enrollment-tokens/", {"max_uses": 1, "expires_in": "1h"})
                    api_writes += 1
                    if status != 201:
                        api_failures.append((status, body))

            writer = threading.Thread(target=keep_writing, daemon=True)
            writer.start()
            rollout_started = time.monotonic()
            status, rollout = api.call("POST", "rollouts/", {
                "model": "detector", "version": "1.0", "target": {"labels": {"site": "load"}},
                "waves": [{"percent": 10}, {"percent": 50}, {"percent": 100}],
                "gates": {"success": {"min_healthy_percent": 100}, "soak_seconds": 0},
            })  # fmt: skip
            assert status == 201, rollout
            assert api.call("POST", f"rollouts/{rollout['id']}/start", {})[0] == 200

            def finished():
                status, body = api.call("GET", f"rollouts/{rollout['id']}/")
                return body if status == 200 and body["state"] not in ("created", "running") else None

            final = run.until(finished, "the rollout to finish", timeout=120)
            rollout_seconds = time.monotonic() - rollout_started
            done.set()
            writer.join(30)
        finally:
            sim.send_signal(signal.SIGTERM)
            sim.wait(60)
        assert final["state"] == "completed", json.dumps(final)[:3000]
        assert not api_failures, api_failures[:5]
        run.stop()

    logs = {path.name: path.read_text(errors="replace") for path in sorted((data_dir / "log").glob("*.log"))}
    logs["make run"] = run.text
    logs["simulator"] = sim_log.read_text(errors="replace")
    locked = {name: [line for line in text.splitlines() if "database is locked" in line.lower()][:3]
              for name, text in logs.items()}
    assert not any(locked.values()), locked
    assert not any("OperationalError" in text for text in logs.values()), \
        {name: text[-2000:] for name, text in logs.items() if "OperationalError" in text}
    for program in ("web.log", "worker.log", "beat.log", "ingest.log"):
        assert program in logs

    # The quiet tick: beat ticked every second, none of it on the console; decisions are there.
    assert "Sending due task rollout-tick" not in run.text
    assert not re.search(r"ota\.tasks\.rollout_tick\[", run.text)
    assert re.search(r"worker \| .*rollout \d+: wave\.gate_met: ", run.text), run.text[-3000:]
    assert re.search(r"rollout \d+: rollout\.complete", run.text)
    print(f"\nmake run up in {up_seconds:.1f} s; {DEVICES}-device rollout on SQLite in "
          f"{rollout_seconds:.1f} s; {api_writes} API writes meanwhile; "
          f"whole test {time.monotonic() - started:.1f} s")
