"""What the benchmarks that run server code set up, written once: a work directory for the
server's files with throw-away signing keys, a throw-away test database, and the data two or
more of them start from (detector_releases, canary_rollout).

Imported as benchmarks._setup: each benchmark puts the repository root on sys.path first."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


def admin_client():
    """A Django test client and a new admin API token (an object with `headers`), for creating
    what a benchmark needs through the API as a user would (tests.support.rollout_data)."""
    from django.test import Client

    from registry.models import ApiToken

    secret = ApiToken.new_secret()
    ApiToken.objects.create(name="bench", scope="admin", prefix=secret[:8], token_hash=ApiToken.hash_secret(secret))

    class _Token:
        headers = {"HTTP_AUTHORIZATION": f"Bearer {secret}"}

    return Client(), _Token


def detector_releases() -> None:
    """detector 1.0 (y = 2x + 1) and 2.0 (y = 0.5x), each with one real ONNX artifact for
    hardware rpi4 and a health contract its model passes, created and released through the API
    (tests.support.rollout_data.release) with a new admin token."""
    from tests.support.rollout_data import health_for, release

    client, token = admin_client()
    release(client, token, "detector", "1.0", scale=2.0, bias=1.0, health=health_for(2.0, 1.0))
    release(client, token, "detector", "2.0", scale=0.5, bias=0.0, health=health_for(0.5, 0.0))


@dataclass
class CanaryRollout:
    """What canary_rollout made."""

    model: Any  # registry Model "detector"
    versions: dict[str, Any]  # "1.0", "2.0" -> ModelVersion
    sha: dict[str, str]  # "1.0", "2.0" -> the artifact's sha256
    ids: list[str]  # device ids, the canary first
    rollout: Any
    wave: Any  # the canary wave
    gates: dict  # both waves' gates


def canary_rollout(*, devices: int, canary: int, started_hours_ago: int, soak_seconds: int,
                   online: bool = False) -> CanaryRollout:
    """Rows for a fleet mid-rollout, written directly (bulk_create), nothing signed or sent:
    `devices` devices box-00000... (hardware bench-hw, site=berlin, online or not) and detector
    1.0 and 2.0 (released, an ONNX artifact each); the first `canary` devices run 2.0, the others
    1.0. A running rollout of 2.0, started `started_hours_ago` hours ago, whose canary wave (10 %,
    those devices, all committed) met its success gate then and soaks for `soak_seconds` from
    then, with the control-group health gate on; its second wave (100 %) has not started."""
    from datetime import timedelta

    from django.utils import timezone

    from ota.models import Device, DeviceModelState, Rollout, RolloutDevice, Wave
    from registry.models import Artifact, HardwareTarget, Model, ModelVersion

    hw = HardwareTarget.objects.create(id="bench-hw", max_artifact_bytes=10**9)
    model = Model.objects.create(name="detector")
    versions, sha = {}, {}
    for counter, v in enumerate(("1.0", "2.0"), start=1):
        versions[v] = ModelVersion.objects.create(model=model, version=v, state="released", counter=counter)
        sha[v] = f"{counter:x}" * 64
        Artifact.objects.create(version=versions[v], hardware=hw, sha256=sha[v], length=100,
                                format="onnx", file_name="model.onnx", storage_key=f"bench/{v}")
    ids = [f"box-{i:05d}" for i in range(devices)]
    Device.objects.bulk_create(
        [Device(id=d, hardware=hw, labels={"site": "berlin"}, mqtt_username=d, online=online) for d in ids],
        batch_size=2000)
    DeviceModelState.objects.bulk_create(
        [DeviceModelState(device_id=d, model=model, active_version=versions[v], active_sha256=sha[v])
         for i, d in enumerate(ids) for v in ["2.0" if i < canary else "1.0"]],
        batch_size=2000)
    started = timezone.now() - timedelta(hours=started_hours_ago)
    rollout = Rollout.objects.create(model=model, release=versions["2.0"], state=Rollout.State.RUNNING,
                                     abort_policy="pause", started_at=started)
    gates = {"success": {"min_healthy_percent": 100, "min_reachable_percent": 50},
             "failure": {"min_reports": 1, "max_failed_percent": 20, "max_failures": None},
             "soak_seconds": soak_seconds, "rate_per_minute": None,
             "timeouts": {"delivery_seconds": 3600, "download_seconds": 1800, "activate_seconds": 600,
                          "trial_seconds": 900}, "health": {"control": {}}}
    wave = Wave.objects.create(rollout=rollout, index=0, spec={"percent": 10}, gates=gates, size=canary,
                               state=Wave.State.SOAKING, started_at=started, gate_met_at=started)
    Wave.objects.create(rollout=rollout, index=1, spec={"percent": 100}, gates=gates, size=devices - canary)
    RolloutDevice.objects.bulk_create(
        [RolloutDevice(rollout=rollout, wave=wave, device_id=d, state="committed", rank=i, seq=1)
         for i, d in enumerate(ids[:canary])], batch_size=2000)
    return CanaryRollout(model=model, versions=versions, sha=sha, ids=ids, rollout=rollout, wave=wave, gates=gates)
