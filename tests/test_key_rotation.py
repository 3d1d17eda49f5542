"""Root of trust, key rotation and freshness (agent.trust) with real agents, a real Mosquitto and
the test rig: a root-signed keyring on the retained `fleet/keyring` topic rotates the rollout and
release keys with no re-enrollment; older, expired or forged keyrings are refused; a signed
timestamp keeps a device fresh and its absence turns into STALE_DIRECTIVES."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from hashlib import sha256

import pytest

from agent import signing
from agent.config import load_config
from agent.enroll import render_config
from agent.protocol import presence_payload, utcnow
from agent.trust import build_keyring_payload, build_timestamp_payload

from fleetctl.cli import main as fleetctl_main
from tests.support.agent_harness import (
    AgentProcess,
    Artifact,
    journal,
    linear_contract,
    other_key,
    publish_retained,
    release_envelope,
    wait_for,
)
from tests.support.onnx_models import linear_model

MODEL = "detector"


def pem(key) -> str:
    return signing.public_key_pem(key.public_key())


def keyring(root, *, version: int, release: list, rollout: list, expires_in=timedelta(days=30),
            release_threshold: int = 1, reset_seqs: bool = False) -> bytes:
    payload = build_keyring_payload(version=version, expires=utcnow() + expires_in,
                                    release_pems=[pem(k) for k in release], rollout_pems=[pem(k) for k in rollout],
                                    release_threshold=release_threshold, reset_seqs=reset_seqs)
    return json.dumps(signing.sign_envelope(payload, signing.KEYRING_PAYLOAD_TYPE, root)).encode()


def timestamp(key, *, device_id: str, seqs: dict, issued_ago=timedelta(0), expires_in=timedelta(minutes=5)) -> bytes:
    now = utcnow()
    payload = build_timestamp_payload(device_id=device_id, issued=now - issued_ago, expires=now + expires_in, seqs=seqs)
    return json.dumps(signing.sign_envelope(payload, signing.TIMESTAMP_PAYLOAD_TYPE, key)).encode()


def start_agents(rig, root, names, **keys_extra):
    agents = {}
    for name in names:
        rig.config(name, keys_extra={"root": [pem(root)], **keys_extra})
        agents[name] = rig.agent(name).start()
    for name, agent in agents.items():
        wait_for(lambda n=name: rig.subscriber.presence.get(n, {}).get("online"), 15, "online", agent=agent)
    return agents


def trust(rig, device: str) -> dict:
    return rig.subscriber.presence.get(device, {}).get("trust") or {}


def refused_unauthenticated(rig, name: str, payload: bytes, agent, code: str = "UNKNOWN_KEY") -> None:
    """An unauthenticated directive carries no seq the device may trust: its refusal is reported
    under seq 0, and the journal keeps the payload's digest (reported once)."""
    digest = sha256(payload).hexdigest()
    wait_for(lambda: digest in journal(rig.tmp / name / "state")["refused"], 15, f"{name} refusing", agent=agent)
    wait_for(lambda: [e for e in rig.subscriber.events_for(name, 0)
                      if e["state"] == "rejected" and e["error_code"] == code], 15,
             f"{name} reporting {code}", agent=agent)


def publish_keyring(rig, payload: bytes) -> None:
    publish_retained(rig.broker.port, "fleet/keyring", payload)


