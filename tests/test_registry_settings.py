"""Settings from environment variables: a bad value stops start-up with a message naming the
variable; any variable may come from a NAME_FILE (mounted secrets)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = (
    "import django; django.setup()\n"
    "from django.conf import settings\n"
    "print(settings.SECRET_KEY, settings.DATABASES['default']['ENGINE'], settings.DEBUG)\n"
)


def start(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SECRET_KEY", "DATABASE_URL", "DEBUG", "ARTIFACT_", "S3_", "WEB_PORT"))}
    clean.update(DATA_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="config.settings", **env)
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=clean, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "SECRET_KEY (or SECRET_KEY_FILE) is required unless DEBUG=true"),
        ({"SECRET_KEY": "x", "DEBUG": "maybe"}, "DEBUG='maybe' is not a boolean"),
        ({"SECRET_KEY": "x", "WEB_PORT": "eighty"}, "WEB_PORT='eighty' is not an integer"),
        ({"SECRET_KEY": "x", "DATABASE_URL": "nonsense"}, "DATABASE_URL is not a database URL"),
        ({"SECRET_KEY": "x", "ARTIFACT_STORAGE": "ftp"}, "ARTIFACT_STORAGE='ftp' is not one of: filesystem, s3"),
        ({"SECRET_KEY": "x", "ARTIFACT_STORAGE": "s3", "S3_BUCKET": "b", "S3_PRESIGN_SECONDS": "5"},
         "S3_PRESIGN_SECONDS=5 is below the minimum 60"),
        ({"SECRET_KEY_FILE": "/nonexistent/secret"}, "SECRET_KEY_FILE=/nonexistent/secret: cannot read the file"),
    ],
    ids=["no-secret", "bool", "int", "database-url", "choice", "minimum", "missing-file"],
)
def test_it_stops_at_start_up_naming_the_variable(tmp_path, env, message):
    result = start(tmp_path, **env)
    assert result.returncode != 0
    assert "ConfigError" in result.stderr and message in result.stderr, result.stderr[-2000:]


def test_it_reads_secrets_from_file_variables(tmp_path):
    (tmp_path / "secret").write_text("from-a-file\n")
    result = start(tmp_path, SECRET_KEY_FILE=str(tmp_path / "secret"), DEBUG="no")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["from-a-file", "django.db.backends.sqlite3", "False"]
