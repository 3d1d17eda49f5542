"""Maintenance windows and scheduled starts, server side: the definition's checks (the agent's own
window parser), the windows signed into each device's directive (label groups first, none on
reverts), `waiting_for_window` folded into the assignment with the reported opening, the activate
timeout counted from that opening, the presence of a parked update kept from the reconciler, a
rollout scheduled to start later, and the API, schema and CLI that show them. In-process on the
real database; no broker is needed (directives are signed and stored, their publishing after
commit is not run). The end-to-end run with real agents is tests/test_rollout_windows_e2e.py."""

from __future__ import annotations

import base64
import json
import time
from datetime import timedelta
from unittest import mock

import pytest
import yaml
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.utils import timezone

from agent.protocol import Event, Topics, format_time, parse_directive, presence_payload
from agent.signing import DIRECTIVE_PAYLOAD_TYPE, Keyring, public_key_pem, verify_envelope
from fleetctl.cli import build_parser
from fleetctl.rollout import build_definition, render
from ota.models import Device, DeviceModelState, Directive, Rollout, RolloutDevice
from ota.rollouts.actions import rollout_act, rollout_start
from ota.rollouts.create import rollout_create
from ota.rollouts.definition import device_windows, label_windows_validate, start_at_validate, windows_validate
from ota.rollouts.engine import rollout_evaluate
from ota.rollouts.events import rollout_apply_events
from ota.rollouts.reconcile import REPORT_GRACE, assignments_reconcile_reported
from ota.rollouts.schedule import rollouts_start_due
from ota.transport import hooks
from ota.transport.ingest import Ingestor, Message
from registry.errors import Conflict
from registry.keys import load_rollout_key
from registry.models import AuditEntry, ModelVersion
from tests.support import web_data
from tests.support.rollout_data import act, create_rollout, make_devices

API = "/api/v1"
pytestmark = pytest.mark.django_db
BERLIN = "Mon-Fri 02:00-04:00 Europe/Berlin"
TOKYO = "daily 01:00-03:00 Asia/Tokyo"
RD = RolloutDevice.State


@pytest.fixture
def fleet(django_capture_on_commit_callbacks, settings):
    # Callbacks after commit (publishing, waking the engine) are captured and not run: no broker.
    settings.MQTT_BROKER_AUTH = "none"
    web_data.released("detector", "1.0", hardware_ids=("rpi4",))
    web_data.released("detector", "2.0", hardware_ids=("rpi4",), scale=3.0)
    make_devices(3, labels={"site": "berlin"}, prefix="ber")
    make_devices(2, labels={"site": "tokyo"}, prefix="tok")
    with django_capture_on_commit_callbacks():
        yield


def definition(**overrides) -> dict:
    body = {"model": "detector", "version": "2.0", "target": {"hardware": ["rpi4"]}, "waves": [{"percent": 100}]}
    body.update(overrides)
    return body


def create(**overrides) -> Rollout:
    return rollout_create(**definition(**overrides), actor="user:ops")


def payload_of(directive: Directive) -> dict:
    return json.loads(base64.b64decode(directive.envelope["payload"]))


def event(device_id: str, seq: int, no: int, state: str, **extra) -> bytes:
    return Event(device_id=device_id, event_no=no, seq=seq, model="detector", state=state,
                 ts=format_time(timezone.now()), **extra).to_payload()


def ingest(device_id: str, kind: str, payload: bytes) -> list[int]:
    """Through the real ingest batch logic; the engine's hook (a Celery enqueue) is held back."""
    with mock.patch.object(hooks, "on_device_events", autospec=True):
        return Ingestor().process([Message(topic=Topics("fleet").device(device_id, kind), payload=payload, qos=1)])


# --- the definition --------------------------------------------------------------------------------


