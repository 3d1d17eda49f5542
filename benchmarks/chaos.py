"""The chaos storm, longer and bigger than tests/test_chaos.py: a staged rollout to a simulated
fleet (default 500 devices, real per-device MQTT connections and credentials) while the Celery
worker, Celery beat, mqtt_ingest, Redis and Mosquitto (persisting as `make run` configures it)
are each killed with SIGKILL and restarted, in turn, round after round until the rollout is done.

In the same run, on the same fleet and processes, the same rollout plan without any kill is the
baseline (the limit this machine sets right now), so the figure to read is the ratio. Checks:
the rollout completes; no device was signed two directives for one wave; no device's event
numbers have a hole (an event lost); every assignment committed.

    make bench-chaos
    # or: DATABASE_URL=postgres://postgres@127.0.0.1:5432/modelfleet SECRET_KEY=x \\
    #         .venv/bin/python benchmarks/chaos.py [--devices 500] [--rounds 3]

Writes benchmarks/results/chaos.json. Needs PostgreSQL (a throw-away test database), mosquitto
and redis-server binaries (scripts/bootstrap.sh installs them); it starts its own broker and Redis.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as pyplatform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "chaos.json"

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3, help="most rounds of kills (each process once per round)")
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--no-write", action="store_true", help="print only; leave the results file alone")
    args = parser.parse_args()

    from benchmarks._setup import detector_releases, throwaway_database, throwaway_workdir

    workdir = throwaway_workdir("bench-chaos-", signing_keys=True)
    with throwaway_database(
        postgresql_because="the chaos benchmark needs PostgreSQL (several processes share the database)",
        plain_static_files=True, announce=log,
    ):
        from django.conf import settings

        broker = redis = plat = None
        try:
            from ota.models import Device, DeviceEvent, Rollout, RolloutDevice
            from ota.rollouts.actions import rollout_start
            from ota.rollouts.create import rollout_create
            from tests.support.broker_auth import start_secure_broker
            from tests.support.chaos import Storm, directives_per_wave, event_gaps, events_missing
            from tests.support.platform import Platform
            from tests.support.redis_server import RedisServer

            broker = start_secure_broker(workdir / "broker", persistent=True)
            broker.apply(settings)
            redis = RedisServer(workdir / "redis").start()
            detector_releases()

            plat = Platform(workdir, broker=broker, redis_url=redis.url, tick_seconds=1,
                            extra_env={"LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING")})
            plat.__enter__()
            storm = Storm(platform=plat, broker=broker, redis=redis)
            storm.start_server()
            log(f"enrolling and connecting {args.devices} simulated devices")
            plat._spawn("simulator", [
                sys.executable, "manage.py", "simulate_fleet", "--devices", str(args.devices), "--hardware", "rpi4",
                "--label", "site=bench", "--step-seconds", "0.2",
            ])
            wait_until(lambda: Device.objects.filter(online=True).count() >= args.devices, args.timeout,
                       "every simulated device to come online", plat)

            def rollout(version: str, *, chaos: bool) -> dict:
                r = rollout_create(
                    model="detector", version=version, target={"labels": {"site": "bench"}},
                    waves=[{"percent": 10}, {"percent": 50}, {"percent": 100}],
                    gates={"success": {"min_healthy_percent": 100}, "soak_seconds": 5,
                           "failure": {"min_reports": 5, "max_failed_percent": 5},
                           "timeouts": {"download_seconds": 900, "activate_seconds": 900, "trial_seconds": 900}},
                    abort_policy="pause", actor="benchmark")
                running = lambda: Rollout.objects.get(pk=r.pk).state == "running"  # noqa: E731
                rollout_start(rollout_id=r.pk, actor="benchmark")
                kills = storm.run(rounds=args.rounds, while_=running, stop_early=True) if chaos else []
                wait_until(lambda: not running(), args.timeout, f"rollout of {version} to finish", plat)
                r.refresh_from_db()
                states = dict(RolloutDevice.objects.filter(rollout=r).values_list("device_id", "state"))
                twice = sum(1 for seqs in directives_per_wave(r.pk).values() if len(seqs) != 1)
                result = {
                    "version": version, "state": r.state, "reason": r.state_reason,
                    # From the database: the storm's last round may go on after the rollout finished.
                    "seconds": round((r.finished_at - r.started_at).total_seconds(), 1),
                    "devices": len(states),
                    "committed": sum(s == "committed" for s in states.values()),
                    "devices_signed_two_directives_for_one_wave": twice,
                    "events_stored": DeviceEvent.objects.filter(rollout_id=str(r.pk)).count(),
                    "updates_missing_events": events_missing(r.pk),
                }
                # What the database holds for those devices, to tell where an event went missing.
                result["missing_detail"] = {
                    d: {"assignment": RolloutDevice.objects.filter(rollout=r, device_id=d).values(
                            "state", "seq", "detail", "finished_at").first(),
                        "events": list(DeviceEvent.objects.filter(device_id=d).order_by("event_no").values_list(
                            "event_no", "seq", "state", "received_at"))}
                    for d in list(result["updates_missing_events"])[:5]}
                if chaos:
                    result["kills"] = kills
                    result["kills_mid_rollout"] = sum(1 for k in kills if k["mid_rollout"])
                log(json.dumps(result))
                return result

            baseline = rollout("1.0", chaos=False)
            chaos = rollout("2.0", chaos=True)
            gaps = event_gaps(Device.objects.values_list("id", flat=True))
            ok = (chaos["state"] == "completed" and chaos["committed"] == chaos["devices"]
                  and chaos["devices_signed_two_directives_for_one_wave"] == 0 and not gaps
                  and not chaos["updates_missing_events"])
            result = {
                "benchmark": "chaos",
                "command": "make bench-chaos  (.venv/bin/python benchmarks/chaos.py)",
                "measured_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "machine": {"cpus": os.cpu_count(), "python": pyplatform.python_version(),
                            "platform": pyplatform.platform()},
                "setup": {"devices": args.devices, "waves": "10% -> 50% -> 100%, 5 s soak",
                          "storm": f"worker, beat, ingest, redis, broker SIGKILLed in turn, {storm.down_seconds} s "
                                   f"down each, {storm.between_seconds} s apart, up to {args.rounds} rounds",
                          "processes": "1 celery worker (-P solo), celery beat (1 s tick), 1 mqtt_ingest, "
                                       "1 simulate_fleet, mosquitto (dynamic security, persistence), redis"},
                "baseline_without_kills": baseline,
                "with_kills": chaos,
                "slowdown_ratio": round(chaos["seconds"] / baseline["seconds"], 2) if baseline["seconds"] else None,
                "devices_with_lost_events": len(gaps),
                "lost_events": sum(map(len, gaps.values())),
                "passed": ok,
            }
            print(json.dumps(result, indent=2))
            if not args.no_write:
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(result, indent=2) + "\n")
                log(f"wrote {RESULTS.relative_to(ROOT)}")
            return 0 if ok else 1
        finally:
            if plat is not None:
                plat.stop_all()
            if broker is not None:
                broker.stop()
            if redis is not None:
                redis.stop()


if __name__ == "__main__":
    sys.exit(main())
