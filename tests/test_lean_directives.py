"""Lean directives (issue 12, item 5): a directive names its release by the sha256 and length of
the envelope's canonical bytes and a URL, instead of carrying the whole signed release.

Server: only devices whose agent advertised "release_ref" get them (others, and every device with
DIRECTIVE_RELEASE_BY_REFERENCE off, get the envelope inside); the release-envelope endpoint serves
exactly the bytes the reference digests, to a device directed to that release and nobody else.
Agent (real processes): it fetches the envelope once, caches it, installs from it, and refuses a
lean directive whose envelope does not match the reference, is signed by an unknown key, or cannot
be fetched, under the directive's seq, with the running model untouched.
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from agent.protocol import ErrorCode, encode_json, parse_directive, parse_presence, presence_payload, release_bytes
from ota.models import Device, Directive
from registry.models import ModelVersion
from tests.support.agent_fixtures import MODEL, add_v2, close_rig, device_from, install_template, make_rig
from tests.support.agent_harness import (
    Keys,
    active_fingerprint,
    journal,
    linear_contract,
    release_envelope,
)
from tests.support.fleet import enroll_device, record_directive
from tests.support.registry_api import version_url
from tests.support.rollout_data import make_devices, release

API = "/api/v1"


# --- the server -------------------------------------------------------------------------------


def _signed_payloads(device_ids: list[str]) -> dict[str, dict]:
    """The signed body of each device's directive (signatures are the agent tests' business)."""
    return {d.device_id: json.loads(base64.b64decode(d.envelope["payload"]))
            for d in Directive.objects.filter(device_id__in=device_ids)}


@pytest.fixture
def released(client, admin_token):
    release(client, admin_token, "detector", "1.0", hardware=("rpi4",))
    return ModelVersion.objects.get(model__name="detector", version="1.0")


def _issue(device_ids: list[str], version: ModelVersion) -> None:
    from ota.rollouts.directives import DirectiveRequest, directives_issue

    directives_issue(requests=[DirectiveRequest(device_id=d, hardware="rpi4", version=version) for d in device_ids],
                     rollout_id=None, kind="update")


@pytest.mark.django_db
def test_it_sends_a_reference_only_to_agents_that_advertise_it(released, settings):
    lean, old = make_devices(2, prefix="lean")
    Device.objects.filter(pk=lean).update(features=["release_ref"])
    _issue([lean, old], released)
    payloads = _signed_payloads([lean, old])
    assert "release" not in payloads[lean] and "release" in payloads[old] and "release_ref" not in payloads[old]
    ref = payloads[lean]["release_ref"]
    data = release_bytes(released.envelope)
    assert ref["sha256"] == hashlib.sha256(data).hexdigest() and ref["length"] == len(data)
    assert ref["url"] == f"{settings.PUBLIC_URL}{version_url('detector', '1.0')}/release-envelope"
    directive = parse_directive(encode_json(payloads[lean]))
    assert directive.release is None and directive.release_ref.sha256 == ref["sha256"]
    full = len(encode_json(payloads[old]))
    assert len(encode_json(payloads[lean])) < full - len(data) / 2, "the reference must be much smaller"

    settings.DIRECTIVE_RELEASE_BY_REFERENCE = False
    Directive.objects.all().delete()
    _issue([lean], released)
    assert "release" in _signed_payloads([lean])[lean]


@pytest.mark.django_db
def test_it_serves_the_referenced_bytes_to_the_directed_device_only(client, released, settings):
    settings.MQTT_BROKER_AUTH = "none"  # device rows and tokens; no broker in this test
    directed, other = enroll_device(hardware_id="rpi4"), enroll_device(hardware_id="rpi4")
    url = f"{version_url('detector', '1.0')}/release-envelope"
    auth = {"HTTP_AUTHORIZATION": f"Bearer {directed.api_token}"}
    refused = client.get(url, **auth)
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "not_directed")
    record_directive(device=directed.device, version=released)
    served = client.get(url, **auth)
    assert served.status_code == 200 and served["Content-Type"] == "application/json"
    assert served.content == release_bytes(released.envelope)
    assert served["ETag"] == f'"{hashlib.sha256(served.content).hexdigest()}"'
    whole = client.get(url, HTTP_RANGE="bytes=10-", **auth)  # a piece of JSON is no JSON: always whole
    assert whole.status_code == 200 and whole.content == served.content
    stranger = client.get(url, HTTP_AUTHORIZATION=f"Bearer {other.api_token}")
    assert stranger.status_code == 403


@pytest.mark.django_db
def test_it_stores_what_a_presence_advertises_and_forgets_it_on_a_downgrade(released):
    from agent.protocol import ProtocolError, Topics
    from ota.transport.ingest import Ingestor, Message

    (device,) = make_devices(1, prefix="feat")

    def presence(**kwargs):
        message = Message(topic=Topics("fleet").presence(device), payload=presence_payload(**kwargs), qos=1)
        Ingestor().process([message])
        return Device.objects.get(pk=device).features

    assert presence(online=True, agent_version="0.1.0", active={}, models={}, features=["release_ref"]) == [
        "release_ref"]
    assert presence(online=False, agent_version="0.1.0", active={}) == ["release_ref"]  # the last will says nothing
    assert presence(online=True, agent_version="0.0.9", active={}, models={}) == []  # an older agent again
    bad = json.dumps({"_type": "presence", "online": True, "features": ["release\x00ref"]}).encode()
    with pytest.raises(ProtocolError, match="presence.features"):
        parse_presence(bad)


# --- real agents ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    rig, _ = make_rig(tmp_path_factory.mktemp("lean"))
    try:
        inst = install_template(rig, update={"reload_command": "true", "trial_seconds": 1})
        add_v2(inst, padding_bytes=10_000)
        yield inst
    finally:
        close_rig(rig)


def _lean(inst, device: str, seq: int, envelope: dict, *, served: bytes | None = None, path: str | None = None):
    """A lean directive for v2 whose reference names `envelope`; the server answers `served`."""
    rig = inst.rig
    data = release_bytes(envelope)
    path = path or f"/releases/{device}/{seq}"
    url = rig.server.add(path, data if served is None else served)
    ref = {"sha256": hashlib.sha256(data).hexdigest(), "length": len(data), "url": url}
    return rig.directive(device, seq, MODEL, None, inst.v2, release_ref=ref), path


def _device(inst, device: str):
    return inst.rig, device_from(inst, device, reload_command="true", trial_seconds=1)


def _requests(rig, path: str) -> int:
    return sum(1 for r in rig.server.requests if r.get("path") == path)


def test_it_fetches_the_release_once_and_installs_from_a_lean_directive(installed):
    inst = installed
    rig, state = _device(inst, "l-ok")
    agent = rig.agent("l-ok").start()
    payload, path = _lean(inst, "l-ok", 2, inst.rel2)
    assert len(payload) < 2000
    rig.publish_directive("l-ok", payload, model=MODEL)
    outcome = rig.subscriber.wait_outcome("l-ok", 2, timeout=60, agent=agent)
    assert outcome["state"] == "committed", outcome
    assert active_fingerprint(state, MODEL)[1] == inst.v2.sha256
    digest = hashlib.sha256(release_bytes(inst.rel2)).hexdigest()
    assert json.loads((state / "releases" / f"{digest}.json").read_bytes()) == inst.rel2
    assert _requests(rig, path) == 1
    # The same release again (a re-sent directive): confirmed from the cache, nothing fetched.
    again, _ = _lean(inst, "l-ok", 3, inst.rel2, path=path)
    rig.publish_directive("l-ok", again, model=MODEL)
    assert rig.subscriber.wait_outcome("l-ok", 3, timeout=30, agent=agent)["state"] == "committed"
    assert _requests(rig, path) == 1
    assert agent.stop() == 0


@pytest.mark.parametrize(("case", "code"), [
    ("tampered", ErrorCode.HASH_MISMATCH),
    ("unknown key", ErrorCode.UNKNOWN_KEY),
    ("missing", ErrorCode.NOT_FOUND),
])
def test_it_refuses_a_lean_directive_whose_release_cannot_be_trusted(installed, case, code):
    inst = installed
    device = f"l-{case.replace(' ', '-')}"
    rig, state = _device(inst, device)
    before = active_fingerprint(state, MODEL)
    envelope = inst.rel2
    if case == "unknown key":  # a release signed by a key the device does not hold
        envelope = release_envelope(Keys.generate(), model=MODEL, version="2.0", counter=2,
                                    artifacts=[inst.v2.entry()], health=linear_contract(scale=3.0, bias=0.5))
    served = None
    if case == "tampered":
        data = bytearray(release_bytes(envelope))
        data[len(data) // 2] ^= 0x01
        served = bytes(data)
    payload, path = _lean(inst, device, 2, envelope, served=served)
    if case == "missing":
        rig.server.files.pop(path)
    agent = rig.agent(device).start()
    rig.publish_directive(device, payload, model=MODEL)
    outcome = rig.subscriber.wait_outcome(device, 2, timeout=90, agent=agent)
    assert (outcome["state"], outcome["error_code"]) == ("rejected", code), outcome
    assert active_fingerprint(state, MODEL) == before
    assert journal(state)["seqs"][MODEL] == 2  # refused under its seq: authentic and fresh
    assert not list((state / "releases").glob("*.json"))  # nothing untrusted kept
    assert agent.stop() == 0


@pytest.mark.django_db
def test_it_lets_the_fleet_simulator_resolve_a_reference_as_an_agent_would(released):
    from agent.protocol import ReleaseRef
    from ota.sim.fleet import FleetSimulator, _release_from_registry
    from registry.downloads import release_ref

    sim = FleetSimulator([], host="127.0.0.1", port=1, release_pems=[], rollout_pems=[],
                         release_resolver=_release_from_registry)
    assert sim.features == ("release_ref",)  # its devices advertise lean directives
    ref = ReleaseRef(**release_ref(version=released))
    assert sim.release_for(ref) == released.envelope
    wrong = ReleaseRef(sha256="0" * 64, length=ref.length, url=ref.url)
    assert sim.release_for(wrong) is None  # bytes that do not match the reference are never used
    plain = FleetSimulator([], host="127.0.0.1", port=1, release_pems=[], rollout_pems=[])
    assert plain.features is None  # without a resolver: envelopes inside, as agents before release_ref
