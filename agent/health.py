"""Trial health checks: the application, not the agent, says whether the new model works.

The configured health command runs through the shell with these variables set:
  FLEET_AGENT_MODEL             model name
  FLEET_AGENT_MODEL_PATH        app-facing path of the model file (<state>/models/<name>/current/<file>)
  FLEET_AGENT_EXPECTED_SHA256   sha256 of the artifact the agent activated
It must exit 0 and may print one JSON object: {"model_sha256", "error_rate", "latency_ms_p95"}.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field


@dataclass(frozen=True)
class HealthResult:
    ok: bool
    detail: str
    figures: dict = field(default_factory=dict)


def run_health(
    command: str,
    *,
    model: str,
    model_path: str,
    expected_sha256: str,
    timeout: float,
    max_error_rate: float,
    max_latency_ms_p95: float,
) -> HealthResult:
    env = {
        **os.environ,
        "FLEET_AGENT_MODEL": model,
        "FLEET_AGENT_MODEL_PATH": model_path,
        "FLEET_AGENT_EXPECTED_SHA256": expected_sha256,
    }
    env.pop("FLEET_AGENT_CRASH_AT", None)
    try:
        proc = subprocess.run(command, shell=True, capture_output=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return HealthResult(False, f"health command timed out after {timeout:g}s")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip()[-300:]
        return HealthResult(False, f"health command exited {proc.returncode}: {tail}")
    out = proc.stdout.decode("utf-8", "replace").strip()
    if not out:
        return HealthResult(True, "health command passed")
    try:
        figures = json.loads(out.splitlines()[-1])
    except json.JSONDecodeError:
        return HealthResult(False, f"health command printed something that is not JSON: {out[-200:]!r}")
    if not isinstance(figures, dict):
        return HealthResult(False, "health command output must be a JSON object")
    reported = figures.get("model_sha256")
    if reported is not None and reported != expected_sha256:
        return HealthResult(
            False, f"application reports model sha256 {str(reported)[:64]}, activated {expected_sha256}", figures
        )
    error_rate = figures.get("error_rate")
    if error_rate is not None:
        if not isinstance(error_rate, (int, float)) or isinstance(error_rate, bool):
            return HealthResult(False, "health error_rate must be a number", figures)
        if error_rate > max_error_rate:
            return HealthResult(False, f"error rate {error_rate} is over the limit {max_error_rate}", figures)
    latency = figures.get("latency_ms_p95")
    if latency is not None:
        if not isinstance(latency, (int, float)) or isinstance(latency, bool):
            return HealthResult(False, "health latency_ms_p95 must be a number", figures)
        if max_latency_ms_p95 and latency > max_latency_ms_p95:
            return HealthResult(False, f"p95 latency {latency} ms is over the limit {max_latency_ms_p95} ms", figures)
    return HealthResult(True, "health command passed", figures)
