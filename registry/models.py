from __future__ import annotations

import hashlib
import secrets

from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone

identifier = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
    "Use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.",
)


class HardwareTarget(models.Model):
    id = models.CharField(primary_key=True, max_length=64, validators=[identifier])
    description = models.CharField(max_length=200, blank=True)
    max_artifact_bytes = models.BigIntegerField(help_text="Largest artifact this hardware accepts.")
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return self.id


class Model(models.Model):
    name = models.SlugField(max_length=64, unique=True)
    description = models.TextField(blank=True)
    tags = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ModelVersion(models.Model):
    class State(models.TextChoices):
        DRAFT = "draft"
        RELEASED = "released"
        DEPRECATED = "deprecated"
        REVOKED = "revoked"

    model = models.ForeignKey(Model, on_delete=models.PROTECT, related_name="versions")
    version = models.CharField(max_length=64, validators=[identifier])
    # Strictly increasing per model; devices refuse releases below their rollback floor by it.
    counter = models.PositiveIntegerField()
    rollback_floor = models.PositiveIntegerField(default=0)
    state = models.CharField(max_length=16, choices=State.choices, default=State.DRAFT)
    metadata = models.JSONField(default=dict, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    health = models.JSONField(null=True, blank=True, help_text="Signed health contract (golden I/O, budgets).")
    git_sha = models.CharField(max_length=64, blank=True)
    ci_run_url = models.URLField(max_length=500, blank=True)
    training_run_id = models.CharField(max_length=200, blank=True)
    approver = models.CharField(max_length=150, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.CharField(max_length=150, blank=True)
    released_at = models.DateTimeField(null=True, blank=True)
    released_by = models.CharField(max_length=150, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    # The signed DSSE envelope, stored verbatim: re-serialising would change nothing the
    # signature covers, but keeping the exact bytes makes "what did we sign" unambiguous.
    envelope = models.JSONField(null=True, blank=True, editable=False)
    manifest_sha256 = models.CharField(max_length=64, blank=True, editable=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["model", "version"], name="unique_version_per_model"),
            models.UniqueConstraint(fields=["model", "counter"], name="unique_counter_per_model"),
        ]
        ordering = ["model", "-counter"]

    def __str__(self) -> str:
        return f"{self.model.name}@{self.version}"

    @property
    def is_immutable(self) -> bool:
        return self.state != self.State.DRAFT


class Artifact(models.Model):
    class Format(models.TextChoices):
        ONNX = "onnx"
        TFLITE = "tflite"
        TENSORRT = "tensorrt"
        OTHER = "other"

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="artifacts")
    hardware = models.ForeignKey(HardwareTarget, on_delete=models.PROTECT, related_name="artifacts")
    format = models.CharField(max_length=16, choices=Format.choices)
    file_name = models.CharField(max_length=255)
    length = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    storage_key = models.CharField(max_length=500, unique=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["version", "hardware"], name="one_artifact_per_hardware")
        ]
        ordering = ["hardware_id"]

    def __str__(self) -> str:
        return f"{self.version} [{self.hardware_id}]"


class Alias(models.Model):
    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="aliases")
    name = models.SlugField(max_length=64)
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="aliases")
    updated_at = models.DateTimeField(default=timezone.now)
    updated_by = models.CharField(max_length=150, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["model", "name"], name="unique_alias_per_model")]
        ordering = ["model", "name"]
        verbose_name_plural = "aliases"

    def __str__(self) -> str:
        return f"{self.model.name}:{self.name}"


class AliasMove(models.Model):
    """Every alias move, kept forever, so "what was production on date D" has an answer."""

    alias = models.ForeignKey(Alias, on_delete=models.CASCADE, related_name="moves")
    from_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, null=True, related_name="+")
    to_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    moved_by = models.CharField(max_length=150, blank=True)
    moved_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-moved_at", "-id"]


class ApiToken(models.Model):
    """A bearer token for CI and scripts. Only a SHA-256 of the secret is stored."""

    class Scope(models.TextChoices):
        READ = "read"
        CI = "ci"
        OPERATOR = "operator"
        ADMIN = "admin"

    name = models.CharField(max_length=100)
    scope = models.CharField(max_length=16, choices=Scope.choices)
    prefix = models.CharField(max_length=12, editable=False)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.CharField(max_length=150, blank=True)
    # Recorded at most once a minute per token (registry.auth), so it is exact to a minute.
    last_used_at = models.DateTimeField(null=True, blank=True)
    # None: never expires.
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    TOKEN_PREFIX = "mf_"

    def __str__(self) -> str:
        return f"{self.name} ({self.scope})"

    def is_expired(self, now=None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or timezone.now())

    @staticmethod
    def hash_secret(secret: str) -> str:
        return hashlib.sha256(secret.encode("utf-8")).hexdigest()

    @classmethod
    def new_secret(cls) -> str:
        return cls.TOKEN_PREFIX + secrets.token_urlsafe(32)


class ReleaseKey(models.Model):
    """A release public key registered by an admin (offline signing, registry.keys). Only the
    public half is ever here; revoked keys stay for the record and are no longer trusted."""

    class Role(models.TextChoices):
        RELEASE = "release"

    # agent.signing.keyid_of: hex SHA-256 of the raw public key, the DSSE keyid of its signatures.
    keyid = models.CharField(max_length=64, unique=True)
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.RELEASE)
    public_key_pem = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.CharField(max_length=150, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.CharField(max_length=150, blank=True)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.role} key {self.keyid[:16]}"


class Keyring(models.Model):
    """A root-signed keyring (agent.trust) accepted by registry.keyrings.keyring_push; the newest
    version is the current one, retained for devices on `{root}/keyring`. Never edited."""

    version = models.PositiveIntegerField(unique=True)
    envelope = models.JSONField()
    expires_at = models.DateTimeField()
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.CharField(max_length=150, blank=True)

    class Meta:
        ordering = ["-version"]

    def __str__(self) -> str:
        return f"keyring v{self.version}"


class AuditEntry(models.Model):
    """Who did what, or which automatic decision was taken and why, with the figures behind it."""

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.CharField(max_length=150, help_text="user:NAME, token:NAME or system")
    action = models.CharField(max_length=64)
    object_type = models.CharField(max_length=64)
    object_id = models.CharField(max_length=128)
    reason = models.TextField(blank=True)
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["object_type", "object_id"])]
        verbose_name_plural = "audit entries"

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor} {self.action} {self.object_type}:{self.object_id}"
