"""`manage.py mqtt_ingest`: long-running ingest on a shared subscription (run several side by side)."""

from __future__ import annotations

import json
import signal
import threading

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from ota.fleet.broker import BrokerError, broker_device_roles_update, broker_service_role_update
from ota.transport.mqtt import MqttError
from ota.transport.subscriber import INGEST_SHARE_GROUP, ClientIdInUse, IngestRunner, ingest_client_id


class Command(BaseCommand):
    help = (
        "Store device events, telemetry and presence from MQTT; SIGTERM/SIGINT stop it cleanly. Connects "
        "with a persistent MQTT session under a fixed client id, so messages queue at the broker while it "
        "is down (README: 'Ingest')."
    )

    def add_arguments(self, parser):
        parser.add_argument("--batch-size", type=int, default=500, help="flush after this many messages")
        parser.add_argument("--flush-ms", type=int, default=200, help="flush at least this often (milliseconds)")
        parser.add_argument("--share-group", default=INGEST_SHARE_GROUP, help="MQTT shared-subscription group")
        parser.add_argument(
            "--instance",
            type=int,
            default=1,
            help="the N-th ingest process on this host (default 1): N > 1 appends -N to the client id, so "
            "processes side by side each keep their own session",
        )
        parser.add_argument(
            "--client-id",
            default=None,
            help="MQTT client id (default: MQTT_INGEST_CLIENT_ID, else modelfleet-ingest-<hostname>, plus -N "
            "with --instance N); keep it the same across restarts: the broker queues for this id",
        )
        parser.add_argument(
            "--session-expiry",
            type=int,
            default=None,
            help="seconds the broker keeps this process's session after it disconnects (default "
            "MQTT_INGEST_SESSION_EXPIRY, 86400); 0: a clean session, nothing queued while it is down",
        )
        parser.add_argument(
            "--retire",
            action="store_true",
            help="for a process leaving for good: stop new messages to its session, store what is queued "
            "there, then end the session (otherwise the broker goes on queueing its share until it expires)",
        )
        parser.add_argument("--stats-interval", type=float, default=30.0, help="seconds between stats log lines")

    def handle(self, *args, **options):
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1")
        if options["flush_ms"] < 1:
            raise CommandError("--flush-ms must be at least 1")
        if options["instance"] < 1:
            raise CommandError("--instance must be at least 1")
        expiry = options["session_expiry"]
        if expiry is not None and not 0 <= expiry <= 4294967295:
            raise CommandError("--session-expiry must be between 0 and 4294967295 seconds")
        if options["retire"] and expiry == 0:
            raise CommandError("--retire takes what queued in a persistent session; --session-expiry 0 has none")
        try:
            # A broker set up by an older version may not let the service account announce new
            # ingest sessions (fleet/server/ingest); without that, nothing else breaks.
            added = broker_service_role_update()
            if added:
                self.stderr.write(f"mqtt_ingest: gave the broker's service role {', '.join(added)}")
            # Devices enrolled before keyrings (agent.trust) may read the keyring and their timestamp.
            device_acls_added = broker_device_roles_update()
            if device_acls_added:
                self.stderr.write(f"mqtt_ingest: gave device roles {device_acls_added} keyring/timestamp ACLs")
        except (BrokerError, MqttError) as exc:
            self.stderr.write(f"mqtt_ingest: could not check the broker's service role ACLs: {exc}")
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        runner = IngestRunner(
            share_group=options["share_group"],
            client_id=options["client_id"] or ingest_client_id(options["instance"]),
            session_expiry=expiry if expiry is not None else settings.MQTT_INGEST_SESSION_EXPIRY,
            batch_size=options["batch_size"],
            flush_interval=options["flush_ms"] / 1000,
            stats_interval=options["stats_interval"],
        )
        try:
            stats = runner.run(stop, retire_idle=2.0 if options["retire"] else None)
        except ClientIdInUse as exc:
            raise CommandError(str(exc)) from None
        if runner.fatal:
            raise CommandError(runner.fatal)
        # Last line on stdout: machine-readable totals for supervisors and tests.
        self.stdout.write(json.dumps({"ingest_stats": stats.as_dict()}))
