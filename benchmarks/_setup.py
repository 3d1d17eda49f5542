"""What the benchmarks that run server code set up, written once: a work directory for the
server's files with throw-away signing keys, and a throw-away test database.

Imported as benchmarks._setup: each benchmark puts the repository root on sys.path first."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def throwaway_keys(directory: Path) -> tuple[Path, Path]:
    """A new Ed25519 release key and rollout key written to directory/release.pem and
    directory/rollout.pem (mode 0600; the directory is made if absent); returns their paths."""
    from agent.signing import generate_private_key_pem

    directory.mkdir(exist_ok=True)
    paths = directory / "release.pem", directory / "rollout.pem"
    for path in paths:
        path.write_bytes(generate_private_key_pem())
        path.chmod(0o600)
    return paths


def throwaway_workdir(prefix: str, *, signing_keys: bool = False) -> Path:
    """A new temporary directory (left in place afterwards) for the server's files: os.environ's
    ARTIFACT_DIR and UPLOAD_TEMP_DIR point into it and LOG_LEVEL is WARNING; with signing_keys,
    RELEASE_KEY_PATH and ROLLOUT_KEY_PATH name new keys in its keys/ (throwaway_keys). Call it
    before Django is set up: the settings read these when they load."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    if signing_keys:
        release_key, rollout_key = throwaway_keys(workdir / "keys")
        os.environ.update(RELEASE_KEY_PATH=str(release_key), ROLLOUT_KEY_PATH=str(rollout_key))
    os.environ.update(ARTIFACT_DIR=str(workdir / "artifacts"), UPLOAD_TEMP_DIR=str(workdir / "tmp"),
                      LOG_LEVEL="WARNING")
    return workdir


@contextmanager
def throwaway_database(
    *,
    postgresql_because: str | None = None,
    plain_static_files: bool = False,
    test_environment: bool = False,
    announce: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Django set up (DJANGO_SETTINGS_MODULE, config.settings unless set), then for the block a
    test database made anew beside the one DATABASE_URL names (Django's test_<name>; one left
    from an earlier run is dropped first), dropped again when the block ends, however it ends.

    postgresql_because: on any other database, SystemExit with this text before anything is made.
    plain_static_files: static files named as they lie in the apps (Django's StaticFilesStorage,
    as tests/conftest.py sets it), not looked up in collectstatic's manifest.
    test_environment: Django's test environment (setup_test_environment) before the database is
    made, torn down after it is dropped.
    announce: called with "creating the throw-away database" just before it is made.
    """
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.conf import settings
    from django.db import connection
    from django.test.utils import setup_test_environment, teardown_test_environment

    if postgresql_because is not None and connection.vendor != "postgresql":
        raise SystemExit(postgresql_because)
    if plain_static_files:
        settings.STORAGES = {
            **settings.STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}
        }
    if test_environment:
        setup_test_environment()
    if announce is not None:
        announce("creating the throw-away database")
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        yield
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)
        if test_environment:
            teardown_test_environment()
