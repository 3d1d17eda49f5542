"""Trial health checks: the application, not the agent, says whether the new model works.

The configured health command runs through the shell with these variables set:
  FLEET_AGENT_MODEL             model name
  FLEET_AGENT_MODEL_PATH        app-facing path of the model file (<state>/models/<name>/current/<file>)
  FLEET_AGENT_EXPECTED_SHA256   sha256 of the artifact the agent activated
It must exit 0 and may print one JSON object: {"model_sha256", "error_rate", "latency_ms_p95"}.
The same limits (judge_figures) apply to what the application reports as StatsD metrics
(agent/metrics), once metrics.min_trial_requests requests were reported during the trial.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from dataclasses import dataclass, field

from agent.journal import child_env


@dataclass(frozen=True)
class HealthResult:
    ok: bool
    detail: str
    figures: dict = field(default_factory=dict)


def run_shell(command: str, *, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run an operator's shell command in its own process group and, on timeout, kill the group.

    subprocess.run(timeout=) kills only the shell: the rest of `curl ... | jq` or a script's
    children would outlive it, one more stray process at every health interval.
    Raises subprocess.TimeoutExpired like subprocess.run."""
    proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=5)  # a process that left the group may hold the pipes: do not wait on it
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


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
    env = child_env(
        FLEET_AGENT_MODEL=model, FLEET_AGENT_MODEL_PATH=model_path, FLEET_AGENT_EXPECTED_SHA256=expected_sha256
    )
    try:
        proc = run_shell(command, env=env, timeout=timeout)
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
    verdict = judge_figures(figures, max_error_rate=max_error_rate, max_latency_ms_p95=max_latency_ms_p95)
    if verdict is not None:
        return HealthResult(False, verdict, figures)
    return HealthResult(True, "health command passed", figures)


def judge_figures(figures: dict, *, max_error_rate: float, max_latency_ms_p95: float) -> str | None:
    """The trial's limits on what the application reports, whether through the health command's
    JSON or its StatsD metrics: None when within them, else why not."""
    error_rate = figures.get("error_rate")
    if error_rate is not None:
        if not isinstance(error_rate, (int, float)) or isinstance(error_rate, bool):
            return "health error_rate must be a number"
        if error_rate > max_error_rate:
            return f"error rate {error_rate} is over the limit {max_error_rate}"
    latency = figures.get("latency_ms_p95")
    if latency is not None:
        if not isinstance(latency, (int, float)) or isinstance(latency, bool):
            return "health latency_ms_p95 must be a number"
        if max_latency_ms_p95 and latency > max_latency_ms_p95:
            return f"p95 latency {latency} ms is over the limit {max_latency_ms_p95} ms"
    return None
