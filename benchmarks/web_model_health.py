"""The web pages' model health figures at fleet scale: a rollout of 10,000 devices whose canary
wave (1,000) is soaking, not judged yet, with two hours of model metrics from every box; and one
device with a week of hourly rows.

Measures, through Django's test client (the whole view, template and middleware):
- the rollout page's live fragment (what htmx polls every 2 s) with the control-group verdict
  computed (cold cache), then served from the cache (warm), and how long the verdict stays cached;
- the same fragment's cost without the verdict (a wave the gate is switched off for), the floor;
- the device page with 168 hourly rows (its latency and traffic charts, the hourly table).

The hourly rows are written with bulk_create in the form ingest stores (agent.metrics windows'
JSON), not through ingest: benchmarks/control_gates.py measures ingest.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/modelfleet SECRET_KEY=x \\
        .venv/bin/python benchmarks/web_model_health.py [--devices 10000] [--no-write]

Uses a throw-away test database (test_<name> of DATABASE_URL). Writes
benchmarks/results/web_model_health.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as pyplatform
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "web_model_health.json"


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--hours", type=int, default=2, help="hours of metrics per device")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from benchmarks._setup import canary_rollout, throwaway_database, throwaway_workdir

    throwaway_workdir("bench-web-health-")
    with throwaway_database(postgresql_because="run it on PostgreSQL, as a fleet of this size would",
                            test_environment=True):
        from django.contrib.auth.models import Group, User
        from django.core.cache import cache
        from django.db import connection
        from django.test import Client

        from agent.metrics.aggregate import Window
        from ota.models import ActiveRelease, ModelMetricsHour, Wave
        from registry.models import AuditEntry
        from web.rollouts import model_health

        n, hours = args.devices, args.hours
        canary = n // 10
        log(f"{n} devices, canary {canary}, {hours} h of metrics each; one device with 168 h")
        fleet = canary_rollout(devices=n, canary=canary, started_hours_ago=hours - 1, soak_seconds=86400,
                               online=True)
        model, versions, sha, ids = fleet.model, fleet.versions, fleet.sha, fleet.ids
        rollout, wave, gates = fleet.rollout, fleet.wave, fleet.gates
        started = rollout.started_at
        now = started + timedelta(hours=hours - 1)  # the moment canary_rollout counted back from

        rng = random.Random(1)
        log("building hourly rows")

        def hour_row(device_id: str, v: str, hour, slow: float, speed: float) -> ModelMetricsHour:
            w = Window()
            for _ in range(120):
                w.add("latency_ms", rng.lognormvariate(0, 0.2) * 10 * slow * speed, "timing")
            w.add("requests", 120, "counter")
            w.add("errors", rng.random() < 0.5, "counter")
            w.add("output.person", 60, "counter")
            w.add("output.car", 60, "counter")
            j = w.to_json()
            return ModelMetricsHour(device_id=device_id, model="detector", release_sha256=sha[v], hour=hour,
                                    requests=j["requests"], errors=j["errors"], latency_ms=j["latency_ms"],
                                    outputs=j["outputs"], windows=2)

        rows = []
        for h in range(hours):
            hour = (started + timedelta(hours=h)).replace(minute=0, second=0, microsecond=0)
            for i, d in enumerate(ids):
                v = "2.0" if i < canary else "1.0"
                rows.append(hour_row(d, v, hour, 1.4 if i < canary else 1.0, 1.0 + (i % 7) / 70))
        # One device with a week of hours: 1.0 for 100 h, then 2.0 (its release change).
        this_hour = now.replace(minute=0, second=0, microsecond=0)
        week_device = ids[-1]
        ModelMetricsHour.objects.filter(device_id=week_device).delete()
        rows = [r for r in rows if r.device_id != week_device]
        for h in range(168):
            hour = this_hour - timedelta(hours=167 - h)
            v = "1.0" if h < 100 else "2.0"
            rows.append(hour_row(week_device, v, hour, 1.0 if v == "1.0" else 1.4, 1.0))
        ActiveRelease.objects.create(device_id=week_device, model=model, version=versions["2.0"],
                                     sha256=sha["2.0"], from_time=this_hour - timedelta(hours=67, minutes=30))
        ModelMetricsHour.objects.bulk_create(rows, batch_size=2000)
        log(f"{ModelMetricsHour.objects.count()} hourly rows")

        user = User.objects.create_user("bench-viewer")
        user.groups.add(Group.objects.get_or_create(name="viewer")[0])
        client = Client()
        client.force_login(user)
        live_url = f"/rollouts/{rollout.pk}/live/"

        def get(url):
            response = client.get(url)
            assert response.status_code == 200, (url, response.status_code)
            return response

        audit_before = AuditEntry.objects.count()
        cache.clear()
        t0 = time.perf_counter()
        html = get(live_url).content.decode()
        cold = time.perf_counter() - t0
        assert 'data-control="live" data-verdict="fail"' in html, "a 40 % slower canary fails"
        key = next(k for k in cache._cache if "control-verdict" in k)  # LocMemCache: the stored key
        ttl = round(cache._expire_info[key] - time.time())
        warm = timed(lambda: get(live_url), 10)
        assert AuditEntry.objects.count() == audit_before, "viewing the page must not write"

        Wave.objects.filter(pk=wave.pk).update(gates={**gates, "health": {"control": False}})
        cache.clear()
        floor = timed(lambda: get(live_url), 10)
        device = timed(lambda: get(f"/devices/{week_device}/"), 10)
        page = get(f"/devices/{week_device}/").content.decode()
        assert "▶ 2.0" in page

        t0 = time.perf_counter()
        from ota.rollouts.control_group import wave_control_verdict

        Wave.objects.filter(pk=wave.pk).update(gates=gates)
        wave.refresh_from_db()
        wave_control_verdict(rollout, wave)
        verdict_alone = time.perf_counter() - t0

        result = {
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "python": pyplatform.python_version(),
                        "database": f"PostgreSQL {connection.pg_version}"},
            "devices": n, "canary": canary, "hours": hours, "hourly_rows": len(rows),
            "live_fragment_cold_seconds": round(cold, 3),
            "verdict_alone_seconds": round(verdict_alone, 3),
            "verdict_cached_for_seconds": ttl,
            "cache_floor_seconds": model_health.LIVE_SECONDS, "cost_factor": model_health.COST_FACTOR,
            "live_fragment_warm_median_seconds": round(statistics.median(warm), 4),
            "live_fragment_without_gate_median_seconds": round(statistics.median(floor), 4),
            "device_page_168_hours_median_seconds": round(statistics.median(device), 4),
            "polls_per_verdict_at_2s": round(ttl / 2),
        }
        print(json.dumps(result, indent=2))
        log(f"live fragment: cold {cold:.2f} s (verdict {verdict_alone:.2f} s), cached {ttl} s, warm "
            f"{statistics.median(warm) * 1000:.0f} ms "
            f"(without the gate {statistics.median(floor) * 1000:.0f} ms); "
            f"device page with 168 h {statistics.median(device) * 1000:.0f} ms")
        if not args.no_write:
            RESULTS.write_text(json.dumps(result, indent=2) + "\n")
            log(f"wrote {RESULTS.relative_to(ROOT)}")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
