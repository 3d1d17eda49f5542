"""Device agent footprint: idle RSS and CPU of a real `fleet-agent run`, and download-and-verify
throughput compared with `curl -s URL | sha256sum` in the same run.

1. Idle: a private Mosquitto, a real agent with one model installed and committed through a
   signed directive (so it idles as on a box: connected, journal loaded, telemetry on its
   default 60 s interval). RSS is sampled every second for --idle-seconds; CPU is the process's
   own user+system time over the window. The model runtime (onnxruntime) must not be loaded in
   the daemon: the benchmark checks /proc/<pid>/maps for it.
2. Throughput: a --size-mb artifact served over loopback by a sendfile HTTP server in its own
   process. The agent side is agent.download.fetch (the daemon's code: Range-capable client,
   hashing while streaming, writing staging/<sha>.part, fsync) plus the sha256 comparison,
   timed in a child process. The reference is `curl -s URL | sha256sum`. Each is run --runs
   times, alternating; the best run of each is compared.

    .venv/bin/python benchmarks/agent_footprint.py [--idle-seconds 60] [--size-mb 500] [--runs 3]

Writes benchmarks/results/agent_footprint.json. Targets: idle RSS <= 40 MB, idle CPU < 1 %,
throughput >= 0.8 x curl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from hashlib import sha256
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "agent_footprint.json"

from tests.support.agent_harness import (  # noqa: E402
    Artifact,
    ArtifactServer,
    Keys,
    Rig,
    Subscriber,
    linear_contract,
    release_envelope,
    wait_for,
)
from tests.support.mosquitto import Mosquitto  # noqa: E402
from tests.support.onnx_models import linear_model  # noqa: E402

SERVER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from tests.support.agent_harness import ArtifactServer
server = ArtifactServer().start()
server.add("/artifact", Path(sys.argv[1]))
print(server.url("/artifact"), flush=True)
sys.stdin.read()
"""

FETCH = """
import json, sys, time
from pathlib import Path
from agent.download import fetch
url, part, length, expected = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
t0 = time.perf_counter()
result = fetch(url, part, length=length, token="bench")
ok = result.sha256 == expected and result.length == length
print(json.dumps({"seconds": time.perf_counter() - t0, "ok": ok}))
"""


def measure_idle(tmp: Path, seconds: int) -> dict:
    broker = Mosquitto(tmp / "broker").start()
    server = ArtifactServer().start()
    subscriber = Subscriber(broker.port).start()
    rig = Rig(broker=broker, server=server, keys=Keys.generate(), subscriber=subscriber, tmp=tmp)
    try:
        model = Artifact(linear_model(scale=3.0, bias=0.5, padding_bytes=1_000_000))
        release = release_envelope(rig.keys, model="detector", version="1", counter=1, artifacts=[model.entry()],
                                   health=linear_contract(scale=3.0, bias=0.5))
        rig.config("bench-dev", update={"trial_seconds": 1, "health_interval_seconds": 1},
                   telemetry_interval=60, mqtt={"keepalive": 30})
        # log at INFO like production (the harness default is DEBUG)
        cfg_path = tmp / "bench-dev" / "agent.toml"
        cfg_path.write_text(cfg_path.read_text().replace('log_level = "DEBUG"', 'log_level = "INFO"'))
        agent = rig.agent("bench-dev").start()
        rig.publish_directive("bench-dev", rig.directive("bench-dev", 1, "detector", release, model))
        outcome = rig.subscriber.wait_outcome("bench-dev", 1, timeout=120, agent=agent)
        assert outcome["state"] == "committed", outcome
        time.sleep(2)  # let the commit's clean-up and publishes settle
        proc = psutil.Process(agent.pid)
        maps = Path(f"/proc/{agent.pid}/maps").read_text()
        runtime_loaded = "onnxruntime" in maps
        cpu0 = proc.cpu_times()
        t0 = time.monotonic()
        samples = []
        while time.monotonic() - t0 < seconds:
            samples.append(proc.memory_info().rss)
            time.sleep(1)
        cpu1 = proc.cpu_times()
        elapsed = time.monotonic() - t0
        cpu_seconds = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        agent.stop()
        return {
            "idle_seconds": round(elapsed, 1),
            "idle_rss_mb_max": round(max(samples) / 2**20, 1),
            "idle_rss_mb_mean": round(sum(samples) / len(samples) / 2**20, 1),
            "idle_cpu_percent": round(100 * cpu_seconds / elapsed, 3),
            "onnxruntime_in_daemon": runtime_loaded,
        }
    finally:
        rig.close()
        subscriber.stop()
        server.stop()
        broker.stop()


def make_artifact(path: Path, size_mb: int) -> tuple[int, str]:
    hasher = sha256()
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(size_mb):
            chunk = block[i % 997 :] + block[: i % 997]  # distinct blocks, cheap to make
            f.write(chunk)
            hasher.update(chunk)
    return size_mb << 20, hasher.hexdigest()


def measure_throughput(tmp: Path, size_mb: int, runs: int) -> dict:
    artifact = tmp / "artifact.bin"
    length, digest = make_artifact(artifact, size_mb)
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(artifact), str(ROOT)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    url = server.stdout.readline().strip()
    curl_times, agent_times = [], []
    try:
        for _ in range(runs):
            t0 = time.perf_counter()
            out = subprocess.run(["bash", "-o", "pipefail", "-c", f"curl -s {url} | sha256sum"], capture_output=True,
                                 text=True, check=True).stdout
            curl_times.append(time.perf_counter() - t0)
            assert out.split()[0] == digest, "curl pipeline got different bytes"

            part = tmp / "staging.part"
            part.unlink(missing_ok=True)
            res = subprocess.run([sys.executable, "-c", FETCH, url, str(part), str(length), digest], capture_output=True,
                                 text=True, check=True, cwd=ROOT)
            answer = json.loads(res.stdout)
            assert answer["ok"], "agent download did not verify"
            agent_times.append(answer["seconds"])
            part.unlink(missing_ok=True)
    finally:
        server.stdin.close()
        server.wait(10)
        artifact.unlink(missing_ok=True)
    best_curl, best_agent = min(curl_times), min(agent_times)
    mib = length / 2**20
    return {
        "artifact_mb": size_mb,
        "runs": runs,
        "curl_sha256sum_seconds": [round(t, 3) for t in curl_times],
        "agent_download_verify_seconds": [round(t, 3) for t in agent_times],
        "curl_mib_s": round(mib / best_curl, 1),
        "agent_mib_s": round(mib / best_agent, 1),
        "throughput_ratio_vs_curl": round(best_curl / best_agent, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle-seconds", type=int, default=60)
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp:
        idle = measure_idle(Path(tmp) / "idle", args.idle_seconds)
        print(json.dumps(idle, indent=2))
        throughput = measure_throughput(Path(tmp), args.size_mb, args.runs)
        print(json.dumps(throughput, indent=2))
    result = {
        "benchmark": "agent_footprint",
        **idle,
        **throughput,
        "targets": {"idle_rss_mb_max": 40, "idle_cpu_percent": 1.0, "throughput_ratio_vs_curl": 0.8},
        "meets_targets": idle["idle_rss_mb_max"] <= 40 and idle["idle_cpu_percent"] < 1.0
        and not idle["onnxruntime_in_daemon"] and throughput["throughput_ratio_vs_curl"] >= 0.8,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": f".venv/bin/python benchmarks/agent_footprint.py --idle-seconds {args.idle_seconds} "
        f"--size-mb {args.size_mb} --runs {args.runs}",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}: meets targets = {result['meets_targets']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
