"""Rollout wizard and rollout page through the Django test client: validation messages next to
their fields, the live target preview, review then create, role checks on every action."""

from __future__ import annotations

import re

import pytest
from django.test import Client
from django.urls import reverse

from ota.models import Device, Rollout
from registry.models import AuditEntry
from tests.support import web_data

pytestmark = pytest.mark.django_db


def make_devices(count, *, hardware="jetson-orin", labels=None, prefix="cam"):
    web_data.hardware(hardware)
    ids = [f"{prefix}-{i:03d}" for i in range(count)]
    Device.objects.bulk_create(
        [Device(id=i, hardware_id=hardware, labels=dict(labels or {}), mqtt_username=i) for i in ids]
    )
    return ids


def wizard_data(release, **overrides):
    data = {
        "release": release.pk,
        "name": "",
        "target_labels": "site=berlin",
        "target_devices": "",
        "waves": "canary 2 → 50% → 100%",
        "success_percent": "100",
        "failure_min_reports": "1",
        "failure_percent": "10",
        "failure_count": "",
        "soak_seconds": "0",
        "rate_per_minute": "",
        "download_seconds": "600",
        "activate_seconds": "300",
        "trial_seconds": "60",
        "abort_policy": "revert",
    }
    data.update(overrides)
    return data


def errors_for(html: str, field: str) -> list[str]:
    block = re.search(rf'data-error-for="{field}">(.*?)</ul>', html, re.DOTALL)
    return re.findall(r"<li>(.*?)</li>", block.group(1), re.DOTALL) if block else []


@pytest.fixture
def fleet(db):
    release = web_data.released("detector", "2.0.0", hardware_ids=("jetson-orin",))
    make_devices(10, hardware="jetson-orin", labels={"site": "berlin"})
    make_devices(3, hardware="rpi5", labels={"site": "berlin"}, prefix="pi")
    make_devices(4, hardware="jetson-orin", labels={"site": "paris"}, prefix="par")
    return release


def test_it_previews_matches_per_hardware_and_incompatible_devices(client, operator, fleet):
    client.force_login(operator)
    html = client.get(
        reverse("web:rollout_preview"), {"release": fleet.pk, "target_labels": "site=berlin", "waves": "canary 2 → 100%"},
        HTTP_HX_REQUEST="true",
    ).content.decode()

    assert re.search(r"<b data-matched>13</b>", html)
    assert re.search(r"<b data-compatible>10</b>", html)
    assert re.search(r"<b data-incompatible>3</b>", html)
    assert re.search(r'data-hardware="jetson-orin"><td>jetson-orin</td><td>10</td><td>0</td>', html)
    assert re.search(r'data-hardware="rpi5"><td>rpi5</td><td>3</td><td><span class="badge bad">3</span>', html)
    assert "canary: 2 devices → 2" in html and "up to 100 % of the target → 8" in html

    waiting = client.get(reverse("web:rollout_preview"), {"target_labels": "site=berlin"}).content.decode()
    assert "Pick a released version to see which devices can take it." in waiting and "errorlist" not in waiting
    bad = client.get(reverse("web:rollout_preview"), {"release": fleet.pk, "target_labels": "site"}).content.decode()
    assert "Give a value for site (key=value)." in bad


def test_it_shows_invalid_input_next_to_its_field(client, operator, fleet):
    client.force_login(operator)
    url = reverse("web:rollout_new")

    html = client.post(url, wizard_data(fleet, target_labels="", waves="canary 2 → ten", success_percent="150")).content.decode()
    assert errors_for(html, "target") == ["Choose the target: labels, hardware and/or a device list."]
    assert errors_for(html, "waves") == [
        "Wave 2: &#x27;ten&#x27; is not understood. Use N%, +N, canary N or NAME: ..."
    ]
    assert errors_for(html, "success_percent") == ["Ensure this value is less than or equal to 100."]

    # Rules only ota.rollouts knows come back next to their field too.
    response = client.post(url, wizard_data(fleet, waves="50% → 20% → 100%"))
    assert response.status_code == 400
    assert errors_for(response.content.decode(), "waves") == [
        "Wave 2: percentages are cumulative and must increase: 20 follows 50"
    ]
    html = client.post(url, wizard_data(fleet, target_labels="site=tokyo")).content.decode()
    assert "matches no active device" in errors_for(html, "target")[0]
    html = client.post(url, wizard_data(fleet, target_labels="", target_devices="cam-000 ghost-1")).content.decode()
    assert errors_for(html, "target_devices") == ["unknown or revoked devices: ghost-1"]
    assert not Rollout.objects.exists()


