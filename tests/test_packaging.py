"""`pip install .` (no extras) is the edge-box and CI install: agent + fleetctl, no server stack."""

from __future__ import annotations

import json
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER_ONLY = {"django", "celery", "boto3", "botocore", "djangorestframework", "django-storages", "redis", "psycopg"}


def _copy_source(target: Path) -> Path:
    """Build from a copy: an in-tree build would write build/ and egg-info into the shared checkout."""
    ignore = shutil.ignore_patterns(".git", ".venv", "var", "tests", "__pycache__", "*.egg-info", "build", "dist",
                                    ".pytest_cache", "node_modules", "benchmarks")
    shutil.copytree(ROOT, target, ignore=ignore)
    return target


@pytest.mark.slow
def test_it_installs_the_agent_without_the_server_stack(tmp_path):
    source = _copy_source(tmp_path / "src")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"

    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]

    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    installed = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert "modelfleet" in installed
    assert not installed & SERVER_ONLY, f"the bare install pulled server packages: {installed & SERVER_ONLY}"
    # Only the agent and fleetctl land in site-packages: no top-level `config`, `web`, `registry`
    # or `ota` to clash with anything else installed on the box.
    top_level = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.distribution('modelfleet').read_text('top_level.txt'))"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert sorted(top_level) == ["agent", "fleetctl"]
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    assert not [name for name in ("config", "web", "registry", "ota") if (site / name).exists()]

    for script, expected in (("fleet-agent", "usage: fleet-agent"), ("fleetctl", "usage: fleetctl")):
        result = subprocess.run(
            [str(env_dir / "bin" / script), "--help"], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, f"{script} --help failed: {result.stderr[-2000:]}"
        assert expected in result.stdout

    # Every agent module imports in the bare install (no server stack, no onnxruntime) and pulls in
    # nothing from the server side: not Django, Celery, boto3, nor the server apps.
    modules = sorted(f"agent.{p.stem}" for p in (ROOT / "agent").glob("*.py") if p.stem != "__init__")
    assert "agent.daemon" in modules and "agent.precheck" in modules
    script = (
        f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; "
        "import fleetctl.cli, fleetctl.rollout; "
        "print(sorted(m.split('.')[0] for m in sys.modules if m.split('.')[0] in "
        "{'django', 'celery', 'boto3', 'registry', 'ota', 'config', 'web', 'onnxruntime'}))"
    )
    probe = subprocess.run(
        [str(python), "-c", script],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"
