"""What ingest could not store as it arrived: the dead-letter table."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

__all__ = ["DeadLetter"]


class DeadLetter(models.Model):
    """A device message ingest could not store as received, kept raw so nothing is lost silently.

    `dropped`: the message was not stored (PostgreSQL refused it on its own, or a field that
    identifies something held a character PostgreSQL cannot store); it was acknowledged so it
    never blocks the messages behind it. `repaired`: it was stored after removing characters
    PostgreSQL cannot store from fields that are free text (ota.transport.ingest says which
    fields are which); the original is kept here.
    """

    # The raw payload is kept up to the protocol's limit (agent.protocol.MAX_PAYLOAD_BYTES):
    # every message ingest would have accepted fits whole; `payload_size` says what arrived.
    MAX_PAYLOAD_BYTES = 64 * 1024

    class Outcome(models.TextChoices):
        DROPPED = "dropped"
        REPAIRED = "repaired"

    received_at = models.DateTimeField(default=timezone.now, db_index=True)
    topic = models.CharField(max_length=512)
    kind = models.CharField(max_length=16, blank=True, help_text="events, telemetry or presence")
    device_id = models.CharField(max_length=64, blank=True, db_index=True, help_text="From the topic, when it names one.")
    retained = models.BooleanField(default=False, help_text="A retained message the broker replayed.")
    payload = models.BinaryField(max_length=MAX_PAYLOAD_BYTES, help_text="The raw payload, truncated to 64 KiB.")
    payload_size = models.PositiveIntegerField(default=0)
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    error = models.TextField()

    class Meta:
        ordering = ["-received_at", "-id"]

    def __str__(self) -> str:
        return f"{self.outcome} {self.topic} at {self.received_at:%Y-%m-%d %H:%M:%S}"