REFUSALS = [
        ({"windows": ["Mon-Fri 2am-4am"]}, "windows", "windows[0]: 'Mon-Fri 2am-4am' is not a window"),
        ({"windows": ["02:00-04:00 Mars/Olympus"]}, "windows", "'Mars/Olympus' is not a known time zone"),
        ({"windows": ["02:00-04:00 America"]}, "windows", "'America' is not a known time zone"),
        ({"windows": ["Mon-Fry 02:00-04:00"]}, "windows", "'Mon-Fry' is not a day"),
        ({"windows": ["02:00-02:00"]}, "windows", "opens and closes at the same time"),
        ({"windows": ["25:00-26:00"]}, "windows", "is not a time of day"),
        ({"windows": [BERLIN] * 17}, "windows", "lists 17 windows, at most 16"),
        ({"windows": ["x" * 101]}, "windows", "longer than 100 characters"),
        ({"windows": "02:00-04:00"}, "windows", "must be a list of windows"),
        ({"label_windows": {"site": "berlin"}}, "label_windows", "must be a list"),
        ({"label_windows": [{"labels": {"site": "tokyo"}}]}, "label_windows[0]", 'exactly "labels" and "windows"'),
        ({"label_windows": [{"labels": {}, "windows": [TOKYO]}]}, "label_windows[0].labels", "non-empty"),
        ({"label_windows": [{"labels": {"site": "tokyo"}, "windows": []}]}, "label_windows[0].windows",
         "at least one window"),
        ({"label_windows": [{"labels": {"site": "tokyo"}, "windows": ["01:00-03:00 Asia/Nowhere"]}]},
         "label_windows[0].windows", "label_windows[0].windows[0]: 'Asia/Nowhere' is not a known time zone"),
        ({"label_windows": [{"labels": {"site": "x"}, "windows": [TOKYO]}] * 17}, "label_windows", "at most 16"),
        ({"start_at": "2020-01-01T00:00:00Z"}, "start_at", "is not in the future"),
        ({"start_at": "tomorrow"}, "start_at", ""),
]


def test_it_refuses_bad_windows_and_start_times_naming_the_field(client, ci_token, fleet):
    for overrides, field, message in REFUSALS:  # one fleet for all (a release costs half a second)
        response = create_rollout(client, ci_token, **definition(**overrides))
        assert response.status_code == 400, (overrides, response.content)
        error = response.json()["error"]
        assert error["code"] == "invalid" and field in error["fields"], (overrides, error)
        assert message in str(error["fields"][field]), (overrides, error)
    assert not Rollout.objects.exists()


def test_it_checks_windows_and_start_times_the_same_way_at_every_entry():
    assert windows_validate(["  Mon-Fri 02:00-04:00 Europe/Berlin ", "22:00-06:00"]) == [BERLIN, "22:00-06:00"]
    assert windows_validate(None) == [] and label_windows_validate(None) == []
    now = timezone.now()
    assert start_at_validate(None) is None
    assert start_at_validate((now + timedelta(hours=1)).isoformat(), now=now) == now + timedelta(hours=1)
    for bad, message in (("2026-12-24T02:00:00", "offset from UTC"),
                         ((now + timedelta(days=91)).isoformat(), "more than 90 days ahead"),
                         (17, "RFC 3339")):
        with pytest.raises(ValidationError) as refused:
            start_at_validate(bad, now=now)
        assert message in str(refused.value.message_dict["start_at"])
    groups = [{"labels": {"site": "tokyo"}, "windows": [TOKYO]}, {"labels": {"site": "tokyo", "x": "y"}, "windows": ["x"]}]
    assert device_windows(windows=[BERLIN], label_windows=groups, labels={"site": "tokyo", "x": "y"}) == [TOKYO]
    assert device_windows(windows=[BERLIN], label_windows=groups, labels={"site": "berlin"}) == [BERLIN]
    assert device_windows(windows=[], label_windows=[], labels=None) == []


# --- directives --------------------------------------------------------------------------------------