def test_it_rotates_the_rollout_and_release_keys_without_re_enrollment(rig):
    root = other_key()
    names = ["rot-a", "rot-b"]
    agents = start_agents(rig, root, names)
    v1 = Artifact(linear_model(scale=2.0, bias=1.0, padding_bytes=50_000))
    v2 = Artifact(linear_model(scale=3.0, bias=0.5, padding_bytes=50_000))
    rel1 = release_envelope(rig.keys, model=MODEL, version="1", counter=1, artifacts=[v1.entry()],
                            health=linear_contract(scale=2.0, bias=1.0))

    # Before any keyring: the keys pinned at enrollment.
    for name in names:
        rig.publish_directive(name, rig.directive(name, 1, MODEL, rel1, v1))
    for name in names:
        assert rig.subscriber.wait_outcome(name, 1, agent=agents[name])["state"] == "committed"

    # Rotation: keyring v2 (root-signed) lists only the new release and rollout keys.
    new_release, new_rollout = other_key(), other_key()
    publish_keyring(rig, keyring(root, version=2, release=[new_release], rollout=[new_rollout]))
    for name in names:
        wait_for(lambda n=name: trust(rig, n).get("keyring_version") == 2, 15, "keyring v2 taken", agent=agents[name])
        assert journal(rig.tmp / name / "state")["keyring"]["version"] == 2

    # A directive signed with the retired rollout key: refused on every device.
    rel2_new = release_envelope(rig.keys, model=MODEL, version="2", counter=2, artifacts=[v2.entry()],
                                health=linear_contract(scale=3.0, bias=0.5), key=new_release)
    retired = {name: rig.directive(name, 2, MODEL, rel2_new, v2) for name in names}  # rig.keys.rollout
    for name in names:
        rig.publish_directive(name, retired[name])
    for name in names:
        refused_unauthenticated(rig, name, retired[name], agents[name])

    # A release signed by the retired release key, in a directive by the new rollout key: refused.
    rel2_old = release_envelope(rig.keys, model=MODEL, version="2", counter=2, artifacts=[v2.entry()],
                                health=linear_contract(scale=3.0, bias=0.5))
    for name in names:
        rig.publish_directive(name, rig.directive(name, 3, MODEL, rel2_old, v2, key=new_rollout))
    for name in names:
        refused = rig.subscriber.wait_outcome(name, 3, agent=agents[name])  # the directive is authentic
        assert (refused["state"], refused["error_code"]) == ("rejected", "UNKNOWN_KEY"), refused

    # Both new keys: installed everywhere, no re-enrollment.
    for name in names:
        rig.publish_directive(name, rig.directive(name, 4, MODEL, rel2_new, v2, key=new_rollout))
    for name in names:
        done = rig.subscriber.wait_outcome(name, 4, agent=agents[name])
        assert done["state"] == "committed" and done["active_sha256"] == v2.sha256, done

    # The keyring survives a restart (journal): the retired rollout key stays refused.
    agents["rot-a"].stop()
    agents["rot-a"].start()
    late = rig.directive("rot-a", 5, MODEL, rel2_new, v2)
    rig.publish_directive("rot-a", late)
    refused_unauthenticated(rig, "rot-a", late, agents["rot-a"])


def test_it_refuses_keyrings_older_expired_or_not_signed_by_the_root(rig):
    root = other_key()
    agent = start_agents(rig, root, ["kr-1"])["kr-1"]
    rollout3 = other_key()
    publish_keyring(rig, keyring(root, version=3, release=[rig.keys.release], rollout=[rollout3]))
    wait_for(lambda: trust(rig, "kr-1").get("keyring_version") == 3, 15, "keyring v3", agent=agent)

    def refused_with(code: str, payload: bytes) -> None:
        publish_keyring(rig, payload)
        wait_for(lambda: (trust(rig, "kr-1").get("refused") or {}).get("code") == code, 15, f"a {code} refusal",
                 agent=agent)
        assert trust(rig, "kr-1")["keyring_version"] == 3

    refused_with("REPLAYED", keyring(root, version=2, release=[rig.keys.release], rollout=[rig.keys.rollout]))
    refused_with("EXPIRED", keyring(root, version=4, release=[rig.keys.release], rollout=[rig.keys.rollout],
                                    expires_in=timedelta(seconds=-1)))
    refused_with("UNKNOWN_KEY", keyring(other_key(), version=5, release=[rig.keys.release],
                                        rollout=[rig.keys.rollout]))
    forged = json.loads(keyring(root, version=6, release=[rig.keys.release], rollout=[rig.keys.rollout]))
    forged["payload"] = json.loads(keyring(root, version=7, release=[rig.keys.release],
                                           rollout=[other_key()]))["payload"]
    refused_with("SIGNATURE_INVALID", json.dumps(forged).encode())
    refused_with("MALFORMED", b'{"payloadType": "application/vnd.modelfleet.keyring+json", ')
    assert agent.alive()

    # The keys of the refused keyrings were never taken: the rig's rollout key stays retired.
    v1 = Artifact(linear_model(scale=2.0, bias=1.0, padding_bytes=10_000))
    rel = release_envelope(rig.keys, model=MODEL, version="1", counter=1, artifacts=[v1.entry()])
    payload = rig.directive("kr-1", 1, MODEL, rel, v1)
    rig.publish_directive("kr-1", payload)
    refused_unauthenticated(rig, "kr-1", payload, agent)


