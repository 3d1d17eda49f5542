"""Shadow evaluation (agent/shadow.py): before `current` is touched, the candidate runs beside the
current model on real inputs the app spooled, and a candidate that disagrees is refused with
SHADOW_DISAGREES while the running model stays exactly as it was."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from agent.shadow import shadow_settings, spool_samples
from tests.support.agent_harness import Artifact, linear_contract, release_envelope
from tests.support.onnx_models import linear_model

SHADOW = {"metric": "top1", "min_agreement": 0.9, "min_samples": 20}


def test_it_checks_the_contracts_shadow_settings():
    assert shadow_settings({"inputs": {}}) is None
    assert shadow_settings({"shadow": {}})["min_samples"] == 20
    assert shadow_settings({"shadow": {"metric": "mae", "max_mae": 0.1}})["max_mae"] == 0.1
    bad = {
        "x": "must be an object",
        (("metric", "vote"),): "metric must be one of top1, mae",
        (("metric", "mae"),): "needs max_mae",
        (("min_agreement", 1.5),): "min_agreement must be a number from 0 to 1",
        (("min_samples", 0),): "min_samples must be an integer",
        (("required", "yes"),): "required must be true or false",
        (("colour", 1),): "unknown keys: colour",
    }
    for settings, message in bad.items():
        value = settings if isinstance(settings, str) else dict(settings)
        with pytest.raises(ValueError, match=message):
            shadow_settings({"shadow": value})


def test_it_keeps_the_spool_to_its_bounds(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    for i in range(8):
        path = spool / f"s{i}.npz"
        np.savez(path, x=np.zeros((1, 4), dtype=np.float32))
        os.utime(path, (1000 + i, 1000 + i))
    (spool / "big.npz").write_bytes(b"0" * 5000)
    (spool / "half-written.tmp").write_bytes(b"0")
    kept = spool_samples(spool, max_files=5, max_file_bytes=4000)
    assert [p.name for p in kept] == ["s7.npz", "s6.npz", "s5.npz", "s4.npz", "s3.npz"]
    assert sorted(p.name for p in spool.iterdir()) == ["half-written.tmp", *sorted(p.name for p in kept)]
    assert spool_samples(tmp_path / "none", max_files=5, max_file_bytes=10) == []


def test_it_refuses_to_upload_a_contract_with_a_bad_shadow(client, admin_token):
    from tests.support.registry_api import API, create_hardware, create_model

    create_hardware(client, admin_token, "rpi4")
    create_model(client, admin_token, "detector")

    def create(version, health):
        return client.post(f"{API}/models/detector/versions/", {"version": version, "health": health},
                           content_type="application/json", **admin_token.headers)

    response = create("1.0", {"shadow": {"metric": "vote"}})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_health"
    assert "health.shadow.metric must be one of top1, mae" in response.json()["error"]["message"]
    response = create("1.1", {"precheck": "none", "shadow": {}})
    assert response.status_code == 400 and "shadow would never be checked" in response.json()["error"]["message"]
    assert create("1.2", {"shadow": {"min_samples": 5}}).status_code == 201


def spool_inputs(state_dir, count: int, seed: int = 4) -> None:
    """What the app hands over: real inputs, one .npz per sample, written then renamed."""
    spool = state_dir / "shadow" / "detector"
    spool.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        np.savez(spool / f".sample-{i}.tmp.npz", x=rng.random((1, 4), dtype=np.float32))
        os.replace(spool / f".sample-{i}.tmp.npz", spool / f"sample-{i}.npz")


def release(rig, version: str, counter: int, scale: float, bias: float, shadow: dict | None):
    artifact = Artifact(linear_model(scale=scale, bias=bias))
    health = {**linear_contract(scale=scale, bias=bias), **({"shadow": shadow} if shadow else {})}
    envelope = release_envelope(rig.keys, model="detector", version=version, counter=counter,
                                artifacts=[artifact.entry()], health=health)
    return artifact, envelope


def test_it_refuses_a_candidate_that_disagrees_and_activates_one_that_agrees(rig):
    state = rig.tmp / "dev-1" / "state"
    rig.config("dev-1")
    agent = rig.agent("dev-1").start()
    v1, rel1 = release(rig, "1.0", 1, 2.0, 1.0, None)
    rig.publish_directive("dev-1", rig.directive("dev-1", 1, "detector", rel1, v1))
    assert rig.subscriber.wait_outcome("dev-1", 1, agent=agent)["state"] == "committed"
    current = state / "models" / "detector" / "current"
    before = (os.readlink(current), hashlib.sha256((current / "model.onnx").read_bytes()).hexdigest())

    # Too few samples: no verdict, the update goes on (the contract does not require one).
    spool_inputs(state, 5)
    flipped, rel_flipped = release(rig, "1.5", 2, -3.0, 0.5, SHADOW)
    rig.publish_directive("dev-1", rig.directive("dev-1", 2, "detector", rel_flipped, flipped))
    unjudged = rig.subscriber.wait_outcome("dev-1", 2, agent=agent)
    assert unjudged["state"] == "committed" and unjudged["health"]["shadow"] == {
        "samples": 5, "min_samples": 20, "judged": False}
    rig.publish_directive("dev-1", rig.directive("dev-1", 3, "detector", rel1, v1))  # back to 1.0
    assert rig.subscriber.wait_outcome("dev-1", 3, agent=agent)["state"] == "committed"

    # A candidate that ranks the classes the other way round: the precheck passes (its own
    # golden outputs match), the shadow evaluation on 25 real inputs does not.
    spool_inputs(state, 25)
    wrong, rel_wrong = release(rig, "2.0", 4, -3.0, 0.5, SHADOW)
    rig.publish_directive("dev-1", rig.directive("dev-1", 4, "detector", rel_wrong, wrong))
    refused = rig.subscriber.wait_outcome("dev-1", 4, agent=agent)
    assert refused["state"] == "failed" and refused["error_code"] == "SHADOW_DISAGREES", refused
    figures = refused["health"]["shadow"]
    assert figures["samples"] == 25 and figures["agreement"] < 0.9 and figures["min_agreement"] == 0.9
    assert set(figures["latency_ms"]) == {"candidate", "current"}
    assert "agrees with the current model on" in refused["detail"]
    assert (os.readlink(current), hashlib.sha256((current / "model.onnx").read_bytes()).hexdigest()) == before

    good, rel_good = release(rig, "3.0", 5, 3.0, 0.5, SHADOW)
    rig.publish_directive("dev-1", rig.directive("dev-1", 5, "detector", rel_good, good))
    committed = rig.subscriber.wait_outcome("dev-1", 5, agent=agent)
    assert committed["state"] == "committed", committed
    assert committed["health"]["shadow"]["agreement"] == 1.0 and committed["health"]["shadow"]["judged"]
    assert committed["active_sha256"] == good.sha256