def test_it_signs_each_devices_windows_into_its_directive_and_none_into_reverts(fleet):
    v1 = ModelVersion.objects.get(version="1.0")
    DeviceModelState.objects.bulk_create([
        DeviceModelState(device=d, model=v1.model, active_version=v1, active_sha256=v1.artifacts.get().sha256)
        for d in Device.objects.all()])
    rollout = create(windows=[BERLIN], label_windows=[{"labels": {"site": "tokyo"}, "windows": [TOKYO]}],
                     abort_policy="revert")
    assert (rollout.windows, rollout.label_windows) == ([BERLIN], [{"labels": {"site": "tokyo"}, "windows": [TOKYO]}])
    rollout_start(rollout_id=rollout.pk, actor="user:ops")
    assert rollout_evaluate(rollout_id=rollout.pk) == "dispatched"

    keyring = Keyring.from_pems(public_key_pem(load_rollout_key().public_key()))
    directives = {d.device_id: d for d in Directive.objects.filter(rollout=rollout, kind="update")}
    assert len(directives) == 5
    for device_id, d in directives.items():
        parsed = parse_directive(verify_envelope(d.envelope, DIRECTIVE_PAYLOAD_TYPE, keyring))
        assert parsed.windows == ((TOKYO,) if device_id.startswith("tok") else (BERLIN,)), device_id

    # An emergency revert must not wait for a window: revert directives carry none.
    RolloutDevice.objects.filter(rollout=rollout).update(state=RD.COMMITTED)
    rollout_act(action="rollback", rollout_id=rollout.pk, actor="user:ops")
    reverts = list(Directive.objects.filter(rollout=rollout, kind="revert"))
    assert len(reverts) == 5 and all("windows" not in payload_of(d) for d in reverts)


def test_it_leaves_windows_out_of_a_rollout_without_any(fleet):
    rollout = create()
    rollout_start(rollout_id=rollout.pk, actor="user:ops")
    rollout_evaluate(rollout_id=rollout.pk)
    assert all("windows" not in payload_of(d) for d in Directive.objects.filter(rollout=rollout))


# --- waiting for a window: events, gates, timeouts, presence ----------------------------------------


@pytest.fixture
def waiting(fleet):
    """A started one-wave rollout with a window, every device directed."""
    rollout = create(windows=[BERLIN], gates={"timeouts": {"activate_seconds": 600}})
    rollout_start(rollout_id=rollout.pk, actor="user:ops")
    rollout_evaluate(rollout_id=rollout.pk)
    return rollout


def seqs(rollout) -> dict[str, int]:
    return dict(RolloutDevice.objects.filter(rollout=rollout).values_list("device_id", "seq"))


def test_it_folds_waiting_for_window_with_the_opening_and_then_activating(waiting, client, ci_token):
    seq = seqs(waiting)["ber-0000"]
    opening = timezone.now().replace(microsecond=0) + timedelta(hours=3)
    ids = []
    for no, state in enumerate(("received", "downloading", "verifying", "prechecking"), start=1):
        ids += ingest("ber-0000", "events", event("ber-0000", seq, no, state))
    ids += ingest("ber-0000", "events", event("ber-0000", seq, 5, "waiting_for_window",
                                              next_opening=format_time(opening), delivery="full",
                                              bytes_downloaded=1234))
    assert rollout_apply_events(event_ids=ids) == {waiting.pk}
    a = RolloutDevice.objects.get(rollout=waiting, device_id="ber-0000")
    assert (a.state, a.window_opens_at, a.delivery, a.bytes_downloaded) == (RD.WAITING_FOR_WINDOW, opening, "full", 1234)

    # The API rows and the rollout's summary show it; so does fleetctl.
    rows = {r["device"]: r for r in client.get(f"{API}/rollouts/{waiting.pk}/devices/?state=waiting_for_window",
                                                **ci_token.headers).json()["results"]}
    assert list(rows) == ["ber-0000"] and rows["ber-0000"]["window_opens_at"] == opening.isoformat().replace("+00:00", "Z")
    detail = client.get(f"{API}/rollouts/{waiting.pk}/", **ci_token.headers).json()
    assert detail["windows"] == [BERLIN] and detail["progress"]["waiting_for_window"] == 1
    assert detail["waiting_for_window"]["devices"] == 1
    assert detail["waiting_for_window"]["next_opening"] == rows["ber-0000"]["window_opens_at"]
    assert detail["waves"][0]["waiting_for_window"] == 1
    shown = "\n".join(render(detail))
    assert f"maintenance windows: {BERLIN}" in shown and "1 device downloaded and waiting for a maintenance window" in shown

    # Missed its window (it was down): it reports the next opening, and then activates in it.
    later = opening + timedelta(days=1)
    ids = ingest("ber-0000", "events", event("ber-0000", seq, 6, "waiting_for_window", next_opening=format_time(later)))
    ids += ingest("ber-0000", "events", event("ber-0000", seq, 7, "activating"))
    rollout_apply_events(event_ids=ids)
    a.refresh_from_db()
    assert (a.state, a.window_opens_at, a.activate_started_at is not None) == (RD.ACTIVATING, later, True)


