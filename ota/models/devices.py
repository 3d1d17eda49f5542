"""Devices, enrollment, credentials and what the fleet reports."""

from __future__ import annotations

import hashlib
import secrets

from django.db import models
from django.db.models import Q
from django.utils import timezone

__all__ = ["Device", "DeviceModelState", "DeviceEvent", "ActiveRelease", "EnrollmentToken", "hash_secret"]


def hash_secret(secret: str) -> str:
    """Only SHA-256 digests of bearer secrets are stored; the secrets are long and random,
    so a slow KDF would buy nothing but latency on every artifact download."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class Device(models.Model):
    class State(models.TextChoices):
        ACTIVE = "active"
        REVOKED = "revoked"

    API_TOKEN_PREFIX = "mfd_"

    # Also the MQTT username: the broker ACL confines each client to fleet/devices/<username>/...
    id = models.CharField(primary_key=True, max_length=64)
    name = models.CharField(max_length=200, blank=True)
    hardware = models.ForeignKey("registry.HardwareTarget", on_delete=models.PROTECT, related_name="devices")
    labels = models.JSONField(default=dict, blank=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.ACTIVE, db_index=True)
    created_at = models.DateTimeField(default=timezone.now)
    enrolled_with = models.ForeignKey(
        "ota.EnrollmentToken", null=True, blank=True, on_delete=models.SET_NULL, related_name="devices"
    )
    last_seen = models.DateTimeField(null=True, blank=True)
    online = models.BooleanField(default=False, db_index=True)
    # When the device last sent a presence with per-model reports (DeviceModelState.reported_*):
    # a model missing from such a presence is one the device has had no directive for.
    reported_at = models.DateTimeField(null=True, blank=True)
    agent_version = models.CharField(max_length=64, blank=True)
    # What its agent advertised it understands beyond the original wire format (presence.features,
    # agent.protocol.FEATURES), e.g. "release_ref": lean directives (ota.rollouts.directives).
    features = models.JSONField(default=list, blank=True)
    last_telemetry = models.JSONField(default=dict, blank=True)
    last_telemetry_at = models.DateTimeField(null=True, blank=True)
    # presence.trust (agent.trust), from a device that pins a root key: {keyring_version, timestamp,
    # error_code (STALE_DIRECTIVES: its newest signed timestamp is too old), refused}; null otherwise.
    trust = models.JSONField(null=True, blank=True)
    # The per-device directive counter; the rollout engine bumps it with a conditional UPDATE
    # (F("directive_seq") + 1) so two workers never hand out the same seq.
    directive_seq = models.PositiveBigIntegerField(default=0)
    last_event_no = models.BigIntegerField(default=-1)
    mqtt_username = models.CharField(max_length=64, unique=True)
    # The broker keeps its own salted hash; ours (SHA-256) only lets us tell whether a
    # credential in hand is the current one.
    mqtt_password_hash = models.CharField(max_length=64, blank=True, editable=False)
    api_token_prefix = models.CharField(max_length=12, blank=True, editable=False)
    api_token_hash = models.CharField(max_length=64, null=True, blank=True, unique=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.CharField(max_length=150, blank=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["hardware", "state"])]

    def __str__(self) -> str:
        return self.name or self.id

    @classmethod
    def new_api_token(cls) -> str:
        return cls.API_TOKEN_PREFIX + secrets.token_urlsafe(32)


class DeviceModelState(models.Model):
    """Per device and model: what is active now and how the last update went."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="model_states")
    model = models.ForeignKey("registry.Model", on_delete=models.CASCADE, related_name="device_states")
    active_version = models.ForeignKey(
        "registry.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    active_sha256 = models.CharField(max_length=64, blank=True)
    last_seq = models.PositiveBigIntegerField(default=0)
    last_state = models.CharField(max_length=24, blank=True)
    last_error_code = models.CharField(max_length=32, blank=True)
    last_rollout_id = models.CharField(max_length=64, blank=True)
    last_event_no = models.BigIntegerField(default=-1)
    # What the device itself last said in its retained presence (agents that send `models`): the
    # seq of the last directive it handled for this model, whether what runs is committed, and the
    # seq of an update still in flight (or parked until its maintenance window opens). The reconciler (ota/rollouts/reconcile.py) compares these
    # with the desired state to repair lost events and lost directives.
    reported_seq = models.PositiveBigIntegerField(null=True, blank=True)
    reported_committed = models.BooleanField(null=True, blank=True)
    reported_update_seq = models.PositiveBigIntegerField(null=True, blank=True)
    reported_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["device", "model"], name="one_state_per_device_model")]
        ordering = ["device", "model"]


class DeviceEvent(models.Model):
    """One update-progress report as received; (device, seq, event_no) drops MQTT redeliveries."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="events")
    event_no = models.BigIntegerField()
    seq = models.BigIntegerField()
    model = models.CharField(max_length=64)
    state = models.CharField(max_length=24)
    error_code = models.CharField(max_length=32, blank=True)
    detail = models.TextField(blank=True)
    sha256 = models.CharField(max_length=64, blank=True)
    active_sha256 = models.CharField(max_length=64, blank=True)
    rollout_id = models.CharField(max_length=64, blank=True, db_index=True)
    health = models.JSONField(null=True, blank=True)
    device_ts = models.CharField(max_length=40, blank=True, help_text="The device's own clock, as sent.")
    delivery = models.CharField(max_length=8, blank=True)  # "delta" or "full" (agents with deltas)
    bytes_downloaded = models.BigIntegerField(null=True, blank=True)
    # waiting_for_window: when the device's next maintenance window opens, by its own clock.
    next_opening = models.DateTimeField(null=True, blank=True)
    received_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["device", "seq", "event_no"], name="unique_device_event")
        ]
        indexes = [models.Index(fields=["device", "-received_at"])]
        ordering = ["-received_at", "-id"]


class ActiveRelease(models.Model):
    """Fleet history: which release was active on which device from when to when."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="release_history")
    model = models.ForeignKey("registry.Model", on_delete=models.CASCADE, related_name="+")
    version = models.ForeignKey(
        "registry.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    sha256 = models.CharField(max_length=64)
    from_time = models.DateTimeField(default=timezone.now)
    to_time = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["device", "model"], condition=Q(to_time__isnull=True), name="one_open_release_per_device_model"
            )
        ]
        indexes = [models.Index(fields=["device", "model", "-from_time"])]
        ordering = ["-from_time", "-id"]


class EnrollmentToken(models.Model):
    TOKEN_PREFIX = "mfe_"
    AUDIT_OBJECT_TYPE = "enrollment_token"  # the audit log's name for these since the first entry

    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=12, editable=False)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.CharField(max_length=150, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    max_uses = models.PositiveIntegerField(default=1)
    uses = models.PositiveIntegerField(default=0)
    default_labels = models.JSONField(default=dict, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.uses}/{self.max_uses})"

    @classmethod
    def new_secret(cls) -> str:
        return cls.TOKEN_PREFIX + secrets.token_urlsafe(24)
