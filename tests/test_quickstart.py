"""README.md as a newcomer and a CI pipeline use it, verbatim, on a fresh clone: `make run`; the
"Your first rollout" blocks (a token and an enrollment token from a second shell, a hardware
target, silero-vad from its PyPI wheel pushed with --sample-inputs, a real `fleet-agent` enrolled
and running, a rollout that commits on it); the GitHub Actions example's push step, refused on a
broken build and re-run with the same version; and a restart of `make run` that keeps the agent
connected on the same broker port.

The clone reuses this checkout's virtualenv (a symlink) instead of installing one from scratch,
which tests/test_packaging.py covers; the server's code runs from the clone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.makerun import ROOT, MakeRun, listen_port
from tests.support.net import reserve
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow


def readme_block(readme: str, marker: str) -> str:
    """The code block right after `<!-- marker -->` in README.md."""
    match = re.search(rf"<!-- {re.escape(marker)} -->\s*```\w*\n(.*?)```", readme, re.DOTALL)
    assert match, f"README.md has no block marked {marker!r}"
    return match.group(1)


def ci_push_step(readme: str) -> str:
    workflow = yaml.safe_load(readme_block(readme, "ci-example"))
    steps = workflow["jobs"]["push-model"]["steps"]
    return next(step["run"] for step in steps if step.get("name") == "Push, release, promote to staging")


def bash(script: str, *, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def api_get(url: str, token: str):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def fresh_clone(tmp_path: Path) -> Path:
    clone = tmp_path / "modelfleet"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    # A clone's files are newer than the shared venv's install stamp: keep bootstrap.sh from
    # re-installing this checkout's editable package from the clone.
    os.utime(clone / "pyproject.toml", (0, 0))
    return clone


def clean_env(**extra: str) -> dict[str, str]:
    """A shell with none of the test suite's settings in it."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DATABASE_URL", "SECRET_KEY", "MQTT_", "REDIS_", "DEBUG", "FLEET_", "DJANGO_",
                                "TEST_", "CELERY_"))}
    env.update(extra)
    return env


def test_it_takes_a_newcomer_and_a_ci_pipeline_to_a_committed_rollout_on_the_first_try(tmp_path):
    clone = fresh_clone(tmp_path)
    readme = (clone / "README.md").read_text()
    web_port = str(listen_port())
    # make run's own Redis (a port nobody serves), so no other test's worker takes its tasks.
    run_env = clean_env(WEB_PORT=web_port, REDIS_URL=f"redis://127.0.0.1:{listen_port()}/0",
                        WEB_WORKERS="1", CELERY_CONCURRENCY="1")
    shell_env = clean_env(WEB_PORT=web_port)
    work = Path("/tmp/first-rollout")
    shutil.rmtree(work, ignore_errors=True)
    agent = None
    platform = MakeRun(run_env, cwd=clone)
    try:
        platform.login()
        kept = (clone / "var" / "run.env").read_text()
        mqtt_port = re.search(r"^MQTT_PORT=(\d+)$", kept, re.M).group(1)
        reserve(int(mqtt_port))  # make run picked it and wants it again after the restart below

        # --- the README's first rollout, block by block, verbatim ---------------------------
        state = tmp_path / "shell.env"
        setup = bash(readme_block(readme, "walkthrough:setup") + f"\ndeclare -px > {state}\n",
                     cwd=clone, env=shell_env)
        assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-5000:]
        assert "released vad 1.0.0" in setup.stderr
        agent_cmd = readme_block(readme, "walkthrough:agent").strip()
        agent = subprocess.Popen(["bash", "-c", f"exec {agent_cmd}"], cwd=clone, env=shell_env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        rollout = bash(f"source {state}\n" + readme_block(readme, "walkthrough:rollout"), cwd=clone, env=shell_env,
                       timeout=240)
        assert rollout.returncode == 0, rollout.stdout[-3000:] + rollout.stderr[-3000:]
        assert "COMPLETED" in rollout.stdout
        token = re.search(r'declare -x FLEET_TOKEN="([^"]+)"', state.read_text()).group(1)
        base = f"http://127.0.0.1:{web_port}"
        devices = api_get(f"{base}/api/v1/devices/?label=site=lab", token)["results"]
        assert len(devices) == 1 and devices[0]["models"][0]["active_version"] == "1.0.0", devices

        # --- the CI example's push step, verbatim: a broken build, then the fixed one -------
        build = tmp_path / "job" / "build"
        build.mkdir(parents=True)
        shutil.copy(work / "samples.npz", build / "samples.npz")
        shutil.copy(work / "vad.onnx", build / "detector-orin.onnx")
        (build / "detector-rpi5.onnx").write_bytes((work / "vad.onnx").read_bytes()[:100_000])  # truncated
        job_env = clean_env(
            PATH=f"{clone / '.venv' / 'bin'}:{os.environ['PATH']}", FLEET_URL=base, FLEET_TOKEN=token,
            GITHUB_REF_NAME="model-v1.2.0", GITHUB_SHA="0" * 40, GITHUB_SERVER_URL="https://github.example",
            GITHUB_REPOSITORY="acme/detector", GITHUB_RUN_ID="7", GITHUB_STEP_SUMMARY=str(tmp_path / "summary.md"),
        )
        step = ci_push_step(readme)
        broken = bash(step, cwd=build.parent, env=job_env)
        assert broken.returncode == 2, broken.stderr[-3000:]
        assert "detector-rpi5.onnx" in broken.stderr
        assert api_get(f"{base}/api/v1/models/", token)["results"] == [] or all(
            m["name"] != "detector" for m in api_get(f"{base}/api/v1/models/", token)["results"]
        )
        shutil.copy(work / "vad.onnx", build / "detector-rpi5.onnx")  # the build fixed
        rerun = bash(step, cwd=build.parent, env=job_env)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "Released detector 1.2.0, manifest sha256" in (tmp_path / "summary.md").read_text()
        assert json.loads((build.parent / "release.json").read_text())["payloadType"]

        # --- make run restarted: the device keeps its broker (same port) and reconnects ------
        platform.stop()
        restarted_at = time.time()
        platform = MakeRun(run_env, cwd=clone)
        platform.login()
        assert re.search(r"^MQTT_PORT=(\d+)$", (clone / "var" / "run.env").read_text(), re.M).group(1) == mqtt_port

        def back_online():
            device = api_get(f"{base}/api/v1/devices/?label=site=lab", token)["results"][0]
            seen = device["last_seen"]
            return device["online"] and seen and _epoch(seen) > restarted_at

        wait_for(back_online, timeout=90, what="the agent back online after make run restarted",
                 diagnostics=lambda: platform.text[-3000:])
    finally:
        if agent is not None:
            os.killpg(agent.pid, signal.SIGTERM)
            try:
                agent.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(agent.pid, signal.SIGKILL)
        if platform.process.poll() is None:
            platform.stop()
        shutil.rmtree(work, ignore_errors=True)


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
