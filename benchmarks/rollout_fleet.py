"""A staged rollout to 1,000 simulated devices, end to end, with every real server process.

Starts a private Mosquitto with the deploy/ security config, `mqtt_ingest`, one Celery worker
and Celery beat (Redis), and `manage.py simulate_fleet --devices 1000` (real per-device
credentials, one MQTT connection per device, the agent's event sequence). Rolls a real signed
ONNX release through canary (5 named devices) → 10 % → 50 % → 100 %, success gate 100 %
committed, and measures:

- directives signed and published per second: per wave, from the moment its directives were
  issued (before signing) to the broker's last PUBACK (published_at), and once more for a single
  in-process batch of 1,000 (seq allocation + build + sign + bulk INSERT + commit + publish);
- events ingested per second: device events stored by ingest over the busiest wave and overall;
- seconds per wave (start → gate passed) and for the whole rollout;
- peak RSS (VmHWM) of each process: worker, beat, ingest, simulator, broker, this driver.

    make bench-rollout
    # or: DATABASE_URL=postgres://postgres@127.0.0.1:5432/modelfleet SECRET_KEY=x \\
    #         .venv/bin/python benchmarks/rollout_fleet.py [--devices 1000] [--redis redis://127.0.0.1:6379/4]

Uses a throw-away test database (test_<name> of DATABASE_URL, PostgreSQL) and the given Redis
db (a Celery queue of its own there, so it can share the db with test runs). Writes
benchmarks/results/rollout_fleet.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as pyplatform
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "rollout_fleet.json"

os.environ.setdefault("SECRET_KEY", "benchmark-only")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/modelfleet")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_until(predicate, timeout: float, what: str, plat) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.2)
    raise SystemExit(f"timed out after {timeout}s waiting for {what}\n{plat.logs()}")


def rate(count: int, first, last) -> float | None:
    if not count or first is None or last is None:
        return None
    span = (last - first).total_seconds()
    return round(count / span, 1) if span > 0 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--canary", type=int, default=5)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/4")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--no-write", action="store_true", help="print only; leave the results file alone")
    args = parser.parse_args()

    from benchmarks._setup import detector_releases, throwaway_database, throwaway_workdir

    workdir = throwaway_workdir("bench-rollout-", signing_keys=True)
    with throwaway_database(
        postgresql_because="the rollout benchmark needs PostgreSQL (several processes share the database)",
        plain_static_files=True, announce=log,
    ):
        from django.conf import settings
        from django.db import transaction
        from django.db.models import Max, Min

        broker = plat = None
        try:
            from ota.models import Device, DeviceEvent, Directive, Rollout, RolloutDevice
            from ota.rollouts.actions import rollout_start
            from ota.rollouts.create import rollout_create
            from ota.rollouts.directives import DirectiveRequest, directives_issue
            from registry.models import ModelVersion
            from tests.support.broker_auth import start_secure_broker
            from tests.support.platform import Platform, _vm_hwm_kb

            broker = start_secure_broker(workdir / "broker")
            broker.apply(settings)
            detector_releases()

            plat = Platform(workdir, broker=broker, redis_url=args.redis, tick_seconds=1,
                            extra_env={"LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING")})
            plat.__enter__()
            plat.start_ingest()
            plat.start_worker()
            plat.start_beat()
            log(f"enrolling and connecting {args.devices} simulated devices")
            t0 = time.monotonic()
            sim = plat._spawn("simulator", [
                sys.executable, "manage.py", "simulate_fleet", "--devices", str(args.devices), "--hardware", "rpi4",
                "--label", "site=bench", "--step-seconds", "0.05",
            ])
            wait_until(lambda: Device.objects.filter(online=True).count() >= args.devices, args.timeout,
                       "every simulated device to come online", plat)
            enroll_connect_seconds = round(time.monotonic() - t0, 1)
            log(f"{args.devices} devices online after {enroll_connect_seconds}s")

            devices = sorted(Device.objects.values_list("id", flat=True))
            rollout = rollout_create(
                model="detector", version="2.0", target={"labels": {"site": "bench"}},
                waves=[{"devices": devices[: args.canary]}, {"percent": 10}, {"percent": 50}, {"percent": 100}],
                gates={"success": {"min_healthy_percent": 100},
                       "failure": {"min_reports": 5, "max_failed_percent": 5},
                       "timeouts": {"download_seconds": 600, "activate_seconds": 600, "trial_seconds": 600}},
                abort_policy="pause", actor="benchmark",
            )
            log(f"rollout {rollout.pk}: waves {[w.size for w in rollout.waves.all()]}")
            started = time.monotonic()
            rollout_start(rollout_id=rollout.pk, actor="benchmark")
            wait_until(lambda: Rollout.objects.get(pk=rollout.pk).state in ("completed", "paused", "aborted"),
                       args.timeout, "the rollout to finish", plat)
            rollout_seconds = round(time.monotonic() - started, 1)
            rollout.refresh_from_db()
            if rollout.state != "completed":
                raise SystemExit(f"rollout ended {rollout.state}: {rollout.state_reason}\n{plat.logs()}")
            log(f"rollout completed in {rollout_seconds}s")

            waves = []
            for wave in rollout.waves.order_by("index"):
                ids = list(RolloutDevice.objects.filter(wave=wave).values_list("device_id", flat=True))
                d = Directive.objects.filter(rollout=rollout, device_id__in=ids).aggregate(
                    first=Min("created_at"), last=Max("published_at"))
                ev = DeviceEvent.objects.filter(rollout_id=str(rollout.pk), device_id__in=ids)
                e = ev.aggregate(first=Min("received_at"), last=Max("received_at"))
                n_events = ev.count()
                waves.append({
                    "index": wave.index, "spec": {k: v for k, v in wave.spec.items() if k in ("percent", "count")}
                    or {"devices": len(wave.spec.get("devices", []))},
                    "devices": wave.size,
                    "seconds": round((wave.finished_at - wave.started_at).total_seconds(), 2),
                    "fanout_seconds": round((d["last"] - d["first"]).total_seconds(), 3) if d["first"] else None,
                    "directives_per_second": rate(wave.size, d["first"], d["last"]),
                    "events": n_events,
                    "events_per_second": rate(n_events, e["first"], e["last"]),
                })
            all_events = DeviceEvent.objects.filter(rollout_id=str(rollout.pk))
            agg = all_events.aggregate(first=Min("received_at"), last=Max("received_at"))

            # One batch of every device, in-process: the raw sign + record + publish path.
            v2 = ModelVersion.objects.select_related("model").get(version="2.0")
            hw = dict(Device.objects.values_list("id", "hardware_id"))
            t = time.perf_counter()
            with transaction.atomic():
                issued = directives_issue(
                    requests=[DirectiveRequest(device_id=d, hardware=hw[d], version=v2) for d in devices],
                    rollout_id=None, kind=Directive.Kind.UPDATE)
            batch_seconds = time.perf_counter() - t
            assert Directive.objects.filter(pk__in=[x.pk for x in issued.values()], published_at__isnull=True).count() == 0
            log(f"in-process batch: {len(issued)} directives signed+published in {batch_seconds:.2f}s")

            rss = {name: round(kb / 1024, 1) for name, kb in plat.peak_rss_kb().items()}
            rss["mosquitto"] = round(_vm_hwm_kb(broker.broker.process.pid) / 1024, 1)
            rss["benchmark driver (also the API client)"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            sim_alive = sim.alive()
            busiest = max(waves, key=lambda w: w["devices"])
            result = {
                "benchmark": "rollout_fleet",
                "command": "make bench-rollout  (.venv/bin/python benchmarks/rollout_fleet.py)",
                "measured_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "machine": {"cpus": os.cpu_count(), "python": pyplatform.python_version(),
                            "platform": pyplatform.platform()},
                "setup": {"devices": args.devices, "waves": "canary(5) -> 10% -> 50% -> 100%",
                          "processes": "1 celery worker (-P solo), celery beat (1 s tick), 1 mqtt_ingest, "
                                       "1 simulate_fleet, mosquitto (dynamic security)",
                          "simulator_step_seconds": 0.05, "success_gate": "100% committed"},
                "enroll_and_connect_seconds": enroll_connect_seconds,
                "rollout_seconds": rollout_seconds,
                "waves": waves,
                "directives_per_second": {
                    "busiest_wave": busiest["directives_per_second"],
                    "single_batch_in_process": round(len(issued) / batch_seconds, 1),
                    "single_batch_devices": len(issued),
                },
                "events_ingested_per_second": {
                    "busiest_wave": busiest["events_per_second"],
                    "whole_rollout_average": rate(all_events.count(), agg["first"], agg["last"]),
                    "events": all_events.count(),
                },
                "peak_rss_mb": rss,
                "simulator_still_running": sim_alive,
            }
            print(json.dumps(result, indent=2))
            if not args.no_write:
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(result, indent=2) + "\n")
                log(f"wrote {RESULTS.relative_to(ROOT)}")
            return 0
        finally:
            if plat is not None:
                plat.stop_all()
            if broker is not None:
                broker.stop()


if __name__ == "__main__":
    sys.exit(main())
