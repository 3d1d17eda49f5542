"""Wave and target device lists of 10,000 to 75,000 ids through the real API, and /healthz while
two such requests arrive at once (issue 11: 75,000 ids cost 38.7 s of CPU in a quadratic check,
and two of them made /healthz take 55.8 s).

Creates a throw-away database (Django's test-database machinery, on whatever DATABASE_URL names:
PostgreSQL in CI and `make bench`), fills it with --devices devices and a released version (the
row only: nothing is signed or sent), and starts gunicorn on it (sync workers, as
deploy/systemd/modelfleet-web.service runs it; --workers 4, deploy's WEB_WORKERS default).
Then, with a ci token:

- per case, the POST /api/v1/rollouts/ round trip (median of --runs) and the server's CPU time for
  it (utime+stime of the gunicorn workers, from /proc), with its status: a 75,000-id wave list is
  over the per-wave cap (400), 75,000 ids in target.devices are under the definition's cap (201:
  validated, planned and created);
- per case, the validation alone in this process: ota.rollouts.planning.rollout_plan (every check,
  the target resolved against the database, the conflict query; no rows written);
- the physical reference measured in the same run: json.loads and json.dumps of the same body;
- /healthz polled every 50 ms while two 75,000-id requests run at once (each kind): worst and
  median latency; and, for information, the same on 2 workers, where both are busy and /healthz
  waits for one of the two requests to finish.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/modelfleet SECRET_KEY=x \\
        .venv/bin/python benchmarks/device_lists.py [--devices 80000] [--runs 3]

Writes benchmarks/results/device_lists.json. Targets: a 75,000-id list refused or validated in
under 1 s (validation), and /healthz under 1 s while two such requests run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "device_lists.json"
TARGET_VALIDATE_MS = 1000
TARGET_HEALTHZ_MS = 1000

os.environ.setdefault("SECRET_KEY", "benchmark-only")


def fill(n_devices: int) -> str:
    """Devices dev-000000.., detector 2.0 with an artifact for their hardware, marked released (a
    rollout's definition is checked against it; nothing here signs or sends anything), and a ci
    token (returned)."""
    from ota.models import Device
    from registry.models import ApiToken, Artifact, HardwareTarget, Model, ModelVersion

    hardware = HardwareTarget.objects.create(id="rpi4", max_artifact_bytes=10**9)
    Device.objects.bulk_create(
        [Device(id=f"dev-{i:06d}", hardware=hardware, labels={"site": "berlin"}, mqtt_username=f"dev-{i:06d}")
         for i in range(n_devices)],
        batch_size=5000,
    )
    version = Model.objects.create(name="detector").versions.create(version="2.0", counter=1)
    Artifact.objects.create(version=version, hardware=hardware, format="onnx", file_name="m.onnx", length=1000,
                            sha256=f"{1:064x}", storage_key="bench/rpi4")
    ModelVersion.objects.filter(pk=version.pk).update(state=ModelVersion.State.RELEASED, envelope={"bench": True})
    secret = ApiToken.new_secret()
    ApiToken.objects.create(name="bench-ci", scope="ci", prefix=secret[:8], token_hash=ApiToken.hash_secret(secret))
    return secret


def cases(n_devices: int) -> dict[str, dict]:
    ids = [f"dev-{i:06d}" for i in range(n_devices)]
    base = {"model": "detector", "version": "2.0"}
    return {
        "wave_10k": {**base, "target": {"devices": ids[:10_000]}, "waves": [{"name": "listed", "devices": ids[:10_000]}]},
        "wave_50k_at_cap": {**base, "target": {"devices": ids[:50_000]},
                            "waves": [{"name": "listed", "devices": ids[:50_000]}]},
        "wave_75k_over_cap": {**base, "target": {"labels": {"site": "berlin"}},
                              "waves": [{"name": "listed", "devices": ids[:75_000]}, {"percent": 100}]},
        "target_75k": {**base, "target": {"devices": ids[:75_000]},
                       "waves": [{"name": "canary", "count": 10}, {"percent": 100}]},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None = None, token: str = "") -> tuple[int, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    started = time.perf_counter()
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    elapsed = (time.perf_counter() - started) * 1000
    conn.close()
    return response.status, elapsed


def workers_cpu_seconds(master_pid: int) -> float:
    """utime + stime of gunicorn's worker processes (children of the master)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master_pid:  # fields[1] is the ppid (field 4 of stat)
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / tick


class Server:
    def __init__(self, database_url: str, data_dir: Path, workers: int):
        self.port = free_port()
        env = {**os.environ, "DATABASE_URL": database_url, "DATA_DIR": str(data_dir), "DEBUG": "false",
               "LOG_LEVEL": "WARNING", "SECRET_KEY": os.environ["SECRET_KEY"]}
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "gunicorn"), "config.wsgi:application", "--bind",
             f"127.0.0.1:{self.port}", "--workers", str(workers), "--timeout", "600", "--no-control-socket"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(data_dir / "gunicorn.log", "wb"),
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if request(self.port, "GET", "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"gunicorn did not answer /healthz: {(data_dir / 'gunicorn.log').read_text()[-2000:]}")

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)