def test_it_recovers_from_a_fast_forward_with_a_keyring_that_resets_the_seqs(rig):
    root = other_key()
    name = "ff-1"
    agent = start_agents(rig, root, [name])[name]
    v1 = Artifact(linear_model(scale=2.0, bias=1.0, padding_bytes=10_000))
    rel = release_envelope(rig.keys, model=MODEL, version="1", counter=1, artifacts=[v1.entry()])
    stale = dict(expires_in=timedelta(seconds=-5), issued_ago=timedelta(hours=1))  # refused after the seq check

    # The stolen rollout key (the rig's) signs a huge seq: the device records it.
    rig.publish_directive(name, rig.directive(name, 10**12, MODEL, rel, v1, **stale))
    assert rig.subscriber.wait_outcome(name, 10**12, agent=agent)["error_code"] == "EXPIRED"
    # Retiring the key alone is not enough: the server's next seq is REPLAYED.
    new_rollout = other_key()
    publish_keyring(rig, keyring(root, version=1, release=[rig.keys.release], rollout=[new_rollout]))
    wait_for(lambda: trust(rig, name).get("keyring_version") == 1, 15, "keyring v1", agent=agent)
    rig.publish_directive(name, rig.directive(name, 41, MODEL, rel, v1, key=new_rollout, **stale))
    assert rig.subscriber.wait_outcome(name, 41, agent=agent)["error_code"] == "REPLAYED"
    # A root-signed keyring with reset_seqs: the server's seqs count again.
    publish_keyring(rig, keyring(root, version=2, release=[rig.keys.release], rollout=[new_rollout],
                                 reset_seqs=True))
    wait_for(lambda: trust(rig, name).get("keyring_version") == 2, 15, "keyring v2", agent=agent)
    # (The retained seq 41 is judged again after the new keyring: no longer REPLAYED either.)
    wait_for(lambda: [e for e in rig.subscriber.events_for(name, 41) if e["error_code"] == "EXPIRED"], 15,
             "seq 41 judged again", agent=agent)
    rig.publish_directive(name, rig.directive(name, 42, MODEL, rel, v1, key=new_rollout, **stale))
    assert rig.subscriber.wait_outcome(name, 42, agent=agent)["error_code"] == "EXPIRED"


