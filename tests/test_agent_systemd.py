"""deploy/systemd/fleet-agent.service: hardened, restarts on crashes but not on a bad config, and
systemd itself accepts every line (a typo in a hardening key is silently ignored by systemd)."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "fleet-agent.service"


def service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def test_it_hardens_the_agent_and_writes_only_its_state_dir():
    s = service()
    assert s["NoNewPrivileges"] == "yes"
    assert s["ProtectSystem"] == "strict"
    default_state = tomllib.loads((ROOT / "deploy" / "agent.example.toml").read_text())["state_dir"]
    assert s["ReadWritePaths"].split() == [default_state]
    assert s["StateDirectory"] == Path(default_state).name
    assert s["ProtectHome"] == "yes" and s["PrivateTmp"] == "yes" and s["CapabilityBoundingSet"] == ""
    assert s["User"] != "root"
    assert re.fullmatch(r"\S+/fleet-agent run --config /etc/fleet-agent/agent\.toml", s["ExecStart"])


def test_it_restarts_on_failure_but_not_on_a_bad_config_or_a_held_lock():
    s = service()
    assert s["Restart"] == "on-failure" and s["RestartSec"]
    # fleet-agent run exits 2 on a bad config and 3 when another agent holds the state dir
    # (tests/test_agent_config.py, tests/test_agent_cli.py): restarting cannot fix either.
    assert set(s["RestartPreventExitStatus"].split()) == {"2", "3"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (systemd hosts, CI)")
def test_it_passes_systemd_analyze_with_no_unknown_keys(tmp_path):
    unit = tmp_path / "fleet-agent.service"
    # verify insists that ExecStart exists; the installed path does not exist on a dev box.
    unit.write_text(re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", UNIT.read_text(), flags=re.MULTILINE))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True,
                              text=True, timeout=60, check=False)
    exposure = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout + security.stderr)
    assert exposure, security.stdout[-2000:] + security.stderr[-2000:]
    assert float(exposure.group(1)) <= 2.5, security.stdout[-3000:]