def measure_case(server: Server, token: str, body: bytes, runs: int) -> dict:
    samples, cpu, statuses = [], [], set()
    for _ in range(runs):
        before = workers_cpu_seconds(server.process.pid)
        status, ms = request(server.port, "POST", "/api/v1/rollouts/", body, token)
        cpu.append(workers_cpu_seconds(server.process.pid) - before)
        samples.append(ms)
        statuses.add(status)
    return {"status": sorted(statuses), "request_median_ms": round(statistics.median(samples), 1),
            "request_max_ms": round(max(samples), 1), "server_cpu_median_s": round(statistics.median(cpu), 3),
            "body_bytes": len(body)}


def validate_in_process(definition: dict, runs: int) -> dict:
    from django.core.exceptions import ValidationError

    from ota.rollouts.planning import rollout_plan
    from registry.models import ModelVersion

    release = ModelVersion.objects.select_related("model").get(model__name="detector", version="2.0")
    samples, outcome = [], ""
    for _ in range(runs):
        started = time.perf_counter()
        try:
            rollout_plan(release=release, target=definition["target"], waves=definition["waves"])
            outcome = "valid"
        except ValidationError as exc:
            outcome = "refused: " + "; ".join(f"{k}: {v[0]}" for k, v in exc.message_dict.items())[:200]
        samples.append((time.perf_counter() - started) * 1000)
    return {"validate_median_ms": round(statistics.median(samples), 1), "validate_outcome": outcome}


def reference(body: bytes, runs: int) -> dict:
    loads, dumps = [], []
    for _ in range(runs):
        started = time.perf_counter()
        data = json.loads(body)
        loads.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        json.dumps(data)
        dumps.append((time.perf_counter() - started) * 1000)
    return {"json_loads_ms": round(statistics.median(loads), 2), "json_dumps_ms": round(statistics.median(dumps), 2)}


