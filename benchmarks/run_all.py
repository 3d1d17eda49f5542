"""Run every benchmark in turn (`make bench`); each prints its figures and writes its own file
under benchmarks/results/. A failing benchmark is reported and the others still run."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    "upload_memory.py",
    "fleetctl_upload_memory.py",
    "agent_footprint.py",
    "deltas.py",
    "device_list.py",
    "device_lists.py",
    "control_gates.py",
    "web_model_health.py",
    "rollout_fleet.py",
    "chaos.py",
]


def main() -> int:
    # Parsed so that `--help` (or a typo) explains instead of starting every benchmark.
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("only", nargs="*", metavar="BENCHMARK",
                        help=f"run only these (default: all of {', '.join(BENCHMARKS)})")
    chosen = parser.parse_args().only or BENCHMARKS
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        parser.error(f"no such benchmark: {', '.join(unknown)} (choose from {', '.join(BENCHMARKS)})")
    env = {
        "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/modelfleet",
        "SECRET_KEY": "benchmark-only",
        **os.environ,
    }
    failed = []
    for script in chosen:
        print(f"==> {script}", flush=True)
        started = time.monotonic()
        result = subprocess.run([sys.executable, str(HERE / script)], env=env, cwd=HERE.parent)
        print(f"<== {script}: exit {result.returncode} after {time.monotonic() - started:.0f} s", flush=True)
        if result.returncode:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