def test_it_reports_stale_directives_and_refuses_bad_timestamps(rig):
    root = other_key()
    name = "fresh-1"
    # A timestamp waits on the retained topic before the agent connects.
    publish_retained(rig.broker.port, f"fleet/devices/{name}/timestamp",
                     timestamp(rig.keys.rollout, device_id=name, seqs={}))
    agent = start_agents(rig, root, [name], max_staleness_seconds=2)[name]
    wait_for(lambda: trust(rig, name).get("timestamp"), 15, "the timestamp taken", agent=agent)
    # No newer timestamp (a frozen server or a partition): reported, not run on silently.
    wait_for(lambda: trust(rig, name).get("error_code") == "STALE_DIRECTIVES", 15, "STALE_DIRECTIVES", agent=agent)
    assert "STALE_DIRECTIVES" in agent.log_text()

    def ts_refused(code: str, payload: bytes) -> None:
        publish_retained(rig.broker.port, f"fleet/devices/{name}/timestamp", payload)
        wait_for(lambda: (trust(rig, name).get("refused") or {}).get("code") == code, 15, f"a {code} timestamp",
                 agent=agent)
        assert trust(rig, name)["error_code"] == "STALE_DIRECTIVES"

    # A directive it refuses authentically (expired) still records its seq: 4 handled for the model.
    v1 = Artifact(linear_model(scale=2.0, bias=1.0, padding_bytes=10_000))
    rel = release_envelope(rig.keys, model=MODEL, version="1", counter=1, artifacts=[v1.entry()])
    rig.publish_directive(name, rig.directive(name, 4, MODEL, rel, v1, expires_in=timedelta(seconds=-5),
                                              issued_ago=timedelta(hours=1)))
    assert rig.subscriber.wait_outcome(name, 4, agent=agent)["error_code"] == "EXPIRED"
    ts_refused("REPLAYED", timestamp(rig.keys.rollout, device_id=name, seqs={MODEL: 3}))  # a rollback of state
    ts_refused("WRONG_DEVICE", timestamp(rig.keys.rollout, device_id="someone-else", seqs={}))
    ts_refused("EXPIRED", timestamp(rig.keys.rollout, device_id=name, seqs={}, issued_ago=timedelta(hours=2),
                                    expires_in=timedelta(hours=-1)))
    ts_refused("UNKNOWN_KEY", timestamp(other_key(), device_id=name, seqs={}))

    # A fresh one by the rollout key ends the report.
    publish_retained(rig.broker.port, f"fleet/devices/{name}/timestamp",
                     timestamp(rig.keys.rollout, device_id=name, seqs={MODEL: 4}))
    wait_for(lambda: trust(rig, name).get("error_code") is None, 15, "fresh again", agent=agent)


# --- the server: POST/GET /api/v1/keyring/, enrollment pins the root, retained distribution ------

API = "/api/v1"


def journal_if_any(state) -> dict:
    return journal(state) if (state / "journal.json").exists() else {}