def test_it_reviews_then_creates_the_rollout(client, operator, fleet):
    client.force_login(operator)
    url = reverse("web:rollout_new")
    data = wizard_data(fleet, name="berlin cams", rate_per_minute="60")

    review = client.post(url, {**data, "step": "review"})
    html = review.content.decode()
    assert review.status_code == 200 and 'id="create-form"' in html
    assert "13 matched, 10 compatible, <b>10</b> in the waves" in html
    assert "pi-000 (rpi5)" in html  # incompatible devices are listed, not skipped silently
    assert not Rollout.objects.exists()

    created = client.post(url, {**data, "step": "create"})
    rollout = Rollout.objects.get()
    assert created.status_code == 302 and created["Location"] == reverse("web:rollout", args=[rollout.pk])
    assert rollout.name == "berlin cams" and rollout.abort_policy == "revert" and rollout.state == "created"
    assert [w.size for w in rollout.waves.order_by("index")] == [2, 3, 5]
    assert rollout.gates["rate_per_minute"] == 60 and rollout.gates["soak_seconds"] == 0
    assert rollout.gates["failure"] == {"min_reports": 1, "max_failed_percent": 10.0, "max_failures": None}
    assert AuditEntry.objects.filter(action="rollout.create", actor="user:olivia-operator").exists()


def test_it_refuses_a_second_rollout_on_busy_devices_next_to_the_target(client, operator, fleet):
    from ota.rollouts.actions import rollout_start
    from ota.rollouts.create import rollout_create

    first = rollout_create(
        model="detector", version="2.0.0", target={"labels": {"site": "berlin"}}, waves=[{"percent": 100}],
        actor="user:x",
    )
    rollout_start(rollout_id=first.pk, actor="user:x")
    client.force_login(operator)

    html = client.post(reverse("web:rollout_new"), {**wizard_data(fleet), "step": "create"}).content.decode()

    assert "already in a running rollout of this model" in errors_for(html, "target")[0]


def test_it_reviews_busy_devices_exactly_as_the_create_decides(client, operator, fleet):
    # One plan (ota.rollouts.planning.rollout_plan) behind the preview, the review and the
    # create: a device busy in another rollout but in none of this plan's waves is no conflict.
    from ota.rollouts.actions import rollout_start
    from ota.rollouts.create import rollout_create

    first = rollout_create(
        model="detector", version="2.0.0", target={"devices": ["cam-000"]}, waves=[{"percent": 100}], actor="user:x"
    )
    rollout_start(rollout_id=first.pk, actor="user:x")
    client.force_login(operator)
    data = wizard_data(fleet, waves="canary: cam-001, cam-002")

    review = client.post(reverse("web:rollout_new"), {**data, "step": "review"}).content.decode()
    preview = client.get(reverse("web:rollout_preview"), data, HTTP_HX_REQUEST="true").content.decode()
    created = client.post(reverse("web:rollout_new"), {**data, "step": "create"})

    assert "already in a running rollout" not in review and "in a running rollout" not in preview
    assert created.status_code == 302
    assert Rollout.objects.get(pk=int(created["Location"].rstrip("/").split("/")[-1])).assignments.count() == 2


def test_it_shows_action_buttons_with_confirmations_to_operators_only(client, operator, viewer, fleet):
    from ota.rollouts.create import rollout_create

    rollout = rollout_create(
        model="detector", version="2.0.0", target={"labels": {"site": "berlin"}},
        waves=[{"name": "canary", "count": 2}, {"percent": 100}], actor="user:x",
    )
    url = reverse("web:rollout", args=[rollout.pk])
    client.force_login(operator)
    html = client.get(url).content.decode()
    assert 'data-action="start"' in html
    assert (
        f"Start rollout #{rollout.pk}? detector@2.0.0 goes to 10 devices in 2 waves, beginning with wave 1 (canary, 2 devices)."
        in html
    )

    client.force_login(viewer)
    html = client.get(url).content.decode()
    assert "data-action=" not in html and 'id="rollout-actions"' not in html
    assert 'id="waves"' in html  # but the viewer sees the progress