def test_it_counts_waiting_devices_neither_failed_nor_stalled_and_times_out_from_the_opening(waiting):
    now = timezone.now()
    assignments = RolloutDevice.objects.filter(rollout=waiting)
    # Verified an hour ago (long past the 600 s activate timeout) but waiting for a window ahead.
    assignments.update(state=RD.WAITING_FOR_WINDOW, verify_started_at=now - timedelta(hours=1),
                       window_opens_at=now + timedelta(hours=2))
    assert rollout_evaluate(rollout_id=waiting.pk) == "idle"
    wave = waiting.waves.get()
    assert wave.state == "running" and set(assignments.values_list("state", flat=True)) == {RD.WAITING_FOR_WINDOW}
    waiting.refresh_from_db()
    assert waiting.state == "running"  # neither failed (no gate tripped) nor paused as unreachable

    # The window opened 5 minutes ago: activating counts from the opening, not the verify start.
    assignments.filter(device_id="ber-0000").update(state=RD.ACTIVATING, window_opens_at=now - timedelta(minutes=5))
    # One whose opening passed 20 minutes ago and never said a word of activating times out.
    assignments.filter(device_id="ber-0001").update(window_opens_at=now - timedelta(minutes=20))
    rollout_evaluate(rollout_id=waiting.pk)
    states = dict(assignments.values_list("device_id", "state"))
    assert states["ber-0000"] == RD.ACTIVATING
    assert states["ber-0001"] == RD.TIMED_OUT
    assert assignments.get(device_id="ber-0001").error_code == "TIMEOUT_ACTIVATE"
    assert {states[d] for d in ("ber-0002", "tok-0000", "tok-0001")} == {RD.WAITING_FOR_WINDOW}


def test_it_cancels_parked_updates_when_the_rollout_is_aborted(waiting):
    v1 = ModelVersion.objects.get(version="1.0")
    assignments = RolloutDevice.objects.filter(rollout=waiting)
    assignments.update(previous_version=v1, previous_sha256=v1.artifacts.get().sha256)
    assignments.filter(device_id__in=["ber-0000", "ber-0001"]).update(
        state=RD.WAITING_FOR_WINDOW, window_opens_at=timezone.now() + timedelta(hours=2))
    assignments.filter(device_id="ber-0002").update(state=RD.COMMITTED)
    rollout_act(action="abort", rollout_id=waiting.pk, actor="user:ops")
    states = dict(assignments.values_list("device_id", "state"))
    # Parked, never activated: sent a directive for the release they run, which supersedes the
    # parked update (no windows: it is carried out at once). The committed one keeps the release.
    assert (states["ber-0000"], states["ber-0001"], states["ber-0002"]) == (RD.REVERTING, RD.REVERTING, RD.COMMITTED)
    cancels = Directive.objects.filter(rollout=waiting, kind="revert")
    assert {d.device_id for d in cancels} == {"ber-0000", "ber-0001"} and all("windows" not in payload_of(d) for d in cancels)
    entry = AuditEntry.objects.get(object_id=str(waiting.pk), action="rollout.abort")
    assert entry.detail["waiting_for_window_cancelled"] == 2
    waiting.refresh_from_db()
    assert waiting.state == "aborted" and waiting.reverted_at is None


