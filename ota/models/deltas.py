"""Delta artifacts: one per (base artifact, target artifact) of one hardware, built off the request
path (ota.rollouts.deltas) and stored beside the artifacts in the same storage."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

__all__ = ["ArtifactDelta"]


class ArtifactDelta(models.Model):
    class State(models.TextChoices):
        PENDING = "pending"  # asked for, not claimed yet
        BUILDING = "building"  # claimed by a worker (conditional UPDATE)
        READY = "ready"  # stored; offered in directives
        OVERSIZED = "oversized"  # built, but too close to the full artifact to be worth offering
        FAILED = "failed"

    base = models.ForeignKey("registry.Artifact", on_delete=models.CASCADE, related_name="deltas_from")
    target = models.ForeignKey("registry.Artifact", on_delete=models.CASCADE, related_name="deltas_to")
    method = models.CharField(max_length=32)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    length = models.BigIntegerField(null=True, blank=True)
    sha256 = models.CharField(max_length=64, blank=True)
    storage_key = models.CharField(max_length=500, blank=True)
    error = models.TextField(blank=True)
    build_seconds = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    claimed_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["base", "target", "method"], name="one_delta_per_pair"),
        ]

    def __str__(self) -> str:
        return f"delta {self.base_id}→{self.target_id} ({self.state})"
