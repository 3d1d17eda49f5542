"""Delta updates (issue 15): real `fleet-agent` processes on base v1 rebuild v2 from a signed
delta and end with v2's exact bytes; a delta with one flipped byte, or a base tampered with on
the device, falls back to the full artifact by itself and still ends exact. Server side: a delta
is built once (claimed), an oversized one is never offered, directives carry a ready delta only
to devices running its base, devices fetch it with their token, and the rollout's device rows
and detail show the delivery, the bytes fetched and the bytes saved."""

from __future__ import annotations

import json
import os
import stat
from hashlib import sha256
from datetime import timedelta
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent import deltas, signing
from agent.protocol import build_directive_payload, utcnow
from tests.support.agent_harness import (
    Artifact,
    active_file,
    journal,
    linear_contract,
    release_envelope,
    wait_for,
)

API = "/api/v1"


def model_bytes(*, scale: float, bias: float, weights: int = 300_000) -> bytes:
    """y = x * scale + bias, with a large unused weight tensor that is the same in every version
    (as in a model whose head alone was re-trained)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    frozen = np.random.default_rng(7).random(weights, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["xs"]), helper.make_node("Add", ["xs", "bias"], ["y"])],
        "linear", [x], [y],
        [numpy_helper.from_array(np.full([4], scale, dtype=np.float32), "scale"),
         numpy_helper.from_array(np.full([4], bias, dtype=np.float32), "bias"),
         numpy_helper.from_array(frozen, "frozen")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def built_delta(tmp: Path, base: bytes, target: bytes) -> bytes:
    (tmp / "base").write_bytes(base)
    (tmp / "target").write_bytes(target)
    deltas.delta_build(base=tmp / "base", target=tmp / "target", out=tmp / "delta")
    return (tmp / "delta").read_bytes()


def directive(rig, device_id: str, seq: int, release: dict, artifact: Artifact, url: str,
              delta: dict | None = None) -> bytes:
    now = utcnow()
    payload = build_directive_payload(
        device_id=device_id, seq=seq, issued=now, expires=now.replace(year=now.year + 1), rollout_id="r-1",
        model="detector", release_envelope=release,
        artifact={"hardware": artifact.hardware, "sha256": artifact.sha256, "length": len(artifact.data), "url": url},
        delta=delta,
    )
    return json.dumps(signing.sign_envelope(payload, signing.DIRECTIVE_PAYLOAD_TYPE, rig.keys.rollout)).encode()


def test_it_rebuilds_v2_from_a_delta_and_falls_back_to_full_on_a_bad_delta_or_base(rig, tmp_path):
    v1 = Artifact(model_bytes(scale=2.0, bias=1.0))
    v2 = Artifact(model_bytes(scale=3.0, bias=0.5))
    rel1 = release_envelope(rig.keys, model="detector", version="1.0", counter=1, artifacts=[v1.entry()],
                            health=linear_contract(scale=2.0, bias=1.0))
    rel2 = release_envelope(rig.keys, model="detector", version="2.0", counter=2, rollback_floor=1,
                            artifacts=[v2.entry()], health=linear_contract(scale=3.0, bias=0.5))
    good = built_delta(tmp_path, v1.data, v2.data)
    assert len(good) < len(v2.data) / 20, (len(good), len(v2.data))
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x01
    url1 = rig.server.add("/artifacts/v1", v1.data)
    url2 = rig.server.add("/artifacts/v2", v2.data)
    urls = {"ok": rig.server.add("/deltas/good", good), "flipped": rig.server.add("/deltas/flipped", bytes(flipped)),
            "tampered": rig.server.add("/deltas/good-too", good)}
    agents = {}
    for name in urls:
        rig.config(name, server_url=rig.server.url(""))
        agents[name] = rig.agent(name).start()
        rig.publish_directive(name, directive(rig, name, 1, rel1, v1, url1))
    for name, agent in agents.items():
        assert rig.subscriber.wait_outcome(name, 1, agent=agent)["state"] == "committed"

    # The tampered box: one byte of its running v1 changed on disk behind the agent's back.
    base = active_file(rig.tmp / "tampered" / "state", "detector").resolve()
    os.chmod(base, stat.S_IRUSR | stat.S_IWUSR)
    data = bytearray(base.read_bytes())
    data[-1] ^= 0x01
    base.write_bytes(bytes(data))
    # The flipped box gets its full artifact slowly, and loses power in the middle of it.
    slow = rig.server.add("/artifacts/v2-slow", v2.data)
    rig.server.rates["/artifacts/v2-slow"] = 400_000
    for name, url in urls.items():
        offer = {"base_sha256": v1.sha256, "url": url, "length": len(good), "sha256": sha256(good).hexdigest(),
                 "method": deltas.METHOD}
        rig.publish_directive(name, directive(rig, name, 2, rel2, v2, slow if name == "flipped" else url2,
                                              delta=offer))
    part = rig.tmp / "flipped" / "state" / "staging" / f"{v2.sha256}.part"
    wait_for(lambda: part.exists() and part.stat().st_size > 200_000, 30, "the full download to be under way",
             agent=agents["flipped"])
    agents["flipped"].proc.kill()
    agents["flipped"].proc.wait()
    agents["flipped"].start()
    outcomes = {name: rig.subscriber.wait_outcome(name, 2, agent=agent) for name, agent in agents.items()}

    for name, outcome in outcomes.items():
        assert outcome["state"] == "committed", (name, outcome)
        assert active_file(rig.tmp / name / "state", "detector").read_bytes() == v2.data, name
        assert journal(rig.tmp / name / "state")["models"]["detector"]["current"] == v2.sha256
    ok, flip, tamper = outcomes["ok"], outcomes["flipped"], outcomes["tampered"]
    assert (ok["delivery"], ok["bytes_downloaded"]) == ("delta", len(good))
    assert (flip["delivery"], flip["bytes_downloaded"]) == ("full", len(good) + len(v2.data))
    assert (tamper["delivery"], tamper["bytes_downloaded"]) == ("full", len(v2.data))
    verifying = {name: next(e for e in rig.subscriber.events_for(name, 2) if e["state"] == "verifying")
                 for name in urls}
    assert verifying["ok"]["detail"] == ""
    assert "the delta has sha256" in verifying["flipped"]["detail"]
    assert "does not match its sha256 (tampered or corrupt)" in verifying["tampered"]["detail"]
    served = [r["path"] for r in rig.server.requests]
    assert served.count("/artifacts/v2") == 1 and "/deltas/good-too" not in served
    # After the power cut: the bad delta is not fetched again, the full download resumes.
    assert served.count("/deltas/flipped") == 1
    assert [r["range"] is not None for r in rig.server.requests if r["path"] == "/artifacts/v2-slow"] == [False, True]


# --- server side ----------------------------------------------------------------------------------


def frozen_model(*, scale: float, seed: int = 7) -> bytes:
    """model_bytes, or with another seed its unused tensor of random bytes (nothing in common with
    any other version, and incompressible)."""
    data = onnx.load_from_string(model_bytes(scale=scale, bias=0.0))
    for init in data.graph.initializer:
        if init.name == "frozen" and seed != 7:
            noise = np.frombuffer(np.random.default_rng(seed).bytes(1_200_000), dtype=np.float32)
            init.CopyFrom(numpy_helper.from_array(noise, "frozen"))
    return data.SerializeToString()


@pytest.fixture
def versions(client, admin_token):
    from registry.models import Artifact as ArtifactRow
    from tests.support.registry_api import create_model, create_version, upload, version_url
    from tests.support.rollout_data import ensure_hardware

    ensure_hardware(client, admin_token, "rpi4")
    create_model(client, admin_token, "detector")
    for version, data in (("1.0", frozen_model(scale=2.0)), ("2.0", frozen_model(scale=3.0)),
                          ("3.0", frozen_model(scale=4.0, seed=99))):
        create_version(client, admin_token, "detector", version)
        assert upload(client, admin_token, "detector", version, hardware="rpi4", data=data).status_code == 201
        response = client.post(f"{version_url('detector', version)}/release", {}, content_type="application/json",
                               **admin_token.headers)
        assert response.status_code == 200, response.content
    return {v: ArtifactRow.objects.get(version__version=v) for v in ("1.0", "2.0", "3.0")}


@pytest.mark.django_db
def test_it_builds_a_delta_once_offers_it_to_devices_on_its_base_and_reports_bytes_saved(
    client, ci_token, versions, viewer, django_capture_on_commit_callbacks
):
    from unittest import mock

    from ota.models import ArtifactDelta, DeviceEvent, DeviceModelState, Directive
    from ota.models.devices import Device, hash_secret
    from ota.rollouts.deltas import delta_compute, delta_request, deltas_offered
    from ota.rollouts.directives import DirectiveRequest, _artifacts_for
    from ota.rollouts.engine import rollout_evaluate
    from ota.rollouts.events import rollout_apply_events
    from registry.artifacts import artifact_storage
    from tests.support.rollout_data import act, create_rollout, make_devices

    v1, v2, v3 = versions["1.0"], versions["2.0"], versions["3.0"]
    built = []
    with mock.patch("ota.rollouts.deltas._builder", built.append), django_capture_on_commit_callbacks(execute=True):
        delta = delta_request(base=v1, target=v2)
        assert delta_request(base=v1, target=v2).pk == delta.pk
    assert built == [delta.pk], "queued once, for the first request only"
    assert delta_compute(delta_id=delta.pk).state == "ready"
    first = ArtifactDelta.objects.get(pk=delta.pk)
    again = delta_compute(delta_id=delta.pk)  # a redelivered task: nothing is built twice
    assert (again.storage_key, again.build_seconds, again.finished_at) == (first.storage_key, first.build_seconds,
                                                                           first.finished_at)
    assert first.length < v2.length / 20 and len(artifact_storage().listdir(first.storage_key.rsplit("/", 1)[0])[1]) == 1
    oversized = delta_compute(delta_id=delta_request(base=v2, target=v3).pk)
    assert oversized.state == "oversized" and oversized.length > 0.9 * v3.length and not oversized.storage_key

    on_v1, on_none, on_v2 = make_devices(3, labels={"site": "berlin"})
    for device_id, artifact in ((on_v1, v1), (on_v2, v2)):
        DeviceModelState.objects.create(device_id=device_id, model=v1.version.model, active_sha256=artifact.sha256,
                                        active_version=artifact.version)
    Device.objects.filter(pk=on_v1).update(api_token_hash=hash_secret("mfd_delta_device"))
    for target, offered in ((v2, {on_v1}), (v3, set())):
        response = create_rollout(client, ci_token, model="detector", version=target.version.version,
                                  target={"labels": {"site": "berlin"}}, waves=[{"percent": 100}],
                                  gates={"success": {"min_healthy_percent": 100}})
        rid = response.json()["id"]
        with mock.patch("ota.rollouts.actions.rollout_wake", autospec=True):
            assert act(client, ci_token, rid, "start").status_code == 200
        rollout_evaluate(rollout_id=rid)
        deltas_sent = {}
        for d in Directive.objects.filter(rollout_id=rid):
            payload = json.loads(__import__("base64").b64decode(d.envelope["payload"]))
            if "delta" in payload:
                deltas_sent[d.device_id] = payload["delta"]
        assert set(deltas_sent) == offered, target  # v1→v3 is asked for, not ready: full for now
        if target == v3:
            # Asked for at create, its task lost (no worker here): the next wave that wants it asks again.
            stuck = ArtifactDelta.objects.get(base=v1, target=v3, state="pending")
            ArtifactDelta.objects.filter(pk=stuck.pk).update(created_at=stuck.created_at - timedelta(hours=1))
            requests = [DirectiveRequest(device_id=on_v1, hardware="rpi4", version=v3.version)]
            with (mock.patch("ota.rollouts.deltas._builder", built.append),
                  django_capture_on_commit_callbacks(execute=True)):
                assert deltas_offered(requests=requests, artifacts=_artifacts_for(requests)) == {}
            assert built[-1] == stuck.pk
            continue
        offer = deltas_sent[on_v1]
        assert (offer["base_sha256"], offer["length"], offer["sha256"]) == (v1.sha256, first.length, first.sha256)
        # The device fetches it with its own token, with Range, like an artifact.
        path = offer["url"].split("://", 1)[1].split("/", 1)[1]
        got = client.get(f"/{path}", HTTP_AUTHORIZATION="Bearer mfd_delta_device")
        assert got.status_code == 200 and sha256(b"".join(got.streaming_content)).hexdigest() == first.sha256
        part = client.get(f"/{path}", HTTP_AUTHORIZATION="Bearer mfd_delta_device", HTTP_RANGE="bytes=10-")
        assert part.status_code == 206 and len(b"".join(part.streaming_content)) == first.length - 10
        assert client.get(f"/{path}", HTTP_AUTHORIZATION="Bearer mfd_nobody").status_code == 401

        seqs = dict(Directive.objects.filter(rollout_id=rid).values_list("device_id", "seq"))
        events = [DeviceEvent.objects.create(device_id=device_id, event_no=10, seq=seqs[device_id], model="detector",
                                             state="verifying", delivery=delivery, bytes_downloaded=fetched)
                  for device_id, delivery, fetched in ((on_v1, "delta", first.length), (on_none, "full", v2.length))]
        rollout_apply_events(event_ids=[e.pk for e in events])
        rows = {r["device"]: r for r in client.get(f"{API}/rollouts/{rid}/devices/", **ci_token.headers).json()["results"]}
        assert (rows[on_v1]["delivery"], rows[on_v1]["bytes_downloaded"]) == ("delta", first.length)
        assert (rows[on_none]["delivery"], rows[on_none]["bytes_downloaded"]) == ("full", v2.length)
        assert (rows[on_v2]["delivery"], rows[on_v2]["bytes_downloaded"]) == ("", None)
        detail = client.get(f"{API}/rollouts/{rid}/", **ci_token.headers).json()
        assert detail["delivery"] == {"delta_devices": 1, "full_devices": 1, "bytes_downloaded": first.length + v2.length,
                                      "bytes_saved": v2.length - first.length}
        from fleetctl.rollout import render

        assert any("1 by delta, 1 in full" in line and "saved by deltas" in line for line in render(detail))
        from django.test import Client
        from django.urls import reverse

        web = Client()
        web.force_login(viewer)
        page = web.get(reverse("web:rollout_live", args=[rid])).content.decode()
        assert "1 by delta, 1 in full" in page and "saved by deltas" in page
        act(client, ci_token, rid, "abort")


@pytest.fixture
def delta_platform(transactional_db, live_server, secure_broker, tmp_path, isolated_storage):
    """server_platform, with the worker reading and writing this test's artifact store: it builds
    deltas from the stored artifacts."""
    from tests.support.platform import Platform

    with Platform(tmp_path, broker=secure_broker, live_server_url=live_server.url,
                  extra_env={"ARTIFACT_DIR": str(isolated_storage)}) as platform:
        platform.start_ingest()
        platform.start_worker()
        platform.start_beat()
        yield platform


def test_it_rolls_out_v2_to_real_agents_as_a_delta_and_a_tampered_base_takes_the_full_artifact(
    client, admin_token, ci_token, delta_platform, live_server, tmp_path
):
    """The whole way: the server's worker builds the delta the rollout asks for, signs it into the
    directives, serves it; real agents rebuild v2 from it, and the one whose v1 was changed on
    disk fetches the full artifact instead; the API and the CLI show what each did."""
    from ota.models import ArtifactDelta, Rollout
    from registry.models import Artifact as ArtifactRow
    from tests.support.fleet_agents import Agents, wait_until
    from tests.support.registry_api import create_model, create_version, upload, version_url
    from tests.support.rollout_data import act, create_rollout, ensure_hardware, health_for
    from fleetctl.rollout import render

    ensure_hardware(client, admin_token, "rpi4")
    create_model(client, admin_token, "detector")
    for version, scale, bias in (("1.0", 2.0, 1.0), ("2.0", 3.0, 0.5)):
        create_version(client, admin_token, "detector", version, health=health_for(scale, bias))
        data = model_bytes(scale=scale, bias=bias)
        assert upload(client, admin_token, "detector", version, hardware="rpi4", data=data).status_code == 201
        assert client.post(f"{version_url('detector', version)}/release", {}, content_type="application/json",
                           **admin_token.headers).status_code == 200
    v1, v2 = (ArtifactRow.objects.get(version__version=v) for v in ("1.0", "2.0"))
    response = client.post(f"{API}/enrollment-tokens/", {"max_uses": 2, "name": "deltas"},
                           content_type="application/json", **admin_token.headers)
    agents = Agents(tmp_path / "agents", delta_platform.env)
    try:
        honest, tampered = agents.enroll(live_server.url, response.json()["token"], 2, labels={"site": "berlin"})
        for device_id in (honest, tampered):
            agents.start(device_id)

        def rollout(version: str) -> int:
            rid = create_rollout(client, ci_token, model="detector", version=version,
                                 target={"labels": {"site": "berlin"}}, waves=[{"percent": 100}],
                                 gates={"success": {"min_healthy_percent": 100}}).json()["id"]
            if version == "2.0":  # asked for at create; the platform's worker builds it
                wait_until(lambda: ArtifactDelta.objects.filter(base=v1, target=v2, state="ready").exists(), 60,
                           "the worker to build the delta", delta_platform, agents)
            assert act(client, ci_token, rid, "start").status_code == 200
            wait_until(lambda: Rollout.objects.get(pk=rid).state == "completed", 120, f"{version} everywhere",
                       delta_platform, agents)
            return rid

        rollout("1.0")
        base = next((agents.state_dir(tampered) / "models" / "detector" / "current").iterdir()).resolve()
        os.chmod(base, stat.S_IRUSR | stat.S_IWUSR)
        data = bytearray(base.read_bytes())
        data[100] ^= 0xFF
        base.write_bytes(bytes(data))
        rid = rollout("2.0")
    finally:
        agents.stop_all()

    delta = ArtifactDelta.objects.get(base=v1, target=v2)
    assert {d: agents.model_sha(d, "detector") for d in (honest, tampered)} == {honest: v2.sha256, tampered: v2.sha256}
    rows = {r["device"]: r for r in client.get(f"{API}/rollouts/{rid}/devices/", **ci_token.headers).json()["results"]}
    assert (rows[honest]["delivery"], rows[honest]["bytes_downloaded"]) == ("delta", delta.length)
    assert (rows[tampered]["delivery"], rows[tampered]["bytes_downloaded"]) == ("full", v2.length)
    detail = client.get(f"{API}/rollouts/{rid}/", **ci_token.headers).json()
    assert detail["delivery"]["bytes_saved"] == v2.length - delta.length > 0.9 * v2.length
    assert any("1 by delta, 1 in full" in line for line in render(detail))


@pytest.mark.django_db
def test_it_asks_for_the_delta_from_the_previous_release_when_a_version_is_released(
    client, admin_token, django_capture_on_commit_callbacks
):
    """Built on release, off the request path: a rollout's first wave can already use it."""
    from unittest import mock

    from ota.models import ArtifactDelta
    from registry.models import Artifact
    from tests.support.rollout_data import release

    built = []
    with mock.patch("ota.rollouts.deltas._builder", built.append), django_capture_on_commit_callbacks(execute=True):
        release(client, admin_token, "detector", "1.0", hardware=("rpi4", "jetson"))
        assert not ArtifactDelta.objects.exists(), "a first release has no base"
        release(client, admin_token, "detector", "2.0", hardware=("rpi4", "jetson"), scale=3.0, bias=0.5)
    pairs = {(d.base.version.version, d.target.version.version, d.target.hardware_id)
             for d in ArtifactDelta.objects.select_related("base__version", "target__version")}
    assert pairs == {("1.0", "2.0", "rpi4"), ("1.0", "2.0", "jetson")}
    assert sorted(built) == sorted(ArtifactDelta.objects.values_list("pk", flat=True))
    assert Artifact.objects.count() == 4
