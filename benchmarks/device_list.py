"""Server time to render the web admin's device list with 10,000 devices in the database, and
the rollout page's polled live panel for a rollout over all of them.

Creates a throw-away test database (Django's test-database machinery, on whatever DATABASE_URL
names: PostgreSQL in CI and `make bench`), fills it with bulk_create: devices spread over three
hardware ids, two or three labels each, a model state per device (active version of one of
several releases) and some offline. Then renders, through the real URL, middleware, view and
template (Django test client, signed-in viewer), the first page unfiltered and a few filtered
pages, each --runs times after a warm-up, and reports the median and worst in milliseconds.
It also releases a version through the API (real ONNX artifacts, signed with throw-away keys), creates a rollout over every device
through ota.rollouts.create.rollout_create, spreads the assignments over the update states, and times
the live panel the rollout page fetches every 2 s.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/modelfleet SECRET_KEY=x \\
        .venv/bin/python benchmarks/device_list.py [--devices 10000] [--runs 15]

Writes benchmarks/results/device_list.json. Target: first page < 300 ms (median).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "device_list.json"
TARGET_MS = 300

os.environ.setdefault("SECRET_KEY", "benchmark-only")


def fill(n_devices: int) -> dict:
    from django.contrib.auth.models import Group, User

    from ota.models import Device, DeviceModelState
    from registry.models import HardwareTarget, Model, ModelVersion

    hardware = [
        HardwareTarget.objects.create(id=h, max_artifact_bytes=10**9) for h in ("jetson-orin", "rpi5", "x86-cpu")
    ]
    model = Model.objects.create(name="detector")
    versions = [
        ModelVersion.objects.create(model=model, version=f"1.{i}.0", counter=i + 1, state="released")
        for i in range(4)
    ]
    sites = ["berlin", "paris", "tokyo", "austin", "lagos"]
    devices = []
    for i in range(n_devices):
        labels = {"site": sites[i % len(sites)], "line": str(i % 7)}
        if i % 3 == 0:
            labels["camera"] = "front"
        devices.append(
            Device(
                id=f"dev-{i:06d}", name=f"box {i}", hardware=hardware[i % 3], labels=labels,
                mqtt_username=f"dev-{i:06d}", online=i % 10 != 0, agent_version="0.1.0",
            )
        )
    Device.objects.bulk_create(devices, batch_size=2000)
    DeviceModelState.objects.bulk_create(
        [
            DeviceModelState(device=d, model=model, active_version=versions[i % 4], active_sha256=f"{i % 4:064x}",
                             last_state="committed")
            for i, d in enumerate(devices)
        ],
        batch_size=2000,
    )
    viewer = User.objects.create_user("bench-viewer", password="x")
    viewer.groups.add(Group.objects.create(name="viewer"))
    return {"viewer": viewer, "versions": versions}


def make_rollout() -> int:
    """A release signed with throw-away keys and a rollout over every device, part-way through."""
    from benchmarks._setup import admin_client
    from ota.models import Rollout, RolloutDevice
    from ota.rollouts.create import rollout_create
    from registry.models import HardwareTarget
    from tests.support.rollout_data import health_for, release

    # Released through the API with a real ONNX artifact per hardware: a release is checked as
    # devices will check it (registry.release_check runs the precheck on each file).
    client, token = admin_client()
    release(client, token, "detector", "2.0.0", hardware=tuple(HardwareTarget.objects.values_list("id", flat=True)),
            health=health_for(2.0, 1.0))
    rollout = rollout_create(
        model="detector", version="2.0.0", target={"hardware": ["jetson-orin", "rpi5", "x86-cpu"]},
        waves=[{"name": "canary", "count": 10}, {"percent": 10}, {"percent": 50}, {"percent": 100}], actor="bench",
    )
    Rollout.objects.filter(pk=rollout.pk).update(state="running", current_wave=2)
    ids = list(RolloutDevice.objects.filter(rollout=rollout).order_by("rank").values_list("pk", flat=True))
    spread = ["committed"] * 6 + ["trial", "downloading", "failed", "planned"]
    for i, state in enumerate(spread):
        RolloutDevice.objects.filter(pk__in=ids[i::len(spread)]).update(
            state=state, error_code="PRECHECK_FAILED" if state == "failed" else ""
        )
    return rollout.pk


def measure(client, url: str, runs: int) -> dict:
    client.get(url)  # warm-up: first query plans, template compilation
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        response = client.get(url)
        samples.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, (url, response.status_code)
    return {
        "url": url,
        "median_ms": round(statistics.median(samples), 1),
        "max_ms": round(max(samples), 1),
        "min_ms": round(min(samples), 1),
        "bytes": len(response.content),
        "rows": response.content.count(b'<a href="/devices/dev-'),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()

    from benchmarks._setup import throwaway_database, throwaway_workdir

    throwaway_workdir("bench-device-list-", signing_keys=True)  # artifacts and keys of the release it makes
    with throwaway_database(plain_static_files=True, test_environment=True):
        from django.db import connection
        from django.test import Client
        from django.test.utils import CaptureQueriesContext

        started = time.perf_counter()
        data = fill(args.devices)
        fill_seconds = time.perf_counter() - started
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute("ANALYZE")
        client = Client()
        client.force_login(data["viewer"])
        pages = {
            "first_page": "/devices/",
            "page_100": "/devices/?page=100",
            "label_filter": "/devices/?labels=site%3Dberlin%2C+camera%3Dfront",
            "version_filter": "/devices/?version=detector%401.2.0",
            "offline_on_hardware": "/devices/?online=no&hardware=rpi5",
            "search": "/devices/?q=00042",
        }
        results = {name: measure(client, url, args.runs) for name, url in pages.items()}
        rollout_id = make_rollout()
        results["rollout_live_panel"] = measure(client, f"/rollouts/{rollout_id}/live/", args.runs)
        with CaptureQueriesContext(connection) as queries:
            client.get("/devices/")
        query_count = len(queries.captured_queries)

    first = results["first_page"]["median_ms"]
    report = {
        "benchmark": "device_list",
        "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "database": connection.vendor,
        "devices": args.devices,
        "runs": args.runs,
        "fill_seconds": round(fill_seconds, 1),
        "queries_first_page": query_count,
        "target_first_page_ms": TARGET_MS,
        "first_page_median_ms": first,
        "meets_target": first < TARGET_MS,
        "pages": results,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:22s} median {r['median_ms']:7.1f} ms  max {r['max_ms']:7.1f} ms  rows {r['rows']:3d}  {r['url']}")
    print(f"first page: {first} ms median with {args.devices} devices, {query_count} queries "
          f"(target < {TARGET_MS} ms: {'met' if first < TARGET_MS else 'MISSED'}); wrote {RESULTS.relative_to(ROOT)}")
    return 0 if first < TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
