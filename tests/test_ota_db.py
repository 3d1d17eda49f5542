"""ota.db.bulk_set, the one bulk UPDATE the engine and ingest use: each row gets its own values,
NULLs, JSON, timestamps and text primary keys included, across batch boundaries."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from ota.db import bulk_set
from ota.models import Device
from tests.support import web_data

pytestmark = pytest.mark.django_db


def test_it_writes_each_rows_own_values_in_batches():
    web_data.hardware("rpi5")
    ids = [f"dev-{i}" for i in range(5)]
    Device.objects.bulk_create([Device(id=i, hardware_id="rpi5", mqtt_username=i, online=True) for i in ids])
    now = timezone.now()
    rows = [
        Device(pk=i, online=n % 2 == 0, last_seen=None if n == 0 else now - timedelta(seconds=n),
               last_telemetry={"cpu": n, "note": None} if n else {}, agent_version=f"1.{n}")
        for n, i in enumerate(ids)
    ]

    with CaptureQueriesContext(connection) as queries:
        bulk_set(rows, ["online", "last_seen", "last_telemetry", "agent_version"], batch_size=2)

    stored = {d.id: d for d in Device.objects.all()}
    for n, i in enumerate(ids):
        d = stored[i]
        assert d.online is (n % 2 == 0)
        assert d.last_seen == (None if n == 0 else now - timedelta(seconds=n))
        assert d.last_telemetry == ({"cpu": n, "note": None} if n else {})
        assert d.agent_version == f"1.{n}"
    if connection.vendor == "postgresql":
        assert len(queries) == 3  # 5 rows in batches of 2: one UPDATE ... FROM (VALUES ...) each


def test_it_does_nothing_for_no_rows():
    with CaptureQueriesContext(connection) as queries:
        bulk_set([], ["online"])
    assert len(queries) == 0
