"""`manage.py keys init/show`: 0600 PEMs created once, never overwritten, ids as /api/v1/keys/ says."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from agent.signing import keyid_of, load_private_key_pem

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_keys(settings, tmp_path):
    keys_dir = tmp_path / "keys"
    settings.KEYS_DIR = keys_dir
    settings.RELEASE_KEY_PATH = keys_dir / "release.pem"
    settings.ROLLOUT_KEY_PATH = keys_dir / "rollout.pem"
    return keys_dir


def test_it_creates_both_keys_private_to_the_owner(fresh_keys, capsys):
    call_command("keys", "init")

    out = capsys.readouterr().out
    for role in ("release", "rollout"):
        path = fresh_keys / f"{role}.pem"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        key = load_private_key_pem(path.read_bytes())
        assert f"{role} key: {path} (created)" in out
        assert keyid_of(key.public_key()) in out
    assert stat.S_IMODE(fresh_keys.stat().st_mode) == 0o700


def test_it_never_overwrites_existing_keys(fresh_keys, capsys):
    call_command("keys", "init")
    before = {p.name: p.read_bytes() for p in fresh_keys.iterdir()}

    call_command("keys", "init")

    assert {p.name: p.read_bytes() for p in fresh_keys.iterdir()} == before
    assert "exists, kept" in capsys.readouterr().out


def test_it_refuses_a_key_file_that_is_not_a_key(fresh_keys):
    fresh_keys.mkdir()
    (fresh_keys / "release.pem").write_text("garbage")
    with pytest.raises(CommandError, match="not an Ed25519 private key PEM"):
        call_command("keys", "init")
    assert (fresh_keys / "release.pem").read_text() == "garbage"


@pytest.mark.django_db
def test_it_shows_the_ids_and_pems_the_api_publishes(fresh_keys, client, read_token, capsys):
    call_command("keys", "init")
    capsys.readouterr()
    call_command("keys", "show")
    out = capsys.readouterr().out

    published = client.get("/api/v1/keys/", **read_token.headers).json()
    assert {k["role"] for k in published} == {"release", "rollout"}
    for key in published:
        assert f"{key['role']} keyid {key['keyid']}" in out
        assert key["public_key_pem"].strip() in out
        assert "PRIVATE" not in out


def test_it_tells_how_to_fix_missing_keys_on_show(fresh_keys):
    with pytest.raises(CommandError, match="run `manage.py keys init`"):
        call_command("keys", "show")


def test_it_runs_as_a_real_command_with_key_paths_from_the_environment(tmp_path):
    env = {
        **os.environ,
        "SECRET_KEY": "x",
        "DATA_DIR": str(tmp_path / "data"),
        "KEYS_DIR": str(tmp_path / "k"),
        "RELEASE_KEY_PATH_FILE": str(tmp_path / "release-path"),
    }
    env.pop("DATABASE_URL", None)
    (tmp_path / "release-path").write_text(str(tmp_path / "elsewhere" / "rel.pem"))
    result = subprocess.run(
        [sys.executable, "manage.py", "keys", "init"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "elsewhere" / "rel.pem").exists() and (tmp_path / "k" / "rollout.pem").exists()
    missing = subprocess.run(
        [sys.executable, "manage.py", "keys", "show"],
        cwd=ROOT,
        env={**env, "KEYS_DIR": str(tmp_path / "empty")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1
    assert "manage.py keys init" in missing.stderr
