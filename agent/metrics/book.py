"""The agent's book of model metrics: the listener thread feeds it, telemetry takes a window at
each report, and a trial watches its own (model, release) from the moment it begins.

A sample belongs to the model its `model:` tag names, else to the agent's only model; it is
counted against the release that model runs when the sample arrives (`releases()`, read from the
journal), so a window never mixes the old release's figures with the new one's."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from agent.metrics.aggregate import Window
from agent.metrics.statsd import Rejected, parse_datagram
from agent.protocol import encode_json, format_time, utcnow


# What one telemetry message may spend on model metrics (agent.protocol.MAX_PAYLOAD_BYTES is 64 KiB).
MAX_WINDOW_BYTES = 48 * 1024


class MetricsBook:
    def __init__(self, *, releases: Callable[[], dict[str, str]]):
        self._releases = releases
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], Window] = {}
        self._window_start = utcnow()
        self._trials: dict[tuple[str, str], tuple[Window, float]] = {}
        self.stats = {"samples": 0, "rejected": 0, "unattributed": 0, "ignored": 0}
        self.last_problem = ""

    def feed(self, data: bytes) -> None:
        items = parse_datagram(data)
        releases = self._releases()
        with self._lock:
            for item in items:
                if isinstance(item, Rejected):
                    self.stats["rejected"] += 1
                    self.last_problem = f"{item.reason}: {item.line!r}"
                    continue
                model = item.model or (next(iter(releases)) if len(releases) == 1 else None)
                sha = releases.get(model) if model else None
                if sha is None:
                    # No tag with several models, or a model this box does not run: whose figures
                    # these are cannot be known, and guessing would blame the wrong release.
                    self.stats["unattributed"] += 1
                    self.last_problem = f"no model runs as {model!r}" if model else "untagged sample, several models"
                    continue
                key = (model, sha)
                if not self._windows.setdefault(key, Window()).add(item.name, item.value, item.kind, item.rate):
                    self.stats["ignored"] += 1
                    continue
                self.stats["samples"] += 1
                if key in self._trials:
                    self._trials[key][0].add(item.name, item.value, item.kind, item.rate)

    def take_window(self) -> dict | None:
        """The figures since the last call, for telemetry (None when the app sent nothing): one
        entry per (model, release) with its mergeable sketches and a readable summary."""
        with self._lock:
            windows, self._windows = self._windows, {}
            start, self._window_start = self._window_start, utcnow()
            stats, problem = dict(self.stats), self.last_problem
        entries = [
            {"model": model, "release": sha, **w.to_json(), "summary": w.summary()}
            for (model, sha), w in sorted(windows.items()) if not w.empty
        ]
        if not entries and not stats["rejected"] and not stats["unattributed"]:
            return None
        out = {"window_start": format_time(start), "window_end": format_time(utcnow()), "models": entries,
               "stats": stats}
        if problem:
            out["last_problem"] = problem
        if len(encode_json(out)) > MAX_WINDOW_BYTES:
            # Telemetry travels in one MQTT message under the 64 KiB cap ingest enforces: drop the
            # numeric-output sketches first (latency, counts and labels are what gates need most).
            for entry in entries:
                entry["output_values"] = {}
            out["truncated"] = "output_values"
        return out

    def trial_begin(self, model: str, sha: str) -> None:
        with self._lock:
            self._trials[(model, sha)] = (Window(), time.monotonic())

    def trial_figures(self, model: str, sha: str) -> dict | None:
        """What the app reported of this release since trial_begin (None: no trial watches it)."""
        with self._lock:
            entry = self._trials.get((model, sha))
            if entry is None:
                return None
            window, began = entry
            return {**window.summary(), "seconds": round(time.monotonic() - began, 1)}

    def trial_end(self, model: str, sha: str) -> None:
        with self._lock:
            self._trials.pop((model, sha), None)
