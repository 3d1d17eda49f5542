"""`manage.py mqtt_ingest`: long-running ingest on a shared subscription (run several side by side)."""

from __future__ import annotations

import json
import signal
import threading

from django.core.management.base import BaseCommand, CommandError

from ota.transport.subscriber import INGEST_SHARE_GROUP, IngestRunner


class Command(BaseCommand):
    help = "Store device events, telemetry and presence from MQTT; SIGTERM/SIGINT stop it cleanly."

    def add_arguments(self, parser):
        parser.add_argument("--batch-size", type=int, default=500, help="flush after this many messages")
        parser.add_argument("--flush-ms", type=int, default=200, help="flush at least this often (milliseconds)")
        parser.add_argument("--share-group", default=INGEST_SHARE_GROUP, help="MQTT shared-subscription group")
        parser.add_argument(
            "--client-id",
            default=None,
            help="fixed MQTT client id: keeps a persistent session so events queue while this process is "
            "down (give each side-by-side process its own)",
        )
        parser.add_argument("--stats-interval", type=float, default=30.0, help="seconds between stats log lines")

    def handle(self, *args, **options):
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1")
        if options["flush_ms"] < 1:
            raise CommandError("--flush-ms must be at least 1")
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        runner = IngestRunner(
            share_group=options["share_group"],
            client_id=options["client_id"],
            batch_size=options["batch_size"],
            flush_interval=options["flush_ms"] / 1000,
            stats_interval=options["stats_interval"],
        )
        stats = runner.run(stop)
        # Last line on stdout: machine-readable totals for supervisors and tests.
        self.stdout.write(json.dumps({"ingest_stats": stats.as_dict()}))