def healthz_under_load(server: Server, token: str, body: bytes) -> dict:
    """Two POSTs of `body` at once; /healthz every 50 ms from their start until both answered."""
    done, results, latencies = threading.Event(), [], []

    def post():
        results.append(request(server.port, "POST", "/api/v1/rollouts/", body, token))

    posters = [threading.Thread(target=post) for _ in range(2)]
    started = time.perf_counter()
    for t in posters:
        t.start()

    def watch():
        for t in posters:
            t.join()
        done.set()

    threading.Thread(target=watch).start()
    while not done.is_set():
        status, ms = request(server.port, "GET", "/healthz")
        assert status == 200
        latencies.append(ms)
        time.sleep(0.05)
    return {
        "requests": [{"status": s, "ms": round(ms, 1)} for s, ms in results],
        "window_ms": round((time.perf_counter() - started) * 1000, 1),
        "healthz_polls": len(latencies),
        "healthz_max_ms": round(max(latencies), 1),
        "healthz_median_ms": round(statistics.median(latencies), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=80_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers (deploy's WEB_WORKERS default: 4)")
    args = parser.parse_args()

    from benchmarks._setup import throwaway_database

    with throwaway_database(test_environment=True):
        from django.conf import settings
        from django.db import connection

        server = None
        try:
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                started = time.perf_counter()
                token = fill(args.devices)
                with connection.cursor() as cursor:
                    if connection.vendor == "postgresql":
                        cursor.execute("ANALYZE")
                fill_seconds = time.perf_counter() - started
                db = settings.DATABASES["default"]
                database_url = os.environ.get("DATABASE_URL", "")
                database_url = database_url.rsplit("/", 1)[0] + "/" + db["NAME"] if connection.vendor == "postgresql" \
                    else f"sqlite:///{db['NAME']}"
                server = Server(database_url, tmp, args.workers)
                for _ in range(2 * args.workers):  # warm-up: each worker's first request connects to the database
                    request(server.port, "GET", "/api/v1/rollouts/?limit=1", token=token)
                results = {}
                for name, definition in cases(args.devices).items():
                    body = json.dumps(definition).encode()
                    results[name] = {
                        "ids": max(len(definition["target"].get("devices", [])),
                                   *(len(w.get("devices", [])) for w in definition["waves"])),
                        **measure_case(server, token, body, args.runs),
                        **validate_in_process(definition, args.runs),
                        **reference(body, args.runs),
                    }
                load = {kind: healthz_under_load(server, token, json.dumps(cases(args.devices)[kind]).encode())
                        for kind in ("wave_75k_over_cap", "target_75k")}
                server.stop()
                # As many workers as heavy requests: /healthz waits for one of them to finish.
                server = Server(database_url, tmp, 2)
                every_worker_busy = healthz_under_load(server, token, json.dumps(cases(args.devices)["target_75k"]).encode())
        finally:
            if server is not None:
                server.stop()

    worst_validate = max(r["validate_median_ms"] for k, r in results.items() if "75k" in k)
    worst_healthz = max(r["healthz_max_ms"] for r in load.values())
    report = {
        "benchmark": "device_lists",
        "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "database": connection.vendor,
        "devices": args.devices,
        "runs": args.runs,
        "gunicorn_workers": args.workers,
        "fill_seconds": round(fill_seconds, 1),
        "cases": results,
        "healthz_while_two_75k_requests": load,
        "healthz_while_two_target_75k_on_2_workers": every_worker_busy,
        "target_validate_75k_ms": TARGET_VALIDATE_MS,
        "target_healthz_ms": TARGET_HEALTHZ_MS,
        "worst_validate_75k_ms": worst_validate,
        "worst_healthz_ms": worst_healthz,
        "meets_targets": worst_validate < TARGET_VALIDATE_MS and worst_healthz < TARGET_HEALTHZ_MS,
        "before": "issue 11: 75,000 ids cost 38.7 s of CPU; /healthz took 55.8 s during two such requests",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:18s} {r['ids']:6d} ids {r['body_bytes'] / 1e6:5.2f} MB  status {r['status']}  request "
              f"{r['request_median_ms']:7.1f} ms (server CPU {r['server_cpu_median_s']:.3f} s)  validate "
              f"{r['validate_median_ms']:7.1f} ms  json.loads {r['json_loads_ms']:6.1f} ms  [{r['validate_outcome'][:80]}]")
    load_report = {**load, "target_75k on 2 workers (informative)": every_worker_busy}
    for kind, r in load_report.items():
        print(f"/healthz during two {kind}: max {r['healthz_max_ms']} ms, median {r['healthz_median_ms']} ms over "
              f"{r['healthz_polls']} polls; requests {[(x['status'], x['ms']) for x in r['requests']]}")
    print(f"75,000 ids validated in {worst_validate} ms at worst (target < {TARGET_VALIDATE_MS}); /healthz worst "
          f"{worst_healthz} ms (target < {TARGET_HEALTHZ_MS}): {'met' if report['meets_targets'] else 'MISSED'}; "
          f"wrote {RESULTS.relative_to(ROOT)}")
    return 0 if report["meets_targets"] else 1


if __name__ == "__main__":
    sys.exit(main())
