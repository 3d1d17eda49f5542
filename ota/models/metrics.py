"""What the application on each box reported about its model, per release and hour: the
agent's StatsD windows (agent/metrics) merged by ingest into one row per (device, model,
release, hour). Hourly rows keep a 10,000-device wave's figures to a few rows per device, and
still let the control-group gates compare both groups over the same hours."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from ota.models.devices import Device


class ModelMetricsHour(models.Model):
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="metrics_hours")
    model = models.CharField(max_length=128)
    release_sha256 = models.CharField(max_length=64)
    hour = models.DateTimeField(help_text="start of the UTC hour the windows ended in")
    requests = models.FloatField(default=0)
    errors = models.FloatField(default=0)
    # agent.metrics.aggregate's JSON forms: a DDSketch of latencies, output label counts and
    # sketches of numeric outputs; merged with window_json_merge, never recomputed.
    latency_ms = models.JSONField(default=dict)
    outputs = models.JSONField(default=dict)
    output_values = models.JSONField(default=dict)
    windows = models.PositiveIntegerField(default=0)
    first_at = models.DateTimeField(default=timezone.now)
    last_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["device", "model", "release_sha256", "hour"], name="one_metrics_row_per_hour"),
        ]
        indexes = [models.Index(fields=["model", "hour"], name="metrics_model_hour")]

    def as_window(self) -> dict:
        return {"requests": self.requests, "errors": self.errors, "latency_ms": self.latency_ms,
                "outputs": self.outputs, "output_values": self.output_values}
