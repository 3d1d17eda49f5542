"""Enrollment: tokens (API and manage.py), POST /api/v1/enroll, and the real `fleet-agent enroll`
subprocess writing an agent.toml that the agent's own loader accepts; `fleet-agent enroll --force`
re-enrolling a box that has models installed as a new device."""

from __future__ import annotations

import io
import json
import shutil
import stat
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from agent.config import load_config
from agent.protocol import client_id
from ota.fleet.auth import authenticate_device_token
from ota.models import Device, EnrollmentToken
from registry.keys import public_key_info
from tests.support.agent_harness import (
    HEALTH_OK,
    AgentProcess,
    Keys,
    active_fingerprint,
    directive_envelope,
    journal,
    release_envelope,
)
from tests.support.broker_auth import MqttProbe
from tests.support.fleet import hardware
from tests.support.reenroll import MODEL, lived_in_device

API = "/api/v1"
FLEET_AGENT = str(Path(sys.executable).parent / "fleet-agent")


def fleet_agent_enroll(server: str, token: str, state_dir: Path, *extra: str, hardware_id: str = "rpi4-arm64"):
    return subprocess.run(
        [FLEET_AGENT, "enroll", "--server", server, "--token", token, "--hardware", hardware_id,
         "--state-dir", str(state_dir), *extra],
        capture_output=True, text=True, timeout=60,
    )


def create_token(client, admin_token, **body) -> dict:
    response = client.post(f"{API}/enrollment-tokens/", {"max_uses": 1, **body}, content_type="application/json",
                           **admin_token.headers)
    assert response.status_code == 201, response.content
    return response.json()


@pytest.mark.django_db(transaction=True)
def test_it_enrolls_with_fleet_agent_and_writes_a_private_config(live_server, secure_broker, client, admin_token,
                                                                  tmp_path):
    hardware("rpi4-arm64")
    token = create_token(client, admin_token, max_uses=2, labels={"site": "eu"}, expires_in="1d")
    state_dir = tmp_path / "box1"

    result = fleet_agent_enroll(live_server.url, token["token"], state_dir, "--label", "role=camera",
                                "--name", "gate-camera")

    assert result.returncode == 0, result.stderr
    path = state_dir / "agent.toml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = load_config(path)
    device = Device.objects.get(pk=config.device_id)
    assert config.device_id in result.stdout
    assert (device.name, device.hardware_id, device.labels) == ("gate-camera", "rpi4-arm64",
                                                               {"site": "eu", "role": "camera"})
    assert config.hardware == "rpi4-arm64" and config.state_dir == state_dir
    assert config.server.url == live_server.url
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.username) == ("127.0.0.1", secure_broker.port, device.id)
    assert config.keys.release == (public_key_info("release").public_key_pem,)
    assert config.keys.rollout == (public_key_info("rollout").public_key_pem,)
    assert EnrollmentToken.objects.get(pk=token["id"]).uses == 1

    principal = authenticate_device_token(config.server.token)
    assert principal.device_id == device.id and principal.scopes == frozenset({"device"})
    probe = MqttProbe(config.mqtt.port, config.mqtt.username, config.mqtt.password, client_id=client_id(device.id))
    try:
        assert probe.connect(), "the written MQTT credentials must work on the broker"
    finally:
        probe.close()


@pytest.mark.django_db(transaction=True)
def test_it_prints_the_server_refusal_and_exits_nonzero(live_server, settings, client, admin_token, tmp_path):
    settings.MQTT_BROKER_AUTH = "none"
    hardware("rpi4-arm64")
    token = create_token(client, admin_token, max_uses=1)
    assert fleet_agent_enroll(live_server.url, token["token"], tmp_path / "a").returncode == 0

    used_up = fleet_agent_enroll(live_server.url, token["token"], tmp_path / "b")
    assert used_up.returncode == 1
    assert "has been used 1 of 1 times" in used_up.stderr and "enrollment_token_used_up" in used_up.stderr
    assert not (tmp_path / "b" / "agent.toml").exists()

    unknown = fleet_agent_enroll(live_server.url, "mfe_nope", tmp_path / "c")
    assert unknown.returncode == 1 and "Unknown enrollment token" in unknown.stderr

    again = fleet_agent_enroll(live_server.url, token["token"], tmp_path / "a")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert "Pass --force to enroll it again as a new device" in again.stderr

    unreachable = fleet_agent_enroll("http://127.0.0.1:9", token["token"], tmp_path / "d")
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr


@pytest.fixture
def enroll_api(db, settings, client):
    settings.MQTT_BROKER_AUTH = "none"
    hardware("rpi4-arm64")

    def post(token: str | None, hardware_id: str = "rpi4-arm64", **body):
        data = {"hardware": hardware_id, **body}
        if token is not None:
            data["token"] = token
        return client.post(f"{API}/enroll", data, content_type="application/json")

    return post


def _make(**fields) -> str:
    from ota.fleet.enrollment import enrollment_token_create

    token, secret = enrollment_token_create(max_uses=fields.pop("max_uses", 1), created_by="test")
    EnrollmentToken.objects.filter(pk=token.pk).update(**fields)
    return secret


