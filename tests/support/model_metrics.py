"""Model metrics telemetry as agents send it (agent.metrics windows), for the web pages' tests:
one box's window of requests, errors, latencies and output labels, through the real ingest; and
devices committing a rollout's release through the engine's event path."""

from __future__ import annotations

import json
import random

from django.utils import timezone

from agent.metrics.aggregate import Window
from agent.protocol import format_time
from ota.transport.ingest import Ingestor, Message


def metrics_message(device_id: str, sha: str, *, latency_ms: float, requests: int, errors: int = 0,
                    labels: dict[str, float] | None = None, model: str = "detector", at=None,
                    rng: random.Random | None = None) -> Message:
    """A telemetry message carrying one window for `model` on release `sha`, received at `at`.
    With `rng`, latencies spread like a real box's (log-normal around `latency_ms`, the box itself
    up to ~10 % off); without, evenly over ±10 %. `labels`: output label shares."""
    at = at or timezone.now()
    window = Window()
    speed = rng.lognormvariate(0, 0.1) if rng else 1.0
    shares = labels or {"person": 0.5, "car": 0.5}
    names = [name for name, share in shares.items() for _ in range(round(share * 100))]
    for i in range(requests):
        jitter = rng.lognormvariate(0, 0.2) if rng else 0.9 + 0.2 * (i % 10) / 10
        window.add("latency_ms", latency_ms * speed * jitter, "timing")
        window.add("requests", 1, "counter")
        window.add("output." + (rng.choice(names) if rng else names[i % len(names)]), 1, "counter")
    for _ in range(errors):
        window.add("errors", 1, "counter")
    entry = {"model": model, "release": sha, **window.to_json()}
    payload = {"_type": "telemetry", "device_id": device_id, "ts": format_time(at),
               "model_metrics": {"window_start": format_time(at), "window_end": format_time(at),
                                 "models": [entry], "stats": {}}}
    return Message(topic=f"fleet/devices/{device_id}/telemetry", payload=json.dumps(payload).encode(),
                   received_at=at)


def ingest(messages: list[Message]) -> None:
    Ingestor().process(messages)


def commit_devices(rollout, device_ids) -> None:
    """Each device reports `committed` for its newest directive, folded in by rollout_apply_events
    as ingest does."""
    from ota.models import DeviceEvent, Directive
    from ota.rollouts.events import rollout_apply_events

    events = []
    for device_id in device_ids:
        seq = Directive.objects.filter(device_id=device_id).order_by("-seq").first().seq
        events.append(DeviceEvent.objects.create(device_id=device_id, event_no=1, seq=seq, state="committed",
                                                 model=rollout.model.name, rollout_id=str(rollout.pk)).pk)
    rollout_apply_events(event_ids=events)
