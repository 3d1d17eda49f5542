"""Refusal matrix: every bad directive, release, artifact or model is refused with its own error
code, and the active model (link, sha256 and mtime of the app-facing file) is left untouched.

Each case runs a real agent on a clone of a device that has v1 (counter 5, rollback floor 5)
installed and committed."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from hashlib import sha256

import pytest

from agent import signing

from tests.support.agent_fixtures import MODEL, close_rig, install_template, make_rig
from tests.support.agent_harness import (
    HEALTH_FAILS,
    HEALTH_OTHER_SHA,
    Artifact,
    active_fingerprint,
    clone_state,
    directive_envelope,
    journal,
    linear_contract,
    other_key,
    release_envelope,
    wait_for,
)
from tests.support.onnx_models import linear_model

V2_CONTRACT = linear_contract(scale=3.0, bias=0.5)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    rig, _ = make_rig(tmp_path_factory.mktemp("refusals"))
    try:
        inst = install_template(rig, counter=5, rollback_floor=5)
        inst.v2 = Artifact(linear_model(scale=3.0, bias=0.5, padding_bytes=100_000))
        yield inst
    finally:
        close_rig(rig)


def release(inst, artifact: Artifact | None = None, *, counter: int = 6, entry: dict | None = None, **kwargs) -> dict:
    artifact = artifact or inst.v2
    kwargs.setdefault("health", V2_CONTRACT)
    return release_envelope(inst.rig.keys, model=MODEL, version=f"v{counter}", counter=counter,
                            artifacts=[entry or artifact.entry()], **kwargs)


def resigned(envelope: dict, key, edit) -> dict:
    manifest = json.loads(base64.b64decode(envelope["payload"]))
    edit(manifest)
    return signing.sign_envelope(json.dumps(manifest).encode(), signing.RELEASE_PAYLOAD_TYPE, key)


@dataclass
class Case:
    state: str
    code: str
    seq: int  # seq the outcome is reported under (0: not an authentic directive)
    config: dict = field(default_factory=dict)
    detail: str = ""  # a phrase the reported detail must contain


def build(inst, name: str, device: str) -> tuple[Case, list[bytes]]:
    """Return the expected outcome and the directive payloads to publish (in order)."""
    rig, keys, v2 = inst.rig, inst.rig.keys, inst.v2

    def directive(seq=6, rel=None, artifact=None, url=None, **kwargs):
        return rig.directive(device, seq, MODEL, rel or release(inst), artifact or v2, url=url, **kwargs)

    if name == "bad_signature":
        env = json.loads(directive())
        body = json.loads(base64.b64decode(env["payload"]))
        body["seq"] = 99
        env["payload"] = base64.b64encode(json.dumps(body).encode()).decode()
        return Case("rejected", "SIGNATURE_INVALID", 0), [json.dumps(env).encode()]
    if name == "unknown_key":
        return Case("rejected", "UNKNOWN_KEY", 0), [directive(key=other_key())]
    if name == "release_unknown_key":
        rel = release(inst, key=other_key())
        return Case("rejected", "UNKNOWN_KEY", 6), [directive(rel=rel)]
    if name == "other_device":
        url = rig.server.add(f"/artifacts/{v2.sha256}", v2.data)
        payload = directive_envelope(keys, device_id="someone-else", seq=6, model=MODEL, release=release(inst),
                                     artifact=v2.entry(), url=url)
        return Case("rejected", "WRONG_DEVICE", 0), [payload]
    if name == "replayed":
        # seq 10 re-targets v1 (already active: confirmed), then an older seq 7 arrives.
        return Case("rejected", "REPLAYED", 7), [
            rig.directive(device, 10, MODEL, inst.rel1, inst.v1),
            directive(seq=7),
        ]
    if name == "expired":
        return Case("rejected", "EXPIRED", 6), [directive(expires_in=timedelta(seconds=-5), issued_ago=timedelta(hours=1))]
    if name == "below_rollback_floor":
        return Case("rejected", "BELOW_ROLLBACK_FLOOR", 6), [directive(rel=release(inst, counter=3))]
    if name == "no_artifact_for_hardware":
        other = Artifact(v2.data, hardware="other-hw")
        return Case("rejected", "NO_ARTIFACT", 6), [directive(rel=release(inst, other), artifact=other)]
    if name == "directive_artifact_mismatch":
        forged = {**v2.entry(), "sha256": sha256(b"other").hexdigest()}
        url = rig.server.add("/artifacts/forged", b"other")
        payload = directive_envelope(keys, device_id=device, seq=6, model=MODEL, release=release(inst),
                                     artifact=forged, url=url)
        return Case("rejected", "ARTIFACT_MISMATCH", 6), [payload]
    if name == "sha_mismatch":
        tampered = bytearray(v2.data)
        tampered[len(tampered) // 2] ^= 0xFF
        url = rig.server.add(f"/artifacts/tampered-{device}", bytes(tampered))
        return Case("failed", "HASH_MISMATCH", 6), [directive(url=url)]
    if name == "length_overrun":
        short = Artifact(v2.data[:-1000])
        url = rig.server.add(f"/artifacts/long-{device}", v2.data)  # serves 1000 bytes more than signed
        return Case("failed", "TOO_LARGE", 6), [directive(rel=release(inst, short), artifact=short, url=url)]
    if name == "length_overrun_unannounced":
        # No Content-Length up front: the overrun shows only as a byte past the signed length.
        short = Artifact(v2.data[:-1000])
        rig.server.unannounced.add(f"/artifacts/unannounced-{device}")
        url = rig.server.add(f"/artifacts/unannounced-{device}", v2.data)
        return Case("failed", "TOO_LARGE", 6), [directive(rel=release(inst, short), artifact=short, url=url)]
    if name == "malformed_json":
        return Case("rejected", "MALFORMED", 0), [b'{"payloadType": "application/vnd.modelfleet.directive+json", ']
    if name == "schema_violation":
        # Correctly signed by the rollout key, but the payload lacks required fields.
        body = json.dumps({"_type": "directive", "spec_version": 1, "device_id": device, "seq": 6}).encode()
        env = signing.sign_envelope(body, signing.DIRECTIVE_PAYLOAD_TYPE, keys.rollout)
        return Case("rejected", "MALFORMED", 0), [json.dumps(env).encode()]
    if name == "oversized_payload":
        return Case("rejected", "PAYLOAD_TOO_LARGE", 0), [json.dumps({"padding": "x" * 70_000}).encode()]
    if name == "artifact_404":
        return Case("failed", "NOT_FOUND", 6), [directive(url=rig.server.url("/artifacts/gone"))]
    if name == "disk_below_reserve":
        return Case("failed", "DISK_FULL", 6, {"disk_reserve_mb": 1e9}), [directive()]
    if name == "precheck_wrong_outputs":
        rel = release(inst, health=linear_contract(scale=2.0, bias=1.0))  # v1's golden outputs
        return Case("failed", "PRECHECK_FAILED", 6), [directive(rel=rel)]
    if name == "precheck_over_latency_budget":
        rel = release(inst, health=linear_contract(scale=3.0, bias=0.5, latency_budget_ms=0.00001))
        return Case("failed", "PRECHECK_FAILED", 6), [directive(rel=rel)]
    if name == "precheck_not_a_model":
        junk = Artifact(os.urandom(50_000))
        return Case("failed", "PRECHECK_FAILED", 6), [directive(rel=release(inst, junk, health=None), artifact=junk)]
    if name == "precheck_time_limit":
        return Case("failed", "PRECHECK_FAILED", 6, {"precheck_timeout_seconds": 0.05}, "timed out"), [directive()]
    if name == "precheck_memory_limit":
        # 64 MiB of address space: the child cannot even map the runtime, let alone the model.
        return Case("failed", "PRECHECK_FAILED", 6, {"precheck_memory_mb": 64}, "64 MB memory limit"), [directive()]
    if name == "trial_health_command_fails":
        return Case("rolled_back", "TRIAL_FAILED", 6, {"health_command": HEALTH_FAILS}), [directive()]
    if name == "trial_reports_another_sha":
        return Case("rolled_back", "TRIAL_FAILED", 6, {"health_command": HEALTH_OTHER_SHA}), [directive()]
    if name == "trial_error_rate_over_limit":
        cmd = 'printf \'{"model_sha256":"%s","error_rate":0.5}\' "$FLEET_AGENT_EXPECTED_SHA256"'
        return Case("rolled_back", "TRIAL_FAILED", 6, {"health_command": cmd}), [directive()]
    if name == "release_file_name_escapes":
        # Signed by the release key, but store/<sha>/<file_name> would land outside the state dir.
        # (build_release_payload refuses such a name, so the payload is edited and re-signed.)
        rel = resigned(release(inst), keys.release, lambda m: m["artifacts"][0].update(file_name="../../../escape.onnx"))
        return Case("rejected", "MALFORMED", 6, detail="must be a plain file name"), [directive(rel=rel)]
    if name == "release_model_escapes":
        rel = resigned(release(inst), keys.release, lambda m: m.update(model="../escape"))
        return Case("rejected", "MALFORMED", 6, detail="release.model '../escape'"), [directive(rel=rel)]
    if name == "release_expired":
        # TUF's freeze attack: a release signed long ago and held back until it expired.
        rel = release(inst, expires_in=timedelta(seconds=-60))
        return Case("rejected", "RELEASE_EXPIRED", 6), [directive(rel=rel)]
    if name == "release_of_another_model":
        # TUF's mix-and-match: a genuine release of another model inside a genuine directive for this one.
        rel = release_envelope(keys, model="other-model", version="v6", counter=6, artifacts=[v2.entry()],
                               health=V2_CONTRACT)
        return Case("rejected", "MALFORMED", 6, detail="does not match release.model"), [directive(rel=rel)]
    if name == "trial_latency_over_limit":
        cmd = 'printf \'{"model_sha256":"%s","error_rate":0.0,"latency_ms_p95":250}\' "$FLEET_AGENT_EXPECTED_SHA256"'
        return Case("rolled_back", "TRIAL_FAILED", 6, {"health_command": cmd, "max_latency_ms_p95": 100},
                    "p95 latency 250 ms is over the limit 100"), [directive()]
    raise AssertionError(name)


CASES = [
    "bad_signature", "unknown_key", "release_unknown_key", "other_device", "replayed", "expired",
    "below_rollback_floor", "no_artifact_for_hardware", "directive_artifact_mismatch", "sha_mismatch",
    "length_overrun", "length_overrun_unannounced", "malformed_json", "schema_violation", "oversized_payload", "artifact_404",
    "disk_below_reserve", "precheck_wrong_outputs", "precheck_over_latency_budget", "precheck_not_a_model",
    "precheck_time_limit", "precheck_memory_limit",
    "trial_health_command_fails", "trial_reports_another_sha", "trial_error_rate_over_limit",
    "trial_latency_over_limit", "release_file_name_escapes", "release_model_escapes",
    "release_expired", "release_of_another_model",
]


@pytest.mark.parametrize("name", CASES)
def test_it_refuses_and_leaves_the_active_model_untouched(installed, name):
    rig = installed.rig
    device = f"r-{name.replace('_', '-')}"
    state = clone_state(installed.template, rig.tmp / device / "state")
    before = active_fingerprint(state, MODEL)
    case, payloads = build(installed, name, device)
    rig.config(device, state_dir=state, update=case.config or None)
    agent = rig.agent(device).start()
    for i, payload in enumerate(payloads):
        rig.publish_directive(device, payload)
        if i < len(payloads) - 1:  # let each earlier directive settle before the next replaces it
            rig.subscriber.wait_outcome(device, json.loads(base64.b64decode(json.loads(payload)["payload"]))["seq"],
                                        agent=agent)
    outcome = rig.subscriber.wait_outcome(device, case.seq, agent=agent)

    assert (outcome["state"], outcome["error_code"]) == (case.state, case.code), outcome
    assert outcome["detail"], "every refusal says why"
    assert case.detail in outcome["detail"], outcome["detail"]
    assert len(rig.subscriber.outcomes(device, case.seq)) == 1
    assert active_fingerprint(state, MODEL) == before
    assert outcome["active_sha256"] in (None, installed.v1.sha256) if case.seq == 0 else \
        outcome["active_sha256"] == installed.v1.sha256
    j = journal(state)
    assert j["update"] is None
    assert j["models"][MODEL]["current"] == installed.v1.sha256 and j["models"][MODEL]["committed"]
    assert sorted(p.name for p in (state / "store").iterdir()) == [installed.v1.sha256]
    assert list((state / "staging").iterdir()) == []
    assert not list(rig.tmp.rglob("escape*")), "a signed name reached outside the state directory"

    if case.seq == 0:
        # The refused payload stays retained: after a restart it is recognised, not reported again.
        assert agent.stop() == 0
        agent.start()
        wait_for(lambda: f"ignoring a payload refused before" in agent.log_text(), 20, "the re-delivery", agent=agent)
        assert len(rig.subscriber.outcomes(device, 0)) == 1

    if case.state == "rolled_back":
        # The failed sha is deny-listed: the same artifact under a new seq is refused at once.
        assert installed.v2.sha256 in j["denylist"]
        rig.publish_directive(device, rig.directive(device, 7, MODEL, release(installed), installed.v2))
        again = rig.subscriber.wait_outcome(device, 7, agent=agent)
        assert (again["state"], again["error_code"]) == ("rejected", "DENYLISTED")
        assert active_fingerprint(state, MODEL) == before
    agent.stop()