@pytest.mark.parametrize(
    "make, hardware_id, status, code, message",
    [
        (lambda: None, "rpi4-arm64", 401, "enrollment_token_required", "An enrollment token is required"),
        (lambda: "mfe_unknown", "rpi4-arm64", 401, "enrollment_token_invalid", "Unknown enrollment token"),
        (lambda: _make(revoked_at=timezone.now()), "rpi4-arm64", 403, "enrollment_token_revoked", "was revoked"),
        (lambda: _make(expires_at=timezone.now() - timedelta(minutes=1)), "rpi4-arm64", 403,
         "enrollment_token_expired", "expired at"),
        (lambda: _make(uses=2, max_uses=2), "rpi4-arm64", 403, "enrollment_token_used_up", "used 2 of 2 times"),
        (lambda: _make(), "toaster-9000", 400, "unknown_hardware", "Unknown hardware 'toaster-9000'"),
    ],
)
def test_it_refuses_bad_enrollments_with_specific_errors(enroll_api, make, hardware_id, status, code, message):
    response = enroll_api(make(), hardware_id)
    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code
    assert message in response.json()["error"]["message"]
    assert Device.objects.count() == 0


def test_it_does_not_spend_a_token_use_on_a_refused_enrollment(enroll_api):
    secret = _make()
    assert enroll_api(secret, "toaster-9000").status_code == 400
    assert enroll_api(secret, labels={"bad key!": "x"}).json()["error"]["code"] == "invalid"
    assert EnrollmentToken.objects.get().uses == 0
    response = enroll_api(secret, labels={"site": "eu"})
    assert response.status_code == 201, response.content
    assert response.json()["server"]["token"].startswith("mfd_")
    assert EnrollmentToken.objects.get().uses == 1


def test_it_accepts_the_token_in_the_authorization_header(enroll_api, client):
    secret = _make()
    response = client.post(f"{API}/enroll", {"hardware": "rpi4-arm64"}, content_type="application/json",
                           HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert response.status_code == 201, response.content


@pytest.mark.django_db(transaction=True)
def test_it_rolls_enrollment_back_when_the_broker_is_down(secure_broker, client):
    hardware("rpi4-arm64")
    secret = _make(max_uses=1)
    secure_broker.stop()
    response = client.post(f"{API}/enroll", {"hardware": "rpi4-arm64", "token": secret},
                           content_type="application/json")
    assert response.status_code == 503 and response.json()["error"]["code"] == "broker_unavailable"
    assert Device.objects.count() == 0 and EnrollmentToken.objects.get().uses == 0


def test_it_creates_enrollment_tokens_only_for_admins(client, db, operator_token, admin_token):
    denied = client.post(f"{API}/enrollment-tokens/", {"max_uses": 1}, content_type="application/json",
                         **operator_token.headers)
    assert denied.status_code == 403
    bad = client.post(f"{API}/enrollment-tokens/", {"max_uses": 0, "expires_in": "soon"},
                      content_type="application/json", **admin_token.headers)
    assert bad.status_code == 400
    assert "max_uses" in bad.json()["error"]["fields"] and "is not a duration" in bad.json()["error"]["message"]
    made = create_token(client, admin_token, max_uses=5, expires_in="12h", labels={"site": "eu"})
    assert made["token"].startswith("mfe_") and made["uses"] == 0 and made["labels"] == {"site": "eu"}
    listed = client.get(f"{API}/enrollment-tokens/", **admin_token.headers).json()["results"]
    assert [t["id"] for t in listed] == [made["id"]] and "token" not in listed[0]
    revoked = client.post(f"{API}/enrollment-tokens/{made['id']}/revoke", **admin_token.headers)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]


def test_it_creates_enrollment_tokens_from_manage_py(db):
    out = io.StringIO()
    call_command("enrollment", "create", "--max-uses", "3", "--expires-in", "1d", "--label", "site=eu", stdout=out)
    secret = out.getvalue().strip()
    token = EnrollmentToken.objects.get()
    assert secret.startswith("mfe_") and token.prefix == secret[:10]
    assert (token.max_uses, token.default_labels) == (3, {"site": "eu"})
    assert timedelta(hours=23) < token.expires_at - timezone.now() <= timedelta(days=1)
    with pytest.raises(CommandError, match="--expires-in: 'soon' is not a duration"):
        call_command("enrollment", "create", "--max-uses", "1", "--expires-in", "soon")
    with pytest.raises(CommandError, match="--label: label 'site' must look like key=value"):
        call_command("enrollment", "create", "--max-uses", "1", "--label", "site")
    with pytest.raises(CommandError, match="--max-uses must be at least 1"):
        call_command("enrollment", "create", "--max-uses", "0")


