"""Peak RSS of `fleetctl push` while it streams a large artifact (the client never holds the file).

Runs the real `fleetctl` console script against a minimal stand-in server (stdlib, in this
process) that answers the registry calls push makes and reads the multipart body in 1 MiB
chunks, discarding it. The client's peak RSS comes from the kernel (ru_maxrss of the finished
child), so nothing is sampled and nothing is missed. Also reports the upload throughput.

    .venv/bin/python benchmarks/fleetctl_upload_memory.py [--size-mb 200]

Writes benchmarks/results/fleetctl_upload_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "fleetctl_upload_memory.json"
FLEETCTL = Path(sys.executable).with_name("fleetctl")


class StandIn(BaseHTTPRequestHandler):
    received = 0

    def log_message(self, *args):  # keep the benchmark output to the figures
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._json(200, {"name": "bench"})

    def do_POST(self):
        remaining = int(self.headers.get("Content-Length", "0"))
        while remaining:
            chunk = self.rfile.read(min(remaining, 1024 * 1024))
            if not chunk:
                break
            remaining -= len(chunk)
            if self.path.endswith("/artifacts/"):
                StandIn.received += len(chunk)
        self._json(201, {})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    args = parser.parse_args()

    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "model.bin"
        with artifact.open("wb") as handle:
            block = os.urandom(1024 * 1024)
            for _ in range(args.size_mb):
                handle.write(block)
        env = {**os.environ, "FLEET_URL": f"http://127.0.0.1:{server.server_port}", "FLEET_TOKEN": "bench"}
        started = time.monotonic()
        result = subprocess.run(
            [str(FLEETCTL), "push", "--model", "bench", "--version", "1", "--format", "other",
             "--artifact", f"hw={artifact}", "-q"],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        elapsed = time.monotonic() - started
    server.shutdown()
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
        return 1
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    figures = {
        "benchmark": "fleetctl_upload_memory",
        "artifact_mb": args.size_mb,
        "bytes_received_by_server": StandIn.received,
        "fleetctl_peak_rss_mb": round(peak_kib / 1024, 1),
        "seconds": round(elapsed, 2),
        "throughput_mib_s": round(args.size_mb / elapsed, 1),
        "python": platform.python_version(),
        "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": f".venv/bin/python benchmarks/fleetctl_upload_memory.py --size-mb {args.size_mb}",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
