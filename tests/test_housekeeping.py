"""Housekeeping (ota/housekeeping.py, Celery task ota.tasks.housekeeping): old device events and
superseded directives are pruned in bounded batches; what a running rollout, the broker's
retained message or the device's current state needs is kept; release history and the audit log
are never touched; two runs at once neither fail nor delete (or count) a row twice."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

ROOT = Path(__file__).resolve().parent.parent
OLD = timedelta(days=100)  # past the 90-day retention the tests use
RECENT = timedelta(days=10)


@pytest.fixture
def retention(settings):
    settings.EVENT_RETENTION_DAYS = 90
    settings.DIRECTIVE_RETENTION_DAYS = 90
    settings.METRICS_RETENTION_DAYS = 30
    settings.HOUSEKEEPING_BATCH_SIZE = 1000
    settings.HOUSEKEEPING_TIME_BUDGET_SECONDS = 60
    return settings


class Fleet:
    """Rows made straight through the ORM: two models with two versions each, devices, events,
    directives, rollouts."""

    def __init__(self):
        from registry.models import HardwareTarget, Model, ModelVersion

        self.hw = HardwareTarget.objects.create(id="hk-box", max_artifact_bytes=10**6)
        self.versions = {}
        for name in ("detector", "vad"):
            model = Model.objects.create(name=name)
            for counter in (1, 2, 3):
                self.versions[(name, counter)] = ModelVersion.objects.create(
                    model=model, version=str(counter), counter=counter, state=ModelVersion.State.RELEASED
                )
        self.event_no: dict[str, int] = {}
        self.seq: dict[str, int] = {}

    def device(self, device_id: str):
        from ota.models import Device

        return Device.objects.create(id=device_id, hardware=self.hw, mqtt_username=device_id)

    def events(self, device_id: str, count: int, *, age: timedelta, model: str = "detector",
               rollout_id: str = "", seq: int = 1) -> list[int]:
        from ota.models import DeviceEvent

        at = timezone.now() - age
        rows = []
        for _ in range(count):
            self.event_no[device_id] = self.event_no.get(device_id, 0) + 1
            rows.append(DeviceEvent(device_id=device_id, event_no=self.event_no[device_id], seq=seq,
                                    model=model, state="downloading", rollout_id=rollout_id, received_at=at))
        return [e.pk for e in DeviceEvent.objects.bulk_create(rows)]

    def directive(self, device_id: str, model: str, counter: int, *, age: timedelta, published: bool = True,
                  rollout=None) -> int:
        from ota.models import Directive

        self.seq[device_id] = self.seq.get(device_id, 0) + 1
        at = timezone.now() - age
        return Directive.objects.create(
            device_id=device_id, seq=self.seq[device_id], rollout=rollout,
            version=self.versions[(model, counter)], payload_sha256="0" * 64,
            envelope={"payloadType": "test", "payload": "", "signatures": []},
            created_at=at, published_at=at if published else None,
        ).pk

    def rollout(self, state: str, model: str = "detector", counter: int = 2):
        from ota.models import Rollout, Wave

        version = self.versions[(model, counter)]
        rollout = Rollout.objects.create(release=version, model=version.model, state=state)
        Wave.objects.create(rollout=rollout, index=0, state=Wave.State.RUNNING)
        return rollout

    def assign(self, rollout, device_id: str, state: str):
        from ota.models import RolloutDevice

        return RolloutDevice.objects.create(rollout=rollout, wave=rollout.waves.get(), device_id=device_id,
                                            rank=0, state=state, seq=1)


def remaining_events(device_id: str) -> list[int]:
    from ota.models import DeviceEvent

    return sorted(DeviceEvent.objects.filter(device_id=device_id).values_list("event_no", flat=True))


def deletes(queries) -> list[str]:
    return [q["sql"] for q in queries.captured_queries if q["sql"].lstrip().upper().startswith("DELETE")]


@pytest.mark.django_db
def test_it_prunes_old_events_and_keeps_recent_ones_and_the_newest_per_device_and_model(retention):
    from ota.housekeeping import housekeeping_run

    fleet = Fleet()
    fleet.device("box-1")
    fleet.events("box-1", 5, age=OLD)  # event_no 1-5
    fleet.events("box-1", 2, age=RECENT)  # 6-7
    fleet.events("box-1", 3, age=OLD, model="vad")  # 8-10: the newest vad report (10) is old, and kept
    fleet.device("box-2")
    fleet.events("box-2", 4, age=OLD)  # 1-4, all old: 4 explains the state box-2 is in

    result = housekeeping_run()

    assert remaining_events("box-1") == [6, 7, 10]
    assert remaining_events("box-2") == [4]
    assert (result.events, result.directives, result.finished) == (5 + 2 + 3, 0, True)


@pytest.mark.django_db
def test_it_keeps_the_events_of_devices_in_flight_and_of_open_rollouts_until_they_finish(retention):
    from ota.housekeeping import housekeeping_run
    from ota.models import Rollout, RolloutDevice

    fleet = Fleet()
    for device_id in ("flying", "reverting", "committed", "bystander"):
        fleet.device(device_id)
        fleet.events(device_id, 3, age=OLD)
    running, paused = fleet.rollout(Rollout.State.RUNNING), fleet.rollout(Rollout.State.PAUSED)
    flying = fleet.assign(running, "flying", RolloutDevice.State.DOWNLOADING)
    fleet.assign(paused, "reverting", RolloutDevice.State.REVERTING)
    # Its update is done, but the running rollout's health figures come from its reports.
    fleet.assign(running, "committed", RolloutDevice.State.COMMITTED)
    fleet.events("committed", 2, age=OLD, rollout_id=str(running.pk), seq=2)  # 4-5
    fleet.events("committed", 1, age=OLD, seq=3)  # 6: newest, about something else

    housekeeping_run()

    assert remaining_events("flying") == [1, 2, 3]
    assert remaining_events("reverting") == [1, 2, 3]
    assert remaining_events("committed") == [4, 5, 6]
    assert remaining_events("bystander") == [3]

    # Once the rollout is over, nothing holds them any more.
    flying.state = RolloutDevice.State.COMMITTED
    flying.save()
    Rollout.objects.filter(pk=running.pk).update(state=Rollout.State.COMPLETED)
    housekeeping_run()
    assert remaining_events("flying") == [3]
    assert remaining_events("committed") == [6]
    assert remaining_events("reverting") == [1, 2, 3]


@pytest.mark.django_db
def test_it_prunes_superseded_published_directives_and_keeps_the_newest_per_device_and_model(retention):
    from ota.housekeeping import housekeeping_run
    from ota.models import Directive, Rollout

    fleet = Fleet()
    fleet.device("box-1")
    gone = [fleet.directive("box-1", "detector", counter, age=OLD) for counter in (1, 2)]
    # Superseded only by an unpublished one (the reconciler's to send): still what the broker retains.
    vad_retained = fleet.directive("box-1", "vad", 1, age=OLD)
    unpublished = fleet.directive("box-1", "vad", 2, age=OLD, published=False)
    running = fleet.rollout(Rollout.State.RUNNING)
    of_running = fleet.directive("box-1", "detector", 2, age=OLD, rollout=running)
    recent_superseded = fleet.directive("box-1", "detector", 3, age=RECENT)
    detector_newest = fleet.directive("box-1", "detector", 1, age=RECENT)
    fleet.device("box-2")
    lonely = fleet.directive("box-2", "detector", 1, age=OLD)  # old, but what box-2 was last told
    superseded_by_vad_2 = fleet.directive("box-2", "vad", 1, age=OLD)
    fleet.directive("box-2", "vad", 2, age=OLD)

    result = housekeeping_run()

    left = set(Directive.objects.values_list("pk", flat=True))
    assert not left & set(gone) and superseded_by_vad_2 not in left
    assert {vad_retained, unpublished, of_running, recent_superseded, detector_newest, lonely} <= left
    assert result.directives == 3 and len(left) == 7


@pytest.mark.django_db
def test_it_never_touches_release_history_or_the_audit_log(retention):
    from ota.housekeeping import housekeeping_run
    from ota.models import ActiveRelease
    from registry.audit import audit_record
    from registry.models import AuditEntry

    fleet = Fleet()
    device = fleet.device("box-1")
    fleet.events("box-1", 5, age=OLD)
    fleet.directive("box-1", "detector", 1, age=OLD)
    fleet.directive("box-1", "detector", 2, age=OLD)
    long_ago = timezone.now() - timedelta(days=3000)
    version = fleet.versions[("detector", 1)]
    ActiveRelease.objects.create(device=device, model=version.model, version=version, sha256="a" * 64,
                                 from_time=long_ago, to_time=long_ago + timedelta(days=1))
    ActiveRelease.objects.create(device=device, model=version.model, version=version, sha256="b" * 64,
                                 from_time=long_ago + timedelta(days=1))
    entry = audit_record(actor="system", action="test.old", obj=device, reason="long ago")
    AuditEntry.objects.filter(pk=entry.pk).update(created_at=long_ago)
    history = list(ActiveRelease.objects.order_by("pk").values())
    audit = list(AuditEntry.objects.order_by("pk").values())

    result = housekeeping_run(event_retention_days=1, directive_retention_days=1)

    assert (result.events, result.directives) == (4, 1)
    assert list(ActiveRelease.objects.order_by("pk").values()) == history
    assert list(AuditEntry.objects.order_by("pk").values()) == audit


@pytest.mark.django_db
def test_it_deletes_in_bounded_batches_and_leaves_the_rest_when_its_time_is_up(retention):
    from ota.housekeeping import housekeeping_run

    fleet = Fleet()
    fleet.device("box-1")
    fleet.events("box-1", 36, age=OLD)  # 35 prunable, the newest kept

    with CaptureQueriesContext(connection) as queries:
        result = housekeeping_run(batch_size=10, directive_retention_days=0)
    assert result.events == 35 and result.finished
    assert len(deletes(queries)) == 4  # 10 + 10 + 10 + 5

    fleet.events("box-1", 35, age=OLD)
    first = housekeeping_run(batch_size=10, time_budget=0)  # one batch, then the budget is spent
    assert (first.events, first.finished) == (10, False)
    second = housekeeping_run(batch_size=10)
    assert (second.events, second.finished) == (25, True)
    assert remaining_events("box-1") == [71]


@pytest.mark.django_db
def test_it_is_idempotent_and_logs_at_info_only_when_it_pruned_something(retention, caplog):
    from ota.housekeeping import housekeeping_run

    fleet = Fleet()
    fleet.device("box-1")
    fleet.events("box-1", 4, age=OLD)
    fleet.directive("box-1", "detector", 1, age=OLD)
    fleet.directive("box-1", "detector", 2, age=OLD)

    with caplog.at_level(logging.DEBUG, logger="ota.housekeeping"):
        first = housekeeping_run()
        infos = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
        caplog.clear()
        with CaptureQueriesContext(connection) as queries:
            again = housekeeping_run()
    assert (first.events, first.directives) == (3, 1)
    assert len(infos) == 1 and infos[0].startswith(
        "housekeeping: pruned 3 device events older than 90 days and 1 superseded directives older than "
        "90 days in ")
    assert (again.events, again.directives, again.finished) == (0, 0, True)
    assert not deletes(queries)
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]


@pytest.mark.django_db
def test_it_does_nothing_while_another_run_holds_the_lock(retention):
    from ota.housekeeping import LOCK_KEY, housekeeping_run

    fleet = Fleet()
    fleet.device("box-1")
    fleet.events("box-1", 4, age=OLD)
    other = connections.create_connection("default")  # another worker's session
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", [LOCK_KEY])
        skipped = housekeeping_run()
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [LOCK_KEY])
    finally:
        other.close()
    assert (skipped.claimed, skipped.events) == (False, 0)
    assert remaining_events("box-1") == [1, 2, 3, 4]
    assert housekeeping_run().events == 3


@pytest.mark.django_db(transaction=True)
def test_it_lets_two_concurrent_runs_prune_each_row_once_without_failing(retention):
    from ota.housekeeping import housekeeping_run
    from ota.models import DeviceEvent, Directive

    fleet = Fleet()
    for i in range(4):
        fleet.device(f"box-{i}")
        fleet.events(f"box-{i}", 101, age=OLD)
        for counter in (1, 2, 3):
            fleet.directive(f"box-{i}", "detector", counter, age=OLD)
    barrier = threading.Barrier(2)
    results, errors = [], []

    def run() -> None:
        try:
            barrier.wait()
            results.append(housekeeping_run(batch_size=7))
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert errors == []
    assert sum(r.events for r in results) == 4 * 100 and sum(r.directives for r in results) == 4 * 2
    assert DeviceEvent.objects.count() == 4 and Directive.objects.count() == 4


def test_it_is_a_celery_task_beat_runs_every_hour():
    from config.celery import app

    entries = [e for e in app.conf.beat_schedule.values() if e["task"] == "ota.tasks.housekeeping"]
    assert [e["schedule"] for e in entries] == [3600.0]
    assert "ota.tasks.housekeeping" in app.tasks


@pytest.mark.django_db
def test_it_runs_as_the_task_and_returns_what_it_did(retention):
    from ota.rollouts.tasks import housekeeping

    fleet = Fleet()
    fleet.device("box-1")
    fleet.events("box-1", 3, age=OLD)
    outcome = housekeeping.apply().get()
    assert {k: outcome[k] for k in ("claimed", "events", "directives", "finished")} == {
        "claimed": True, "events": 2, "directives": 0, "finished": True}


PROBE = (
    "import django; django.setup()\n"
    "from django.conf import settings\n"
    "from config.celery import app\n"
    "print(settings.EVENT_RETENTION_DAYS, settings.DIRECTIVE_RETENTION_DAYS,\n"
    "      settings.HOUSEKEEPING_BATCH_SIZE, settings.HOUSEKEEPING_TIME_BUDGET_SECONDS,\n"
    "      app.conf.beat_schedule['housekeeping']['schedule'])\n"
)


def settings_probe(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("EVENT_RETENTION", "DIRECTIVE_RETENTION", "HOUSEKEEPING_"))}
    clean.update(DATA_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="config.settings", SECRET_KEY="x", **env)
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=clean, capture_output=True, text=True,
                          timeout=60, check=False)


def test_it_reads_its_settings_with_documented_defaults(tmp_path):
    result = settings_probe(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["90", "90", "1000", "60", "3600.0"]
    readme = (ROOT / "README.md").read_text()
    for row in ("| `EVENT_RETENTION_DAYS` | `90` |", "| `DIRECTIVE_RETENTION_DAYS` | `90` |",
                "| `HOUSEKEEPING_INTERVAL_SECONDS` | `3600` |", "| `HOUSEKEEPING_BATCH_SIZE` | `1000` |",
                "| `HOUSEKEEPING_TIME_BUDGET_SECONDS` | `60` |"):
        assert row in readme


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EVENT_RETENTION_DAYS": "-1"}, "EVENT_RETENTION_DAYS=-1 is below the minimum 0"),
        ({"DIRECTIVE_RETENTION_DAYS": "a week"}, "DIRECTIVE_RETENTION_DAYS='a week' is not an integer"),
        ({"HOUSEKEEPING_BATCH_SIZE": "0"}, "HOUSEKEEPING_BATCH_SIZE=0 is below the minimum 1"),
        ({"HOUSEKEEPING_TIME_BUDGET_SECONDS": "7200"},
         "HOUSEKEEPING_TIME_BUDGET_SECONDS=7200 is above the maximum 3600"),
        ({"HOUSEKEEPING_INTERVAL_SECONDS": "5"}, "HOUSEKEEPING_INTERVAL_SECONDS=5 is below the minimum 60"),
    ],
    ids=["negative", "not-a-number", "empty-batch", "budget-over-an-hour", "interval-too-short"],
)
def test_it_refuses_bad_housekeeping_settings_at_start_up(tmp_path, env, message):
    result = settings_probe(tmp_path, **env)
    assert result.returncode != 0
    assert "ConfigError" in result.stderr and message in result.stderr, result.stderr[-2000:]


@pytest.mark.django_db
def test_it_prunes_hours_of_model_metrics_past_their_retention(retention):
    from ota.housekeeping import housekeeping_run
    from ota.models import ModelMetricsHour

    Fleet().device("box-1")
    now = timezone.now().replace(minute=0, second=0, microsecond=0)
    for days in (31, 40, 29, 0):
        ModelMetricsHour.objects.create(device_id="box-1", model="detector", release_sha256="a" * 64,
                                        hour=now - timedelta(days=days), requests=10)
    result = housekeeping_run()
    assert result.metrics_hours == 2
    kept = sorted((now - h).days for h in ModelMetricsHour.objects.values_list("hour", flat=True))
    assert kept == [0, 29]