def test_it_keeps_the_reconciler_from_judging_a_parked_update_by_what_runs(waiting):
    seq = seqs(waiting)["ber-0002"]
    parked = presence_payload(online=True, agent_version="1.0",
                              models={"detector": {"sha256": None, "version": None, "committed": False, "seq": seq,
                                                   "waiting": {"seq": seq, "sha256": "ab" * 32,
                                                               "next_opening": format_time(timezone.now())}}})
    ingest("ber-0002", "presence", parked)
    state = DeviceModelState.objects.get(device_id="ber-0002")
    assert (state.reported_seq, state.reported_update_seq) == (seq, seq)
    RolloutDevice.objects.filter(rollout=waiting, device_id="ber-0002").update(state=RD.WAITING_FOR_WINDOW)
    assert assignments_reconcile_reported(now=timezone.now() + REPORT_GRACE * 2) == set()
    assert RolloutDevice.objects.get(rollout=waiting, device_id="ber-0002").state == RD.WAITING_FOR_WINDOW


# --- scheduled starts ---------------------------------------------------------------------------------


def test_it_schedules_a_start_and_the_tick_starts_it_when_due(fleet):
    start_at = timezone.now() + timedelta(hours=1)
    rollout = create(start_at=start_at.isoformat())
    rollout_start(rollout_id=rollout.pk, actor="user:ops", reason="after the shift")
    rollout.refresh_from_db()
    assert (rollout.state, rollout.start_at, rollout.started_at) == ("scheduled", start_at, None)
    assert rollout_evaluate(rollout_id=rollout.pk) == "scheduled"
    assert not Directive.objects.exists()
    # It holds its devices: another rollout of the model cannot take them meanwhile.
    with pytest.raises(Conflict):
        create(version="1.0")

    assert rollouts_start_due(now=start_at - timedelta(seconds=1)) == []
    assert rollouts_start_due(now=start_at + timedelta(seconds=1)) == [rollout.pk]
    rollout.refresh_from_db()
    assert rollout.state == "running" and rollout.started_at is not None
    assert rollout_evaluate(rollout_id=rollout.pk) == "dispatched"
    actions = list(AuditEntry.objects.filter(object_id=str(rollout.pk)).order_by("pk").values_list("action", "actor"))
    assert actions[:3] == [("rollout.create", "user:ops"), ("rollout.schedule", "user:ops"), ("rollout.start", "system")]


def test_it_cancels_or_aborts_a_scheduled_start_and_reports_one_that_cannot_start(fleet):
    start_at = timezone.now() + timedelta(hours=1)
    rollout = create(start_at=start_at.isoformat())
    rollout_start(rollout_id=rollout.pk, actor="user:ops")
    rollout_act(action="unschedule", rollout_id=rollout.pk, actor="user:ops")
    rollout.refresh_from_db()
    assert (rollout.state, rollout.start_at) == ("created", None)
    rollout_start(rollout_id=rollout.pk, actor="user:ops")  # no start time left: at once
    rollout.refresh_from_db()
    assert rollout.state == "running"

    rollout_act(action="abort", rollout_id=rollout.pk, actor="user:ops")
    second = create(version="1.0", start_at=start_at.isoformat())
    rollout_start(rollout_id=second.pk, actor="user:ops")
    rollout_act(action="abort", rollout_id=second.pk, actor="user:ops")
    second.refresh_from_db()
    assert second.state == "aborted"
    assert set(RolloutDevice.objects.filter(rollout=second).values_list("state", flat=True)) == {RD.SKIPPED}

    # Due, but its release was revoked meanwhile: back to created, with the reason.
    third = create(version="1.0", start_at=start_at.isoformat())
    rollout_start(rollout_id=third.pk, actor="user:ops")
    third.release.__class__.objects.filter(pk=third.release_id).update(state="revoked")
    assert rollouts_start_due(now=start_at + timedelta(seconds=1)) == []
    third.refresh_from_db()
    assert third.state == "created" and "scheduled start" in third.state_reason and "revoked" in third.state_reason
    assert AuditEntry.objects.filter(object_id=str(third.pk), action="rollout.schedule_failed").exists()


