"""A stand-in for the application that runs the model on a box: it "serves" requests against
whatever release `models/<model>/current` points at and reports what it sees as StatsD lines,
as a real app with a StatsD client would. How each release behaves is given on the command line:

    python -m tests.support.statsd_app STATE_DIR MODEL PORT '{"<sha>": {"latency_ms": 40, "error_rate": 0.1}}'

A release not in the map serves at 10 ms with no errors. Runs until killed."""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import time


def main() -> None:
    state_dir, model, port, behaviours = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    link = os.path.join(state_dir, "models", model, "current")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rng = random.Random(7)
    while True:
        try:
            sha = os.path.basename(os.readlink(link))
        except OSError:
            time.sleep(0.05)  # nothing installed yet: nothing served
            continue
        behaviour = behaviours.get(sha, {})
        latency = behaviour.get("latency_ms", 10.0) * rng.uniform(0.9, 1.1)
        lines = [f"inference.latency_ms:{latency:.3f}|ms|#model:{model}", f"inference.requests:1|c|#model:{model}",
                 f"inference.output.{rng.choice(['person', 'car'])}:1|c|#model:{model}"]
        if rng.random() < behaviour.get("error_rate", 0.0):
            lines.append(f"inference.errors:1|c|#model:{model}")
        sock.sendto("\n".join(lines).encode(), ("127.0.0.1", port))
        time.sleep(0.005)


if __name__ == "__main__":
    main()