@pytest.mark.django_db(transaction=True)
def test_it_re_enrolls_with_force_as_a_new_device_keeping_the_installed_models(live_server, secure_broker, client,
                                                                                admin_token, rig):
    from agent.daemon import lock_state_dir
    from registry.keys import load_release_key, load_rollout_key

    hardware("test-hw")
    token = create_token(client, admin_token, max_uses=1)
    box = lived_in_device(rig, "dev-lived")  # v1 active (rolled back from v2), last_seq 2, one event unsent
    config_path = box.state / "agent.toml"
    shutil.copy(box.config, config_path)  # enrolled as dev-lived, with its own [update] settings
    before = journal(box.state)
    fingerprint = active_fingerprint(box.state, MODEL)

    refused = fleet_agent_enroll(live_server.url, token["token"], box.state, hardware_id="test-hw")
    assert refused.returncode == 2, refused.stderr
    assert "already exists: this box is enrolled as dev-lived. Pass --force" in refused.stderr
    lock = lock_state_dir(box.state)  # what a running agent holds
    try:
        busy = fleet_agent_enroll(live_server.url, token["token"], box.state, "--force", hardware_id="test-hw")
    finally:
        lock.close()
    assert busy.returncode == 3 and "a fleet-agent is running on" in busy.stderr
    assert EnrollmentToken.objects.get(pk=token["id"]).uses == 0, "a refusal must not spend a token use"

    result = fleet_agent_enroll(live_server.url, token["token"], box.state, "--force", "--name", "gate-2",
                                hardware_id="test-hw")

    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
    config = load_config(config_path)
    device = Device.objects.get(pk=config.device_id)
    assert config.device_id != "dev-lived" and (device.name, device.hardware_id) == ("gate-2", "test-hw")
    assert (config.mqtt.port, config.mqtt.username) == (secure_broker.port, device.id)
    assert config.server.url == live_server.url and config.state_dir == box.state
    # The box's own settings survive the new identity (its health command, log level, backoff).
    assert (config.update.health_command, config.update.trial_seconds) == (HEALTH_OK, 1)
    assert (config.log_level, config.mqtt.reconnect_max_seconds) == ("DEBUG", 2)
    assert f"enrolled as {device.id}" in result.stdout and "was dev-lived's" in result.stdout
    assert f"{MODEL} ({box.v1.sha256[:12]})" in result.stdout and "1 undelivered event(s)" in result.stdout

    # Installed models untouched; the journal now the new identity's: seq from 0, event numbers go on.
    assert active_fingerprint(box.state, MODEL) == fingerprint
    after = journal(box.state)
    assert {k: after[k] for k in ("models", "floors", "denylist")} == {k: before[k] for k in ("models", "floors", "denylist")}
    assert (after["device_id"], after["last_seq"], after["event_no"]) == (device.id, 0, before["event_no"])
    assert box.pending_events() == []
    [retired] = (box.state / "outbox" / "retired" / "dev-lived").glob("*.json")
    assert json.loads(retired.read_text())["error_code"] == "LOCAL_ROLLBACK"

    # The agent runs as the new device: its first directive (seq 1, the active v1) is acknowledged,
    # and the only event it ever sends is that one, numbered after the old identity's.
    probe = MqttProbe(secure_broker.port, secure_broker.username, secure_broker.password)
    agent = AgentProcess(config_path, box.state.parent / "agent-new.log")
    try:
        assert probe.connect()
        probe.subscribe("fleet/devices/+/events")
        agent.start()
        keys = Keys(release=load_release_key(), rollout=load_rollout_key())
        release = release_envelope(keys, model=MODEL, version="1", counter=1, artifacts=[box.v1.entry()])
        directive = directive_envelope(keys, device_id=device.id, seq=1, model=MODEL, release=release,
                                       artifact=box.v1.entry(), url="http://127.0.0.1:9/unused")
        probe.publish(f"fleet/devices/{device.id}/models/{MODEL}/directive", directive, retain=True)
        events: list[tuple[str, dict]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(e.get("seq") == 1 for _, e in events):
            events += [(topic, json.loads(payload)) for topic, payload, _ in probe.received(0.5)]
        assert [(t, e["device_id"], e["seq"], e["event_no"], e["state"], e["detail"]) for t, e in events] == [
            (f"fleet/devices/{device.id}/events", device.id, 1, before["event_no"] + 1, "committed",
             "already active and committed"),
        ], agent.log_text()[-3000:]
        assert probe.received(1.0) == []
    finally:
        assert agent.stop() == 0
        probe.close()


def test_it_refuses_to_re_enroll_while_an_update_is_in_flight(tmp_path):
    state = tmp_path / "box"
    state.mkdir()
    (state / "agent.toml").write_text('device_id = "dev-busy"\n')
    (state / "journal.json").write_text(json.dumps({"last_seq": 3, "event_no": 9, "models": {}, "floors": {},
                                                    "denylist": [], "update": {"model": "m", "seq": 3,
                                                                               "phase": "downloading"}}))
    result = fleet_agent_enroll("http://127.0.0.1:9", "mfe_unused", state, "--force")
    assert result.returncode == 2
    assert "an update of m (directive seq 3, phase downloading) is in flight" in result.stderr
    assert (state / "agent.toml").read_text() == 'device_id = "dev-busy"\n'