def test_it_schedules_through_the_api_and_shows_the_start_time(client, ci_token, fleet):
    start_at = (timezone.now() + timedelta(hours=2)).replace(microsecond=0)
    response = create_rollout(client, ci_token, **definition(start_at=format_time(start_at), windows=[BERLIN]))
    assert response.status_code == 201, response.content
    rid = response.json()["id"]
    started = act(client, ci_token, rid, "start", reason="night shift")
    assert started.status_code == 200, started.content
    data = started.json()
    assert data["state"] == "scheduled" and data["start_at"] == format_time(start_at)
    assert f"starts at {data['start_at']}" in "\n".join(render(data))
    assert [r["id"] for r in client.get(f"{API}/rollouts/?state=scheduled", **ci_token.headers).json()["results"]] == [rid]
    assert act(client, ci_token, rid, "unschedule").json()["state"] == "created"


# --- the CLI and the schema ------------------------------------------------------------------------


def test_it_takes_windows_and_a_start_time_from_fleetctl_flags():
    args = build_parser().parse_args([
        "rollout", "create", "--model", "detector", "--version", "2.0", "--label", "site=berlin", "--wave", "100%",
        "--window", BERLIN, "--window", "Sat,Sun 22:00-06:00", "--label-window", "site=tokyo", TOKYO,
        "--label-window", "site=tokyo", "Sat 00:00-24:00 Asia/Tokyo", "--start-at", "2026-12-24T02:00:00Z",
    ])
    body = build_definition(args)
    assert body["windows"] == [BERLIN, "Sat,Sun 22:00-06:00"]
    assert body["label_windows"] == [{"labels": {"site": "tokyo"}, "windows": [TOKYO, "Sat 00:00-24:00 Asia/Tokyo"]}]
    assert body["start_at"] == "2026-12-24T02:00:00Z"


def test_it_documents_windows_start_at_and_window_opens_at_in_the_schema(tmp_path):
    out = tmp_path / "schema.yml"
    call_command("spectacular", "--file", str(out))
    schemas = yaml.safe_load(out.read_text())["components"]["schemas"]
    create_props = schemas["RolloutCreate"]["properties"]
    assert create_props["windows"]["items"]["maxLength"] == 100 and create_props["windows"]["maxItems"] == 16
    assert create_props["label_windows"]["items"]["required"] == ["labels", "windows"]
    assert create_props["start_at"]["format"] == "date-time"
    assert "window_opens_at" in schemas["RolloutDevice"]["properties"]
    wait = schemas["RolloutDetail"]["properties"]["waiting_for_window"]["allOf"][0]["$ref"].rsplit("/", 1)[1]
    assert set(schemas[wait]["properties"]) == {"devices", "next_opening", "last_opening"}
    assert any("scheduled" in schema.get("enum", []) for schema in schemas.values())
    assert any("waiting_for_window" in schema.get("enum", []) for schema in schemas.values())


# --- the web UI ------------------------------------------------------------------------------------