@pytest.mark.django_db(transaction=True)
def test_it_accepts_root_signed_keyrings_and_hands_them_and_timestamps_to_enrolled_agents(
        client, admin_token, operator_token, secure_broker, settings, tmp_path, live_server, capsys):
    from ota.fleet.broker import BrokerAdmin, broker_device_roles_update, device_role, device_trust_acls
    from ota.fleet.timestamps import timestamps_refresh
    from ota.transport.ingest import Ingestor, Message
    from registry.models import AuditEntry
    from tests.support.fleet import hardware

    root_key = tmp_path / "root.pem"
    assert fleetctl_main(["keys", "generate", "--out", str(root_key)]) == 0
    no_root = client.post(f"{API}/keyring/", {"envelope": {}}, content_type="application/json",
                          **admin_token.headers)
    assert no_root.status_code == 409 and no_root.json()["error"]["code"] == "root_keys_missing"
    settings.ROOT_PUBLIC_KEY_PATH = str(tmp_path / "root.pub.pem")

    # Enrollment pins the root; the agent runs with the config fleet-agent enroll writes.
    hardware("test-hw")
    token = client.post(f"{API}/enrollment-tokens/", {"max_uses": 1}, content_type="application/json",
                        **admin_token.headers).json()
    answer = client.post(f"{API}/enroll", {"hardware": "test-hw", "token": token["token"]},
                         content_type="application/json").json()
    root_pem = (tmp_path / "root.pub.pem").read_text()
    assert answer["keys"]["root"] == [root_pem]
    state = tmp_path / "dev" / "state"
    config = tmp_path / "dev" / "agent.toml"
    state.mkdir(parents=True)
    config.write_text(render_config(answer, server_url="http://127.0.0.1:9", state_dir=state))
    assert load_config(config).keys.root == (root_pem,)
    # A device enrolled before keyrings: its broker role lacks the keyring and timestamp ACLs
    # until mqtt_ingest's start gives them (broker_device_roles_update).
    trust_acls = device_trust_acls(answer["device_id"], settings.MQTT_TOPIC_ROOT)
    with BrokerAdmin() as admin:
        admin.check([{"command": "removeRoleACL", "rolename": device_role(answer["device_id"]),
                      "acltype": acl["acltype"], "topic": acl["topic"]} for acl in trust_acls])
    assert broker_device_roles_update() == 4
    assert broker_device_roles_update() == 0
    agent = AgentProcess(config, tmp_path / "dev" / "agent.log").start()
    try:
        # fleetctl keyring sign (offline, root key), then the push an admin makes.
        new_rollout = tmp_path / "rollout2.pem"
        assert fleetctl_main(["keys", "generate", "--out", str(new_rollout)]) == 0
        (tmp_path / "rollout1.pub.pem").write_text(answer["keys"]["rollout"][0])
        (tmp_path / "release.pub.pem").write_text(answer["keys"]["release"][0])
        out = tmp_path / "keyring.json"
        assert fleetctl_main(["keyring", "sign", "--root", str(root_key), "--release", str(tmp_path / "release.pub.pem"),
                              "--rollout", str(tmp_path / "rollout1.pub.pem"), "--rollout",
                              str(tmp_path / "rollout2.pub.pem"), "--version", "1", "--expires", "30d",
                              "--out", str(out)]) == 0
        envelope = json.loads(out.read_text())
        denied = client.post(f"{API}/keyring/", {"envelope": envelope}, content_type="application/json",
                             **operator_token.headers)
        assert denied.status_code == 403
        server = ["--url", live_server.url, "--token", admin_token.secret]
        capsys.readouterr()
        assert fleetctl_main(["keyring", "push", str(out), "--json", *server]) == 0
        pushed = json.loads(capsys.readouterr().out)
        assert pushed["version"] == 1 and pushed["published"] is True
        assert client.get(f"{API}/keyring/", **admin_token.headers).json()["version"] == 1
        entry = AuditEntry.objects.get(action="keyring.push")
        assert entry.detail["version"] == 1 and len(entry.detail["rollout_keyids"]) == 2
        wait_for(lambda: (journal_if_any(state).get("keyring") or {}).get("version") == 1, 15,
                 "the agent taking the keyring from the broker", agent=agent)

        # The server refuses what a device would refuse.
        def refused(payload: bytes):
            response = client.post(f"{API}/keyring/", {"envelope": json.loads(payload)},
                                   content_type="application/json", **admin_token.headers)
            return response.status_code, response.json()["error"]
        root = signing.load_private_key_pem(root_key.read_bytes())
        status, error = refused(keyring(root, version=1, release=[root], rollout=[root]))
        assert (status, error["code"]) == (409, "keyring_not_newer")
        status, error = refused(keyring(root, version=2, release=[root], rollout=[root], expires_in=timedelta(hours=-1)))
        assert (status, error["code"]) == (400, "keyring_expired")
        status, error = refused(keyring(other_key(), version=2, release=[root], rollout=[root]))
        assert (status, error["code"], error["reason"]) == (400, "keyring_invalid", "UNKNOWN_KEY")
        # Root-signed and newer, but without the key this server signs directives with.
        status, error = refused(keyring(root, version=2, release=[root], rollout=[root]))
        assert (status, error["code"]) == (409, "keyring_lacks_rollout_key")
        assert AuditEntry.objects.filter(action="keyring.push").count() == 1

        # Freshness: beat's task signs and retains a timestamp the agent takes.
        assert timestamps_refresh() == 1
        wait_for(lambda: journal_if_any(state).get("timestamp"), 15, "the agent taking its timestamp", agent=agent)
        assert journal(state)["trust"]["error_code"] is None
        # What a device reports in presence.trust reaches the device API through ingest.
        stale = presence_payload(online=True, agent_version="t", active={}, models={}, trust={
            "keyring_version": 1, "timestamp": "2026-01-01T00:00:00Z", "error_code": "STALE_DIRECTIVES",
            "refused": {"kind": "timestamp", "code": "EXPIRED", "detail": "x" * 500}})
        Ingestor().process([Message(topic=f"fleet/devices/{answer['device_id']}/presence", payload=stale, qos=1)])
        shown = client.get(f"{API}/devices/{answer['device_id']}/", **admin_token.headers).json()["trust"]
        assert shown["error_code"] == "STALE_DIRECTIVES" and shown["keyring_version"] == 1
        assert shown["refused"]["code"] == "EXPIRED" and len(shown["refused"]["detail"]) == 200

        # `fleetctl keys rotate --stage retire` once the server signs with the new key (the
        # operator's ROLLOUT_KEY_PATH swap): keyring v2 lists only the new rollout key.
        settings.ROLLOUT_KEY_PATH = new_rollout
        assert fleetctl_main(["keys", "rotate", "--root", str(root_key), "--new-rollout",
                              str(tmp_path / "rollout2.pub.pem"), "--stage", "retire", *server]) == 0
        wait_for(lambda: journal_if_any(state)["keyring"]["version"] == 2, 15, "keyring v2", agent=agent)
        doc = json.loads(base64.b64decode(journal(state)["keyring"]["envelope"]["payload"]))
        assert doc["rollout"]["keys"] == [(tmp_path / "rollout2.pub.pem").read_text()]
        assert doc["release"]["keys"] == answer["keys"]["release"]
    finally:
        agent.stop()


