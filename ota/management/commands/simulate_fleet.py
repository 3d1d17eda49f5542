"""`manage.py simulate_fleet --devices N [--behaviour healthy|fail-precheck|fail-trial|slow|flapping]
[--telemetry-seconds S --metrics-requests N --model-behaviour SHA:slower=1.4,...]`"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from ota.fleet.parsing import parse_label_pairs
from ota.sim.enroll import enroll_simulated_devices, load_credentials, save_credentials
from ota.sim.fleet import BEHAVIOURS, FleetSimulator
from registry.errors import ApiError
from registry.models import HardwareTarget


def parse_model_behaviour(text: str) -> tuple[str, dict]:
    """'<sha256>:slower=1.4,error_rate=0.05,person=0.8,car=0.2' -> (sha, behaviour)."""
    sha, sep, rest = text.partition(":")
    if not sep or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ValueError(f"{text[:80]!r} must start with a release's 64-hex sha256 and a colon")
    behaviour: dict = {}
    outputs: dict[str, float] = {}
    for pair in filter(None, rest.split(",")):
        key, eq, value = pair.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not eq or not key or number < 0:
            raise ValueError(f"{pair!r} must be key=number (>= 0)")
        if key in ("slower", "error_rate"):
            behaviour[key] = number
        else:
            outputs[key] = number
    if outputs:
        behaviour["outputs"] = outputs
    return sha, behaviour


class Command(BaseCommand):
    help = "Run N simulated devices over real MQTT with real per-device credentials (enrolled through the API logic)."

    def add_arguments(self, parser):
        parser.add_argument("--devices", type=int, required=True, help="how many simulated devices")
        parser.add_argument("--behaviour", default="healthy", choices=BEHAVIOURS)
        parser.add_argument("--enroll-token", default=None, help="enroll with this token (default: make one)")
        parser.add_argument("--hardware", default=None, help="hardware id (default: the only/first one registered)")
        parser.add_argument("--label", action="append", default=[], help="label k=v for newly enrolled devices")
        parser.add_argument("--name-prefix", default="sim")
        parser.add_argument(
            "--credentials-file", type=Path, default=None,
            help="reuse the devices saved here, enroll only the missing ones, and save them back (mode 0600)",
        )
        parser.add_argument("--step-seconds", type=float, default=0.05, help="time per update step")
        parser.add_argument("--slow-step-seconds", type=float, default=2.0, help="time per step for --behaviour slow")
        parser.add_argument("--flap-period", type=float, default=20.0, help="flapping: seconds online between drops")
        parser.add_argument("--flap-down", type=float, default=5.0, help="flapping: seconds offline per drop")
        parser.add_argument("--fail-sha", action="append", default=[], help="artifact sha256 whose precheck fails")
        parser.add_argument("--telemetry-seconds", type=float, default=0.0, help="telemetry interval (0: off)")
        parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: on SIGTERM)")
        parser.add_argument("--metrics-requests", type=int, default=0,
                            help="model metrics: requests each box's app serves per telemetry window (0: none)")
        parser.add_argument(
            "--model-behaviour", action="append", default=[], metavar="SHA256:KEY=VALUE,...",
            help="how the app fares on a release, e.g. <sha256>:slower=1.4,error_rate=0.05,person=0.8,car=0.2 "
                 "(slower: latency factor; error_rate; any other key: an output label's share)",
        )

    def handle(self, *args, **o):
        if o["devices"] < 1:
            raise CommandError("--devices must be at least 1")
        if o["metrics_requests"] < 0:
            raise CommandError("--metrics-requests must be >= 0")
        try:
            model_behaviours = dict(parse_model_behaviour(text) for text in o["model_behaviour"])
        except ValueError as exc:
            raise CommandError(f"--model-behaviour: {exc}") from None
        try:
            labels = parse_label_pairs(o["label"])
        except ValueError as exc:
            raise CommandError(f"--label: {exc}") from None
        hardware = o["hardware"]
        if hardware is None:
            hardware = HardwareTarget.objects.order_by("id").values_list("id", flat=True).first()
            if hardware is None:
                raise CommandError("no hardware targets are registered; create one or pass --hardware")
        elif not HardwareTarget.objects.filter(pk=hardware).exists():
            raise CommandError(f"unknown hardware {hardware!r}")

        creds = []
        path = o["credentials_file"]
        if path is not None and path.exists():
            creds = load_credentials(path)[: o["devices"]]
        missing = o["devices"] - len(creds)
        if missing:
            try:
                creds += enroll_simulated_devices(
                    count=missing, hardware=hardware, labels=labels, token_secret=o["enroll_token"],
                    name_prefix=o["name_prefix"],
                )
            except ApiError as exc:
                raise CommandError(f"enrollment failed: {exc.detail}") from None
            if path is not None:
                save_credentials(path, creds)
        sim = FleetSimulator.from_settings(
            creds,
            behaviour=o["behaviour"],
            step_seconds=o["step_seconds"],
            slow_step_seconds=o["slow_step_seconds"],
            flap_period=o["flap_period"],
            flap_down=o["flap_down"],
            fail_shas=set(o["fail_sha"]),
            telemetry_seconds=o["telemetry_seconds"],
            metrics_requests=o["metrics_requests"],
            model_behaviours=model_behaviours,
        )
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        print(f"simulate_fleet: running {len(creds)} devices ({o['behaviour']}): "
              f"{', '.join(c.device_id for c in creds[:5])}{' ...' if len(creds) > 5 else ''}", file=sys.stderr,
              flush=True)
        stats = sim.run(stop, duration=o["duration"])
        self.stdout.write(json.dumps({"simulator_stats": stats.as_dict(), "devices": [c.device_id for c in creds]}))
