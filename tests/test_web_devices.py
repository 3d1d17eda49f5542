"""Web admin fleet pages: login and roles, the overview, the filterable paginated device list and
the device page with its timeline and telemetry."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.urls import reverse
from django.utils import timezone

from ota.models import ActiveRelease, Device, DeviceEvent, DeviceModelState, Directive
from registry.models import AuditEntry
from tests.support import web_data

pytestmark = pytest.mark.django_db


def device_ids(html: str) -> list[str]:
    return re.findall(r'<td><a href="/devices/([^/]+)/">', html)


@pytest.fixture
def fleet(db):
    v1 = web_data.released("detector", "1.0.0", hardware_ids=("jetson-orin", "rpi5"))
    v2 = web_data.released("detector", "2.0.0", hardware_ids=("jetson-orin", "rpi5"), scale=3.0)
    rows = []
    for i in range(120):
        hw = "jetson-orin" if i % 2 == 0 else "rpi5"
        rows.append(Device(
            id=f"cam-{i:03d}", hardware_id=hw, mqtt_username=f"cam-{i:03d}", online=i % 3 != 0,
            labels={"site": "berlin" if i < 60 else "paris", **({"camera": "front"} if i % 4 == 0 else {})},
            state="revoked" if i == 119 else "active",
        ))
    Device.objects.bulk_create(rows)
    DeviceModelState.objects.bulk_create([
        DeviceModelState(device=d, model=v1.model, active_version=v2 if i < 10 else v1, active_sha256="a" * 64)
        for i, d in enumerate(rows)
    ])
    return {"v1": v1, "v2": v2}


GET_PAGES = ["overview", "devices", "rollouts", "rollout_new", "models", "audit"]


@pytest.mark.parametrize("name", GET_PAGES)
def test_it_sends_anonymous_visitors_to_the_login_page(client, name):
    response = client.get(reverse(f"web:{name}"))
    assert response.status_code == 302 and response["Location"].startswith("/login/?next=")


def test_it_signs_in_with_a_password_and_out_with_a_post(client, viewer):
    page = client.get("/login/")
    assert 'name="csrfmiddlewaretoken"' in page.content.decode()
    bad = client.post("/login/", {"username": "victor-viewer", "password": "wrong"})
    assert "Please enter a correct username and password" in bad.content.decode()

    response = client.post("/login/?next=/devices/", {"username": "victor-viewer", "password": "victor-viewer-password-123", "next": "/devices/"})
    assert response.status_code == 302 and response["Location"] == "/devices/"
    assert 'data-role>viewer</span>' in client.get("/").content.decode()

    assert client.get("/logout/").status_code == 405  # signing out changes state: POST only
    assert client.post("/logout/").status_code == 302
    assert client.get("/").status_code == 302


def test_it_refuses_a_signed_in_user_without_a_role(client):
    nobody = User.objects.create_user("nobody", password="x")
    client.force_login(nobody)
    response = client.get("/")
    assert response.status_code == 403 and "needs the &#x27;read&#x27; role" in response.content.decode()


def test_it_gives_admins_a_link_to_the_django_admin(client, viewer):
    admin = User.objects.create_superuser("root", password="x")
    client.force_login(admin)
    assert 'href="/admin/"' in client.get("/").content.decode()
    client.force_login(viewer)
    assert 'href="/admin/"' not in client.get("/").content.decode()


def test_it_shows_the_fleet_at_a_glance(client, viewer, fleet):
    from ota.rollouts.actions import rollout_start
    from ota.rollouts.create import rollout_create

    rollout = rollout_create(
        model="detector", version="2.0.0", target={"labels": {"site": "paris"}}, waves=[{"percent": 100}], actor="user:x"
    )
    rollout_start(rollout_id=rollout.pk, actor="user:x")
    AuditEntry.objects.create(actor="system", action="rollout.auto_pause", object_type="rollout", object_id=str(rollout.pk),
                              reason="wave 0 failure gate: 3 of 4 reporting devices failed")
    client.force_login(viewer)

    html = client.get("/").content.decode()

    assert "<b data-online>79</b>" in html and "<b data-offline>40</b>" in html  # 119 active, every third offline
    assert f'<a href="/rollouts/{rollout.pk}/">#{rollout.pk}' in html
    assert "wave 0 failure gate: 3 of 4 reporting devices failed" in html
    chart = re.search(r'<script id="version-chart" type="application/json">(.*?)</script>', html).group(1)
    assert '"detector@1.0.0"' in chart and '"detector@2.0.0"' in chart and "[109, 10]" in chart
    by_hardware = json.loads(re.search(r'<script id="hardware-chart" type="application/json">(.*?)</script>', html).group(1))
    data = by_hardware["data"]
    online, offline = (dict(zip(data["labels"], d["data"], strict=True)) for d in data["datasets"])
    assert (online, offline) == ({"jetson-orin": 40, "rpi5": 39}, {"jetson-orin": 20, "rpi5": 20})


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"labels": "site=paris"}, 60),  # revoked devices are listed too, unless the state filter says otherwise
        ({"labels": "site=paris", "state": "active"}, 59),
        ({"labels": "camera"}, 30),
        ({"labels": "site=berlin, camera=front"}, 15),
        ({"hardware": "rpi5"}, 60),
        ({"state": "revoked"}, 1),
        ({"online": "no"}, 40),
        ({"online": "yes", "hardware": "jetson-orin"}, 40),
        ({"version": "detector@2.0.0"}, 10),
        ({"version": "1.0.0"}, 110),
        ({"q": "cam-11"}, 10),
    ],
)
def test_it_filters_the_device_list(client, viewer, fleet, query, expected):
    client.force_login(viewer)
    html = client.get("/devices/", query).content.decode()
    count = int(re.search(r"(\d+) devices?</p>", html).group(1))
    assert count == expected


def test_it_pages_through_the_list_and_keeps_the_filters(client, viewer, fleet):
    client.force_login(viewer)
    first = client.get("/devices/", {"hardware": "jetson-orin"}).content.decode()
    assert device_ids(first)[:3] == ["cam-000", "cam-002", "cam-004"] and len(device_ids(first)) == 50
    assert "page 1 of 2" in first
    assert 'href="?hardware=jetson-orin&amp;page=2"' in first

    second = client.get("/devices/", {"hardware": "jetson-orin", "page": 2}).content.decode()
    assert len(device_ids(second)) == 10 and device_ids(second)[-1] == "cam-118"

    fragment = client.get("/devices/", {"hardware": "rpi5"}, HTTP_HX_REQUEST="true").content.decode()
    assert "<html" not in fragment and len(device_ids(fragment)) == 50  # htmx swaps only the table


def test_it_explains_a_bad_label_filter(client, viewer, fleet):
    client.force_login(viewer)
    html = client.get("/devices/", {"labels": "site=berlin, bad key"}).content.decode()
    assert "labels: &#x27;bad key&#x27; is not key=value or key" in html
    assert device_ids(html) == []


def test_it_renders_the_first_page_of_a_large_fleet_in_a_fixed_number_of_queries(client, viewer, fleet, django_assert_max_num_queries):
    client.force_login(viewer)
    client.get("/devices/")
    with django_assert_max_num_queries(9):
        client.get("/devices/")


def test_it_shows_a_device_timeline_and_its_latest_telemetry(client, viewer, fleet):
    device = Device.objects.get(pk="cam-000")
    now = timezone.now()
    device.last_telemetry = {"cpu_percent": 37.5, "memory_percent": 61.0, "disk_percent": 20.0, "temperature_c": 58.1,
                             "active": {"detector": "a" * 64}, "health": {"error_rate": 0.01}}
    device.last_telemetry_at = now
    device.save()
    v1, v2 = fleet["v1"], fleet["v2"]
    ActiveRelease.objects.create(device=device, model=v1.model, version=v1, sha256="a" * 64,
                                 from_time=now - timedelta(days=3), to_time=now - timedelta(hours=1))
    ActiveRelease.objects.create(device=device, model=v1.model, version=v2, sha256="b" * 64, from_time=now - timedelta(hours=1))
    Directive.objects.create(device=device, seq=7, kind="update", version=v2, payload_sha256="c" * 64, envelope={},
                             created_at=now - timedelta(hours=2), published_at=now - timedelta(hours=2))
    DeviceEvent.objects.create(device=device, event_no=1, seq=7, model="detector", state="trial",
                               received_at=now - timedelta(minutes=90), health={"latency_ms_p95": 31.0, "error_rate": 0.0})
    DeviceEvent.objects.create(device=device, event_no=2, seq=7, model="detector", state="committed",
                               received_at=now - timedelta(minutes=61), health={"latency_ms_p95": 29.0, "error_rate": 0.01})
    client.force_login(viewer)

    html = client.get("/devices/cam-000/").content.decode()

    kinds = re.findall(r'<li data-kind="(\w+)">', html)
    assert kinds == ["version", "version", "event", "event", "directive", "version"]
    assert "started running detector@2.0.0" in html and "stopped running detector@1.0.0" in html
    assert "update directive seq 7: detector@2.0.0" in html
    assert "detector: committed" in html
    for figure in ("CPU %: <b>37.5</b>", "Memory %: <b>61.0</b>", "Temperature °C: <b>58.1</b>"):
        assert figure in html
    assert 'data-chart="telemetry-cpu_percent"' in html and 'id="telemetry-cpu_percent"' in html
    health = re.search(r'<script id="device-health" type="application/json">(.*?)</script>', html).group(1)
    assert '"latency_ms_p95"' in health and "[31.0, 29.0]" in health
    assert client.get("/devices/ghost/").status_code == 404


def chart_data(html: str, chart_id: str) -> dict:
    found = re.search(rf'<script id="{chart_id}" type="application/json">(.*?)</script>', html)
    return json.loads(found.group(1))


def test_it_charts_a_devices_model_metrics_per_hour_with_its_release_changes(client, viewer, fleet):
    from ota.models import ModelMetricsHour
    from tests.support.model_metrics import ingest, metrics_message

    v1, v2 = fleet["v1"], fleet["v2"]
    old_sha, new_sha = (v.artifacts.get(hardware_id="jetson-orin").sha256 for v in (v1, v2))
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    reports = [  # release, minutes before this hour, latency, requests, errors
        (old_sha, 170, 20, 200, 2),
        (old_sha, 110, 20, 100, 0),
        (new_sha, 80, 40, 50, 5),  # the hour it updated: both releases report, then only the new one
        (new_sha, 50, 40, 100, 10),
    ]
    ingest([
        metrics_message("cam-000", sha, at=hour - timedelta(minutes=ago), latency_ms=ms, requests=n, errors=e)
        for sha, ago, ms, n, e in reports
    ])
    assert ModelMetricsHour.objects.filter(device_id="cam-000").count() == 4
    ActiveRelease.objects.create(device_id="cam-000", model=v1.model, version=v2, sha256=new_sha,
                                 from_time=hour - timedelta(hours=2, minutes=-35))
    client.force_login(viewer)

    html = client.get("/devices/cam-000/").content.decode()

    card = html[html.index('<section class="card model-metrics"'):]
    card = card[:card.index("</section>")]
    rows = re.findall(r'<tr data-release="([^"]+)"( class="release-change")?>\s*<td>([^<]+)</td>', card)
    assert [(release, bool(changed)) for release, changed, _ in rows] == [
        ("2.0.0", False), ("2.0.0", True), ("1.0.0", False), ("1.0.0", False)]
    newest = card[card.index('<tr data-release="2.0.0">'):]
    # 100 requests, 10 errors, latencies 36..43.2 ms: p50 ~ 40, p95 ~ 43 (DDSketch, 1 % accuracy).
    cells = re.findall(r"<td>([^<]*)</td>", newest[:newest.index("</tr>")])
    assert cells[2:5] == ["100", "10", "10.00 %"], cells
    assert 39 <= float(cells[5]) <= 41 and 42 <= float(cells[6]) <= 44, cells
    latency = chart_data(html, "metrics-latency-detector")
    labels = latency["data"]["labels"]
    assert len(labels) == 4 and labels[1][1] == "▶ 2.0.0" and isinstance(labels[0], str)  # the change marked
    sets = {d["label"]: d["data"] for d in latency["data"]["datasets"]}
    assert sets["p50 · 1.0.0"][2] is None and 19 <= sets["p50 · 1.0.0"][0] <= 21
    assert sets["p50 · 2.0.0"][:2] == [None, sets["p50 · 2.0.0"][1]] and 39 <= sets["p50 · 2.0.0"][1] <= 41
    assert sets["p95 · 1.0.0"][3] is None  # no row that hour: a gap, not a zero
    traffic = chart_data(html, "metrics-traffic-detector")
    requests, error_rate = (d["data"] for d in traffic["data"]["datasets"])
    assert requests == [200, 150, 100, None] and error_rate == [1.0, round(500 / 150, 3), 10.0, None]