def test_it_restores_the_journalled_keyring_only_under_the_root_that_signed_it(tmp_path):
    from agent.journal import Journal
    from agent.trust import Trust
    from tests.support.agent_harness import Keys, write_config

    keys, root_a, root_b, rollout2 = Keys.generate(), other_key(), other_key(), other_key()

    def trust_under(root) -> Trust:
        path = write_config(tmp_path / "agent.toml", device_id="dev-j", state_dir=tmp_path / "state", broker_port=9,
                            keys=keys, keys_extra={"root": [pem(root)]})
        (tmp_path / "state").mkdir(exist_ok=True)
        return Trust(cfg=load_config(path), journal=Journal(tmp_path / "state"))

    first = trust_under(root_a)
    taken = first.accept_keyring(json.loads(keyring(root_a, version=5, release=[keys.release], rollout=[rollout2])),
                                 utcnow())
    assert taken.version == 5 and first.keyring_version == 5
    rollout2_id = signing.keyid_of(rollout2.public_key())
    assert set(first.rollout_keys.keys) == {rollout2_id}

    again = trust_under(root_a)  # a restart: the journal's keyring, re-verified
    assert again.keyring_version == 5 and set(again.rollout_keys.keys) == {rollout2_id}
    assert again.accept_keyring(json.loads(keyring(root_a, version=5, release=[keys.release], rollout=[rollout2])),
                                utcnow()) is None  # the same version again: ignored

    # Past its expiry the keyring stays in force and is reported (presence.trust.keyring_expired).
    assert again.check_staleness(utcnow()) and not again.journal.data["trust"]["keyring_expired"]
    assert again.check_staleness(utcnow() + timedelta(days=31))
    assert again.journal.data["trust"]["keyring_expired"] is True and again.keyring_version == 5

    other = trust_under(root_b)  # re-enrolled under another root: the old keyring neither applies nor blocks
    assert other.keyring_version == 0
    assert set(other.rollout_keys.keys) == {signing.keyid_of(keys.rollout.public_key())}
    assert other.accept_keyring(json.loads(keyring(root_b, version=1, release=[keys.release], rollout=[keys.rollout])),
                                utcnow()).version == 1