@pytest.mark.parametrize("action", ["start", "pause", "resume", "advance", "retry", "abort", "rollback", "approve"])
def test_it_answers_403_to_a_viewers_forged_post_with_a_valid_csrf_token(viewer, fleet, action):
    from ota.rollouts.catalogue import BY_NAME
    from ota.rollouts.create import rollout_create

    rollout = rollout_create(
        model="detector", version="2.0.0", target={"labels": {"site": "berlin"}}, waves=[{"percent": 100}], actor="user:x"
    )
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(viewer)
    browser.get(reverse("web:rollout", args=[rollout.pk]))
    token = browser.cookies["csrftoken"].value

    response = browser.post(
        reverse("web:rollout_action", args=[rollout.pk, action]), {"csrfmiddlewaretoken": token}
    )

    assert response.status_code == 403
    roles = " or ".join(f"&#x27;{scope}&#x27;" for scope in BY_NAME[action].scopes)
    assert f"needs the {roles} role" in response.content.decode()  # not a CSRF refusal
    rollout.refresh_from_db()
    assert rollout.state == "created"


def test_it_runs_operator_actions_through_htmx_and_reports_refusals(client, operator, fleet):
    from ota.rollouts.create import rollout_create

    rollout = rollout_create(
        model="detector", version="2.0.0", target={"labels": {"site": "berlin"}}, waves=[{"percent": 100}], actor="user:x"
    )
    client.force_login(operator)
    url = lambda action: reverse("web:rollout_action", args=[rollout.pk, action])

    page = client.get(reverse("web:rollout_live", args=[rollout.pk])).content.decode()
    assert 'id="action-reason" name="reason"' in page and page.count('hx-include="#action-reason"') == 2

    response = client.post(url("start"), {"reason": "night shift window"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200 and 'id="live"' in response.content.decode()
    assert "Start: done." in response.content.decode()
    assert AuditEntry.objects.filter(action="rollout.start", reason="night shift window").exists()
    rollout.refresh_from_db()
    assert rollout.state == "running" and rollout.started_by == "user:olivia-operator"

    html = client.post(url("resume"), HTTP_HX_REQUEST="true").content.decode()
    assert f"Resume refused: cannot resume rollout {rollout.pk}: it is running" in html

    client.post(url("pause"), {"reason": "checking dashboards"}, HTTP_HX_REQUEST="true")
    rollout.refresh_from_db()
    assert rollout.state == "paused"
    assert AuditEntry.objects.filter(action="rollout.pause", reason="checking dashboards").exists()

    assert client.post(url("explode")).status_code == 404


def test_it_groups_failures_by_error_code_and_shows_gate_figures_against_thresholds(client, viewer, fleet):
    from ota.models import RolloutDevice
    from ota.rollouts.actions import rollout_start
    from ota.rollouts.create import rollout_create
    from ota.rollouts.engine import rollout_evaluate

    rollout = rollout_create(
        model="detector", version="2.0.0", target={"labels": {"site": "berlin"}},
        waves=[{"name": "canary", "count": 4}, {"percent": 100}],
        gates={"failure": {"min_reports": 2, "max_failed_percent": 60}}, actor="user:x",
    )
    rollout_start(rollout_id=rollout.pk, actor="user:x")
    rollout_evaluate(rollout_id=rollout.pk)  # wave 0 starts: its 4 devices get directives
    canary = list(RolloutDevice.objects.filter(rollout=rollout, wave__index=0).order_by("rank"))
    assert {a.state for a in canary} == {"directed"}
    # What the engine records as the devices report back (ingest → rollout_apply_events).
    RolloutDevice.objects.filter(pk=canary[0].pk).update(state="committed")
    RolloutDevice.objects.filter(pk=canary[1].pk).update(state="failed", error_code="PRECHECK_FAILED")
    Device.objects.update(online=True)
    Device.objects.filter(pk=canary[2].device_id).update(online=False)  # directed, then its box went away
    RolloutDevice.objects.filter(pk=canary[3].pk).update(state="trial")
    client.force_login(viewer)

    html = client.get(reverse("web:rollout_live", args=[rollout.pk])).content.decode()

    assert re.search(rf'<span class="badge bad">PRECHECK_FAILED</span> <b>1</b> device:\s*<a href="/devices/{canary[1].device_id}/">', html)
    wave0 = html[html.index('data-wave="0"'):html.index('data-wave="1"')]
    counts = dict(re.findall(r'data-state="(\w+)"><i class="s-\w+"></i>[\w ]+ <b data-count>(\d+)</b>', wave0))
    assert counts == {
        "pending": "0", "downloading": "0", "prechecking": "0", "in_trial": "1", "healthy": "1", "failed": "1",
        "timed_out": "0", "rolled_back": "0", "offline": "1",
    }
    assert "25.0 % healthy (1 of 4)" in wave0 and "passes at ≥ 100 %" in wave0
    assert "1 failed of 2 reports (50.0 %)" in wave0 and "trips at ≥ 60 % once ≥ 2 reported" in wave0
    assert '<tr class="gate fail"><td>Success gate' in wave0 and '<tr class="gate pass"><td>Failure gate' in wave0
    assert 'hx-trigger="every 2s"' in html  # a running rollout keeps polling


def test_it_works_without_javascript_and_lists_rollouts_and_the_audit_log(client, operator, fleet):
    from ota.rollouts.create import rollout_create

    rollout = rollout_create(
        model="detector", version="2.0.0", target={"labels": {"site": "berlin"}}, waves=[{"percent": 100}],
        name="plain form", actor="user:x",
    )
    client.force_login(operator)

    response = client.post(reverse("web:rollout_action", args=[rollout.pk, "start"]))  # no HX-Request header
    assert response.status_code == 302 and response["Location"] == reverse("web:rollout", args=[rollout.pk])
    assert "Start: done." in client.get(response["Location"]).content.decode()
    refused = client.post(reverse("web:rollout_action", args=[rollout.pk, "start"]), follow=True).content.decode()
    assert f"Start refused: cannot start rollout {rollout.pk}: it is running" in refused

    listing = client.get(reverse("web:rollouts")).content.decode()
    assert f'<a href="/rollouts/{rollout.pk}/">#{rollout.pk}</a>' in listing and "plain form" in listing
    assert "0/10 healthy" in listing

    audit = client.get(reverse("web:audit"), {"actor": "user:olivia-operator"}).content.decode()
    assert "rollout.start" in audit and "rollout.create" not in audit  # created by user:x


def control_panel(html: str, wave: int) -> str:
    block = html[html.index(f'data-wave="{wave}"'):]
    return block[:block.index('<div class="wave"', 1)] if '<div class="wave"' in block[1:] else block


def figure_cells(panel: str, key: str) -> list[str]:
    row = re.search(rf'<tr data-figure="{key}"[^>]*>(.*?)</tr>', panel, re.DOTALL).group(1)
    return [c.strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.DOTALL)]


def test_it_shows_each_waves_new_vs_control_figures_live_then_as_judged(client, viewer, fleet):
    import random
    from datetime import timedelta

    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from ota.models import DeviceModelState, Wave
    from ota.rollouts.actions import rollout_start
    from ota.rollouts.create import rollout_create
    from ota.rollouts.engine import rollout_evaluate
    from tests.support.model_metrics import commit_devices, ingest, metrics_message

    old = web_data.released("detector", "1.0.0", hardware_ids=("jetson-orin",), scale=3.0)
    old_sha, new_sha = old.artifacts.get().sha256, fleet.artifacts.get().sha256
    cams = [f"cam-{i:03d}" for i in range(10)]
    DeviceModelState.objects.bulk_create([
        DeviceModelState(device_id=d, model=old.model, active_version=old, active_sha256=old_sha)
        for d in cams])
    Device.objects.update(online=True)
    canary = cams[:3]
    rollout = rollout_create(
        model="detector", version="2.0.0", target={"labels": {"site": "berlin"}, "hardware": ["jetson-orin"]},
        waves=[{"devices": canary}, {"percent": 100}],
        gates={"soak_seconds": 600, "health": {"control": {"min_requests": 100}}}, abort_policy="pause",
        actor="user:x",
    )
    rollout_start(rollout_id=rollout.pk, actor="user:x")
    rollout_evaluate(rollout_id=rollout.pk)
    commit_devices(rollout, canary)
    rng = random.Random(7)
    ingest([metrics_message(d, old_sha, latency_ms=20, requests=150, errors=1, rng=rng) for d in cams[3:]]
           + [metrics_message(d, new_sha, latency_ms=28, requests=150, errors=1, rng=rng,
                              labels={"person": 0.7, "car": 0.3}) for d in canary])
    rollout_evaluate(rollout_id=rollout.pk)
    assert Wave.objects.get(rollout=rollout, index=0).state == "soaking"
    client.force_login(viewer)

    # Soaking: not judged yet, the figures are the gate's as of now, and reading them writes nothing.
    html = client.get(reverse("web:rollout_live", args=[rollout.pk])).content.decode()
    live = control_panel(html, 0)
    assert 'data-control="live" data-verdict="fail"' in live and "live, not judged yet" in live
    assert figure_cells(live, "devices")[1:3] == ["3", "7"]
    assert not AuditEntry.objects.filter(action__in=("wave.control_gate", "rollout.auto_pause")).exists()
    # The page polls every 2 s; the verdict's reads of the hourly rows are made once, then cached.
    with CaptureQueriesContext(connection) as queries:
        again = client.get(reverse("web:rollout_live", args=[rollout.pk])).content.decode()
    assert 'data-control="live" data-verdict="fail"' in again
    assert not [q for q in queries.captured_queries if "ota_modelmetricshour" in q["sql"]]
    # The page's one comparison is the gate's: no second, trial-health chart beside it.
    assert "Model health: wave 1 vs control group" in html and "new release vs previous" not in html
    assert 'id="control-latency-0"' in html and 'id="control-shares-0"' in html

    Wave.objects.filter(rollout=rollout, index=0).update(gate_met_at=Wave.objects.get(
        rollout=rollout, index=0).gate_met_at - timedelta(seconds=601))
    assert rollout_evaluate(rollout_id=rollout.pk) == "gate-tripped"
    # Paused with the wave still soaking: the page shows what was judged, not a fresh live figure.
    entry = AuditEntry.objects.get(object_id=str(rollout.pk), action="rollout.auto_pause")
    stored = entry.detail["control_gate"]

    html = client.get(reverse("web:rollout_live", args=[rollout.pk])).content.decode()
    judged = control_panel(html, 0)
    assert 'data-control="judged" data-verdict="fail"' in judged
    assert "tripped its control-group gate" in judged
    p50 = stored["latency"]["p50"]
    assert figure_cells(judged, "latency-p50")[1:6] == [
        f"{p50['new']:g}", f"{p50['control']:g}", f"×{p50['ratio']:g}", "≤ ×1.2",
        f"{stored['latency']['p_value']:.3g}"]
    assert '<tr data-figure="latency-p50" class="gate fail">' in judged
    errors = figure_cells(judged, "errors")
    assert errors[3:5] == [f"{stored['errors']['difference'] * 100:+.2f} pp", "≤ +1 pp"]
    assert figure_cells(judged, "drift")[3:5] == [f"{stored['drift']['psi']:g}", "≤ 0.2"]
    person = re.search(r'<tr data-label="person"><td>person</td><td>([^<]+)</td><td>([^<]+)</td>', judged)
    person = person.groups()
    assert person == (f"{stored['drift']['new_shares']['person'] * 100:.2f} %",
                      f"{stored['drift']['control_shares']['person'] * 100:.2f} %")
    assert "control-gate" not in control_panel(html, 1)  # the second wave never started


def test_it_says_in_one_line_where_the_control_gate_is_off(client, viewer, fleet):
    from ota.rollouts.actions import rollout_start
    from ota.rollouts.create import rollout_create
    from ota.rollouts.engine import rollout_evaluate

    switched_off = rollout_create(
        model="detector", version="2.0.0", target={"labels": {"site": "paris"}}, waves=[{"percent": 100}],
        gates={"health": {"control": False}}, actor="user:x",
    )
    no_metrics = rollout_create(
        model="detector", version="2.0.0", target={"labels": {"site": "berlin"}, "hardware": ["jetson-orin"]},
        waves=[{"percent": 100}], actor="user:x",
    )
    for rollout in (switched_off, no_metrics):
        rollout_start(rollout_id=rollout.pk, actor="user:x")
        rollout_evaluate(rollout_id=rollout.pk)
    client.force_login(viewer)

    off = client.get(reverse("web:rollout_live", args=[switched_off.pk])).content.decode()
    assert 'data-control="off">Control-group gate off: switched off by this rollout&#x27;s definition' in off
    quiet = client.get(reverse("web:rollout_live", args=[no_metrics.pk])).content.decode()
    assert "Control-group gate off: the wave&#x27;s devices report no model metrics." in quiet
    assert "Model health: new release vs previous" in quiet  # the trial-health display, labelled as such