def test_it_takes_windows_and_a_start_time_in_the_wizard_and_shows_them_on_the_rollout_page(client, operator, fleet):
    from django.urls import reverse

    client.force_login(operator)
    url = reverse("web:rollout_new")
    start_at = format_time((timezone.now() + timedelta(hours=5)).replace(microsecond=0))
    data = {
        "release": ModelVersion.objects.get(version="2.0").pk, "name": "", "target_labels": "", "target_hardware": "rpi4",
        "target_devices": "", "waves": "100%", "success_percent": "100", "failure_min_reports": "1",
        "failure_percent": "10", "failure_count": "", "soak_seconds": "0", "rate_per_minute": "",
        "download_seconds": "600", "activate_seconds": "300", "trial_seconds": "60", "abort_policy": "pause",
        "windows": f"{BERLIN}\n02:00-03:00 Mars/Olympus", "label_windows": f"site=tokyo: {TOKYO}", "start_at": start_at,
    }
    refused = client.post(url, {**data, "step": "review"})
    assert refused.status_code == 400 and "&#x27;Mars/Olympus&#x27; is not a known time zone" in refused.content.decode()

    data["windows"] = BERLIN
    review = client.post(url, {**data, "step": "review"}).content.decode()
    assert BERLIN in review and TOKYO in review and "scheduled: Start makes it begin at" in review
    created = client.post(url, {**data, "step": "create"})
    assert created.status_code == 302, created.content.decode()[-2000:]
    rollout = Rollout.objects.get()
    assert rollout.windows == [BERLIN] and rollout.label_windows == [{"labels": {"site": "tokyo"}, "windows": [TOKYO]}]

    page = client.get(reverse("web:rollout_live", args=[rollout.pk])).content.decode()
    assert f"It is scheduled: nothing is sent before {rollout.start_at:%Y-%m-%d %H:%M:%S} UTC." in page
    rollout_start(rollout_id=rollout.pk, actor="user:ops")
    page = client.get(reverse("web:rollout_live", args=[rollout.pk])).content.decode()
    assert "Scheduled: starts at" in page and BERLIN in page and 'data-action="unschedule"' in page
    rollouts_start_due(now=rollout.start_at)
    rollout_evaluate(rollout_id=rollout.pk)
    RolloutDevice.objects.filter(rollout=rollout, device_id="tok-0000").update(
        state=RD.WAITING_FOR_WINDOW, window_opens_at=timezone.now() + timedelta(hours=1))
    Device.objects.filter(pk="tok-0000").update(online=False)  # it waits by its own clock, offline or not
    page = client.get(reverse("web:rollout_live", args=[rollout.pk])).content.decode()
    assert "1 device downloaded and waiting for a maintenance window" in page and ">tok-0000</a>" in page
    assert 'data-state="waiting_for_window"' in page


# --- the fleet simulator ------------------------------------------------------------------------------


def test_it_has_the_fleet_simulator_wait_for_the_window_as_an_agent_does(fleet):
    from ota.sim.enroll import SimCredentials
    from ota.sim.fleet import FleetSimulator

    now = timezone.now()
    closed = f"{(now + timedelta(hours=3)):%H:%M}-{(now + timedelta(hours=4)):%H:%M} UTC"
    rollout = create(windows=[closed])
    rollout_start(rollout_id=rollout.pk, actor="user:ops")
    rollout_evaluate(rollout_id=rollout.pk)
    directive = Directive.objects.get(rollout=rollout, device_id="ber-0000")
    sim = FleetSimulator.from_settings([SimCredentials(device_id="ber-0000", password="x", hardware="rpi4")],
                                       step_seconds=0.0, resume={})
    device = sim.devices[0]  # never connected: its events stay in its outbox
    device.handle_directive(json.dumps(directive.envelope).encode())
    for _ in range(10):  # run the timers that are due (received → ... → prechecking → the window)
        due = [t for t in sim._timers if t[0] <= time.monotonic() + 1]
        for t in due:
            sim._timers.remove(t)
            t[2]()
    events = [json.loads(p) for p in device.outbox]
    assert [e["state"] for e in events] == ["received", "downloading", "verifying", "prechecking", "waiting_for_window"]
    assert events[-1]["next_opening"] == f"{(now + timedelta(hours=3)):%Y-%m-%dT%H:%M}:00Z"
    assert device.update.phase == "waiting_for_window" and sim._timers  # it looks again at the opening
