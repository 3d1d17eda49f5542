"""One window of one model's release: request and error counts, a latency sketch, output counts
and numeric output sketches. Windows merge (the server merges devices and time windows), and go
to and from JSON without loss of the sketch's guarantee.

Quantiles come from DDSketch (relative accuracy 1 %): mergeable, bounded in size whatever the
request rate, and the same code on the agent, the simulator and the server."""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

from ddsketch import DDSketch
from ddsketch.mapping import LogarithmicMapping

RELATIVE_ACCURACY = 0.01
MAX_OUTPUT_LABELS = 64  # an app that sends a new label per request must not grow the window forever


def new_sketch() -> DDSketch:
    return DDSketch(relative_accuracy=RELATIVE_ACCURACY)


def sketch_to_json(sketch: DDSketch) -> dict:
    """{"bins": {key: count}, "zero": n, "count", "sum", "min", "max"}: the positive store's
    non-empty buckets. Values here (latencies, scores) are >= 0; negative ones are clamped to 0."""
    store = sketch._store  # DDSketch has no public accessor for its buckets; DenseStore's are stable
    bins = {str(i + store.offset): c for i, c in enumerate(store.bins) if c}
    return {
        "bins": bins, "zero": sketch._zero_count, "count": sketch.count, "sum": sketch.sum,
        "min": sketch._min if sketch.count else None, "max": sketch._max if sketch.count else None,
    }


def sketch_from_json(data: dict) -> DDSketch:
    """The inverse of sketch_to_json: every bucket re-added at its representative value, so each
    lands in the same bucket and quantiles keep their 1 % guarantee."""
    sketch = new_sketch()
    mapping = LogarithmicMapping(RELATIVE_ACCURACY)
    for key, count in (data.get("bins") or {}).items():
        sketch.add(mapping.value(int(key)), float(count))
    if data.get("zero"):
        sketch.add(0.0, float(data["zero"]))
    return sketch


def bucket_counts(sketch_json: dict, edges: list[float]) -> list[float]:
    """How much of a sketch (sketch_to_json's form) falls in each interval the sorted `edges` cut
    (len(edges) + 1 intervals), each bucket counted at its representative value: a histogram on
    the sketch's own buckets, within its 1 % accuracy."""
    mapping = LogarithmicMapping(RELATIVE_ACCURACY)
    counts = [0.0] * (len(edges) + 1)
    counts[bisect_right(edges, 0.0)] += float(sketch_json.get("zero") or 0)
    for key, count in (sketch_json.get("bins") or {}).items():
        counts[bisect_right(edges, mapping.value(int(key)))] += float(count)
    return counts


def quantile(sketch: DDSketch, q: float) -> float | None:
    value = sketch.get_quantile_value(q) if sketch.count else None
    return None if value is None else round(value, 3)


@dataclass
class Window:
    requests: float = 0
    errors: float = 0
    latency_ms: DDSketch = field(default_factory=new_sketch)
    outputs: dict[str, float] = field(default_factory=dict)
    output_values: dict[str, DDSketch] = field(default_factory=dict)

    def add(self, name: str, value: float, kind: str, rate: float = 1.0) -> bool:
        """Fold one StatsD sample in; False when the name is not one the agent knows."""
        weight = 1.0 / rate
        if name == "latency_ms" and kind == "timing":
            self.latency_ms.add(max(value, 0.0), weight)
        elif name == "requests" and kind == "counter":
            self.requests += value * weight
        elif name == "errors" and kind == "counter":
            self.errors += value * weight
        elif name.startswith("output.") and len(name) > len("output."):
            label = name[len("output."):]
            if kind == "counter":
                if label not in self.outputs and len(self.outputs) >= MAX_OUTPUT_LABELS:
                    return False
                self.outputs[label] = self.outputs.get(label, 0) + value * weight
            else:
                if label not in self.output_values and len(self.output_values) >= MAX_OUTPUT_LABELS:
                    return False
                self.output_values.setdefault(label, new_sketch()).add(max(value, 0.0), weight)
        else:
            return False
        return True

    def merge(self, other: Window) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.latency_ms.merge(other.latency_ms)
        for label, count in other.outputs.items():
            self.outputs[label] = self.outputs.get(label, 0) + count
        for label, sketch in other.output_values.items():
            self.output_values.setdefault(label, new_sketch()).merge(sketch)

    @property
    def empty(self) -> bool:
        return not (self.requests or self.errors or self.latency_ms.count or self.outputs or self.output_values)

    def error_rate(self) -> float | None:
        return round(self.errors / self.requests, 6) if self.requests else None

    def summary(self) -> dict:
        """The figures people read (and the trial judges): counts, error rate, latency quantiles."""
        return {
            "requests": self.requests, "errors": self.errors, "error_rate": self.error_rate(),
            "latency_ms_p50": quantile(self.latency_ms, 0.5), "latency_ms_p95": quantile(self.latency_ms, 0.95),
        }

    def to_json(self) -> dict:
        return {
            "requests": self.requests, "errors": self.errors,
            "latency_ms": sketch_to_json(self.latency_ms),
            "outputs": dict(self.outputs),
            "output_values": {k: sketch_to_json(v) for k, v in self.output_values.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> Window:
        return cls(
            requests=float(data.get("requests") or 0), errors=float(data.get("errors") or 0),
            latency_ms=sketch_from_json(data.get("latency_ms") or {}),
            outputs={str(k): float(v) for k, v in (data.get("outputs") or {}).items()},
            output_values={str(k): sketch_from_json(v) for k, v in (data.get("output_values") or {}).items()},
        )


def empty_sketch_json() -> dict:
    return {"bins": {}, "zero": 0, "count": 0, "sum": 0.0, "min": None, "max": None}


def sketch_json_merge(into: dict, other: dict) -> dict:
    """Add `other`'s buckets into `into` (both in sketch_to_json's form) and return it: what
    DDSketch.merge does, without decoding. Merging thousands of devices' windows this way costs a
    dict update per bucket, not a sketch per window (the server's control-group gates do it)."""
    bins = into.setdefault("bins", {})
    for key, count in (other.get("bins") or {}).items():
        bins[key] = bins.get(key, 0) + count
    into["zero"] = into.get("zero", 0) + (other.get("zero") or 0)
    into["count"] = into.get("count", 0) + (other.get("count") or 0)
    into["sum"] = into.get("sum", 0.0) + (other.get("sum") or 0.0)
    for name, pick in (("min", min), ("max", max)):
        values = [v for v in (into.get(name), other.get(name)) if v is not None]
        into[name] = pick(values) if values else None
    return into


def window_json_merge(into: dict, other: dict) -> dict:
    """Window.to_json's form, merged in place (see sketch_json_merge)."""
    into["requests"] = into.get("requests", 0) + (other.get("requests") or 0)
    into["errors"] = into.get("errors", 0) + (other.get("errors") or 0)
    sketch_json_merge(into.setdefault("latency_ms", empty_sketch_json()), other.get("latency_ms") or {})
    outputs = into.setdefault("outputs", {})
    for label, count in (other.get("outputs") or {}).items():
        outputs[label] = outputs.get(label, 0) + count
    values = into.setdefault("output_values", {})
    for label, sketch in (other.get("output_values") or {}).items():
        sketch_json_merge(values.setdefault(label, empty_sketch_json()), sketch)
    return into
