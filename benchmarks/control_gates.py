"""Control-group gates at fleet scale: one rollout of 10,000 devices whose canary (10 %) runs a
release 40 % slower than the other 9,000, with two hours of model metrics from every box.

Measures, in one run on this machine:
- ingest: telemetry windows merged into hourly rows (ModelMetricsHour) per second, through the
  real ingest code (ota.transport.ingest.Ingestor.process) on real telemetry payloads;
- the gate: seconds for wave_control_verdict (read every row of the hours since the wave began,
  merge per device and per group, test) and for a whole engine step (rollout_evaluate) that
  trips on it, against the engine's tick (ROLLOUT_TICK_SECONDS, 5 s by default);
- the floor in the same run: reading the same rows without any merging (the database's share),
  so the ratio says what the Python side costs over it;
- peak RSS of this process.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/modelfleet SECRET_KEY=x \\
        .venv/bin/python benchmarks/control_gates.py [--devices 10000] [--hours 2] [--no-write]

Uses a throw-away test database (test_<name> of DATABASE_URL). Writes
benchmarks/results/control_gates.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as pyplatform
import random
import resource
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "control_gates.json"


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--hours", type=int, default=2, help="hours of metrics per device")
    parser.add_argument("--windows-per-hour", type=int, default=2, help="telemetry windows merged into each hour")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from benchmarks._setup import canary_rollout, throwaway_database, throwaway_workdir

    throwaway_workdir("bench-gates-")
    with throwaway_database(postgresql_because="run it on PostgreSQL, as a fleet of this size would"):
        from django.db import connection

        from agent.metrics.aggregate import Window
        from agent.protocol import format_time, utcnow
        from ota.models import ModelMetricsHour
        from ota.rollouts.control_group import wave_control_verdict
        from ota.rollouts.engine import rollout_evaluate
        from ota.transport.ingest import Ingestor, Message

        n = args.devices
        canary = n // 10
        log(f"{n} devices, canary {canary}, {args.hours} h x {args.windows_per_hour} windows each")
        fleet = canary_rollout(devices=n, canary=canary, started_hours_ago=args.hours - 1, soak_seconds=0)
        sha, ids, rollout, wave = fleet.sha, fleet.ids, fleet.rollout, fleet.wave
        started = rollout.started_at

        # Telemetry, as agents send it: each window through the real ingest code.
        rng = random.Random(1)
        speed = {d: rng.lognormvariate(0, 0.1) for d in ids}
        log("building telemetry windows")
        payloads: list[list[Message]] = []
        for hour in range(args.hours):
            for _ in range(args.windows_per_hour):
                batch = []
                for i, d in enumerate(ids):
                    slow = 1.4 if i < canary else 1.0
                    w = Window()
                    for _ in range(60):
                        w.add("latency_ms", rng.lognormvariate(0, 0.2) * 10 * slow * speed[d], "timing")
                    w.add("requests", 60, "counter")
                    w.add("errors", rng.random() < 0.3, "counter")
                    w.add("output.person", 30, "counter")
                    w.add("output.car", 30, "counter")
                    entry = {"model": "detector", "release": sha["2.0" if i < canary else "1.0"], **w.to_json()}
                    body = {"_type": "telemetry", "device_id": d, "ts": format_time(utcnow()),
                            "model_metrics": {"models": [entry]}}
                    received = started + timedelta(hours=hour, minutes=5)
                    batch.append(Message(topic=f"fleet/devices/{d}/telemetry", payload=json.dumps(body).encode(),
                                         received_at=received))
                payloads.append(batch)
        ingestor = Ingestor()
        t0 = time.perf_counter()
        windows = 0
        for batch in payloads:
            for i in range(0, len(batch), 500):  # ingest's batch size
                ingestor.process(batch[i:i + 500])
                windows += len(batch[i:i + 500])
        ingest_seconds = time.perf_counter() - t0
        rows = ModelMetricsHour.objects.count()
        log(f"ingested {windows} windows into {rows} hourly rows in {ingest_seconds:.1f} s "
            f"({windows / ingest_seconds:.0f} windows/s)")

        # The floor: the same rows read, nothing merged.
        since = started.replace(minute=0, second=0, microsecond=0)
        t0 = time.perf_counter()
        count = sum(1 for _ in ModelMetricsHour.objects.filter(model="detector", hour__gte=since).values_list(
            "device_id", "release_sha256", "requests", "errors", "latency_ms", "outputs",
            "device__hardware_id", "device__labels").iterator(chunk_size=2000))
        read_seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        verdict = wave_control_verdict(rollout, wave)
        verdict_seconds = time.perf_counter() - t0
        log(f"verdict {verdict.state}: {verdict.summary}")
        t0 = time.perf_counter()
        outcome = rollout_evaluate(rollout_id=rollout.pk)
        evaluate_seconds = time.perf_counter() - t0
        tick = float(os.environ.get("ROLLOUT_TICK_SECONDS", 5))
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result = {
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "python": pyplatform.python_version(),
                        "database": f"PostgreSQL {connection.pg_version}"},
            "devices": n, "canary": canary, "control": n - canary, "hours": args.hours,
            "windows_ingested": windows, "hourly_rows": rows,
            "ingest_seconds": round(ingest_seconds, 2), "ingest_windows_per_second": round(windows / ingest_seconds),
            "rows_read": count, "read_rows_seconds": round(read_seconds, 3),
            "verdict_seconds": round(verdict_seconds, 3),
            "verdict_over_read": round(verdict_seconds / read_seconds, 2) if read_seconds else None,
            "evaluate_seconds": round(evaluate_seconds, 3), "evaluate_outcome": outcome,
            "tick_seconds": tick, "evaluate_share_of_tick": round(evaluate_seconds / tick, 3),
            "verdict": verdict.state, "figures": {k: verdict.figures.get(k) for k in ("new_devices", "control_devices",
                                                                                     "latency", "errors")},
            "peak_rss_mb": round(rss_mb, 1),
        }
        print(json.dumps(result, indent=2))
        log(f"gate verdict in {verdict_seconds:.2f} s (reading the rows alone: {read_seconds:.2f} s, "
            f"x{result['verdict_over_read']}); engine step {evaluate_seconds:.2f} s of a {tick:g} s tick; "
            f"peak RSS {rss_mb:.0f} MB")
        if not args.no_write:
            RESULTS.write_text(json.dumps(result, indent=2) + "\n")
            log(f"wrote {RESULTS.relative_to(ROOT)}")
        return 0 if outcome == "gate-tripped" else 1


if __name__ == "__main__":
    raise SystemExit(main())
