"""Trial health and reload commands: operator shell commands run with a time limit, and a
command that overruns it is killed with everything it started."""

from __future__ import annotations

import time

from agent.health import run_health

SHA = "a" * 64


def health(command: str, timeout: float = 5, **limits):
    return run_health(command, model="m", model_path="/m", expected_sha256=SHA, timeout=timeout,
                      max_error_rate=limits.get("max_error_rate", 0.1),
                      max_latency_ms_p95=limits.get("max_latency_ms_p95", 0))


def test_it_kills_the_whole_command_when_it_overruns(tmp_path):
    survivor = tmp_path / "survivor"
    started = time.monotonic()
    # The background job is the shell's child: killing only the shell would leave it running.
    result = health(f"(sleep 1; touch {survivor}) & sleep 30", timeout=0.3)
    assert not result.ok and result.detail == "health command timed out after 0.3s"
    assert time.monotonic() - started < 5
    time.sleep(1.5)
    assert not survivor.exists(), "a child of the timed-out health command kept running"


def test_it_passes_the_model_to_the_command_and_reads_its_figures():
    cmd = 'printf \'{"model_sha256":"%s","error_rate":0.01,"latency_ms_p95":12}\' "$FLEET_AGENT_EXPECTED_SHA256"'
    result = health(cmd, max_latency_ms_p95=50)
    assert result.ok, result.detail
    assert result.figures == {"model_sha256": SHA, "error_rate": 0.01, "latency_ms_p95": 12}
    assert health('test "$FLEET_AGENT_MODEL_PATH" = /m && test "$FLEET_AGENT_MODEL" = m').ok


def test_it_fails_with_the_reason_for_each_bad_answer():
    cases = {
        "echo boom >&2; exit 4": "health command exited 4: boom",
        "echo not json": "health command printed something that is not JSON",
        "echo '[1]'": "health command output must be a JSON object",
        'echo \'{"error_rate": "high"}\'': "health error_rate must be a number",
        'echo \'{"error_rate": 0.5}\'': "error rate 0.5 is over the limit 0.1",
        'echo \'{"model_sha256": "other"}\'': f"application reports model sha256 other, activated {SHA}",
    }
    for command, reason in cases.items():
        result = health(command)
        assert not result.ok and reason in result.detail, (command, result.detail)
