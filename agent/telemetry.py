"""Device telemetry from psutil: CPU, memory, disk of the state directory, temperature."""

from __future__ import annotations

from pathlib import Path

import psutil

from agent.protocol import encode_json, format_time, utcnow


def _temperature() -> float | None:
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return None
    try:
        sensors = reader()
    except (OSError, RuntimeError):
        return None
    readings = [t.current for entries in sensors.values() for t in entries if t.current is not None]
    return round(max(readings), 1) if readings else None


def collect(*, device_id: str, state_dir: Path, active: dict, health: dict | None,
            model_metrics: dict | None = None) -> bytes:
    data = {
        "_type": "telemetry",
        "device_id": device_id,
        "ts": format_time(utcnow()),
        "cpu_percent": psutil.cpu_percent(interval=None),
        "memory_percent": psutil.virtual_memory().percent,
        "disk_percent": psutil.disk_usage(str(state_dir)).percent,
        "agent_rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
        "active": active,
        "health": health,
    }
    if model_metrics:
        data["model_metrics"] = model_metrics
    temperature = _temperature()
    if temperature is not None:
        data["temperature_c"] = temperature
    return encode_json(data)
