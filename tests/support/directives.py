"""Forged and edge-case directives, shared by the agent's and the fleet simulator's admission tests.

Signed documents built with throw-away test keys (`release()`, `directive()` and the raw forgeries
our own builders refuse to produce), the device state they arrive at (`Known`: as admit()'s
DeviceView and as an agent journal), the table of cases with the decision agent.admission.admit
must reach (`CASES`), and a real Agent started in a known state (`agent_for`, `events`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from hashlib import sha256
from pathlib import Path

from agent import signing
from agent.admission import Accept, AlreadyActive, Defer, DeviceView, Ignore, Preempt, Refuse
from agent.config import Config, KeysConfig
from agent.daemon import Agent
from agent.journal import atomic_write_json, empty_journal
from agent.protocol import MAX_PAYLOAD_BYTES, build_directive_payload, build_release_payload, utcnow

DEVICE = "box-1"
HARDWARE = "hw-a"
MODEL = "detector"
V1 = sha256(b"v1 bytes").hexdigest()  # active and committed
V2 = b"v2 bytes"
DENIED = b"failed a trial here"
IN_FLIGHT = b"being installed"  # the artifact of the update in flight, when Known is busy


def _key():
    return signing.load_private_key_pem(signing.generate_private_key_pem())


RELEASE_KEY, ROLLOUT_KEY, STRANGER_KEY = _key(), _key(), _key()
RELEASE_PEM = signing.public_key_pem(RELEASE_KEY.public_key())
ROLLOUT_PEM = signing.public_key_pem(ROLLOUT_KEY.public_key())


@dataclass
class Known:
    """The device's state before the directive arrives (baseline: v1 active, seq 5 handled for
    MODEL; busy: an update of `busy_model` (another model by default) in `busy_phase`, started by
    the directive with that same seq 5, for the artifact IN_FLIGHT)."""

    last_seq: int = 5
    floors: dict = field(default_factory=lambda: {MODEL: 3})
    denylist: list = field(default_factory=lambda: [sha256(DENIED).hexdigest()])
    models: dict = field(default_factory=lambda: {
        MODEL: {"current": V1, "previous": None, "file_name": "model.onnx", "committed": True, "version": "1",
                "counter": 3}})
    busy: bool = False
    busy_model: str = "other"
    busy_phase: str = "trial"

    def seqs(self) -> dict[str, int]:
        """Per model, the seq handled last (agent.journal's `seqs`)."""
        if not self.last_seq:
            return {}
        return {MODEL: self.last_seq, **({self.busy_model: self.last_seq} if self.busy else {})}

    def view(self) -> DeviceView:
        return DeviceView(device_id=DEVICE, hardware=HARDWARE, seqs=self.seqs(), floors=self.floors,
                          denylist=self.denylist,
                          active={m: (r.get("current"), bool(r.get("committed"))) for m, r in self.journal_models().items()},
                          busy=self.busy, busy_model=self.busy_model if self.busy else None,
                          busy_seq=self.last_seq if self.busy else 0, busy_phase=self.busy_phase if self.busy else None)

    def journal_models(self) -> dict:
        """`models` as the journal has them: from the trial on, the update's own model is `current`."""
        if not (self.busy and self.busy_phase == "trial"):
            return self.models
        previous = self.models.get(self.busy_model)
        return {**self.models, self.busy_model: {
            "current": sha256(IN_FLIGHT).hexdigest(), "previous": previous["current"] if previous else None,
            "file_name": "model.onnx", "committed": False, "version": "4.0", "counter": 4}}

    def in_flight(self) -> bytes:
        """The directive that started the update in flight (the simulator is made busy with it)."""
        return directive(seq=self.last_seq, model=self.busy_model, rel=release(model=self.busy_model,
                         artifacts=[entry(IN_FLIGHT)]), artifact=entry(IN_FLIGHT))

    def journal(self) -> dict:
        data = {**empty_journal(), "last_seq": self.last_seq, "seqs": self.seqs(), "floors": self.floors,
                "denylist": self.denylist, "models": self.journal_models()}
        if self.busy:
            data["update"] = {"phase": self.busy_phase, "seq": self.last_seq, "model": self.busy_model,
                              "sha": sha256(IN_FLIGHT).hexdigest(), "file_name": "model.onnx", "version": "4.0",
                              "rollout_id": "r-9", "transitions": 6, "trial_restarts": 0}
        return data


# --- signed documents -------------------------------------------------------------------------------


def entry(data: bytes = V2, **override) -> dict:
    return {"hardware": HARDWARE, "format": "onnx", "file_name": "model.onnx", "length": len(data),
            "sha256": sha256(data).hexdigest(), **override}


def release(*, counter: int = 4, artifacts: list | None = None, model: str = MODEL, expires_in=timedelta(days=1),
            key=RELEASE_KEY, payload_type: str = signing.RELEASE_PAYLOAD_TYPE, edit: Callable | None = None,
            health: dict | None = None) -> dict:
    now = utcnow()
    payload = build_release_payload(model=model, version=f"{counter}.0", counter=counter, rollback_floor=0,
                                    created=now - timedelta(days=2), expires=now + expires_in,
                                    artifacts=artifacts or [entry()], health=health, provenance={})
    if edit:  # a signed document our own builder would refuse to produce
        body = json.loads(payload)
        edit(body)
        payload = json.dumps(body).encode()
    return signing.sign_envelope(payload, payload_type, key)


def directive(*, seq: int = 6, device_id: str = DEVICE, model: str = MODEL, rel: dict | None = None,
              artifact: dict | None = None, expires_in=timedelta(hours=1), key=ROLLOUT_KEY,
              payload_type: str = signing.DIRECTIVE_PAYLOAD_TYPE, retry_denied: bool = False) -> bytes:
    now = utcnow()
    art = artifact or entry()
    payload = build_directive_payload(
        device_id=device_id, seq=seq, issued=now - timedelta(hours=2), expires=now + expires_in, rollout_id="r-9",
        model=model, release_envelope=rel or release(),
        artifact={"hardware": art["hardware"], "sha256": art["sha256"], "length": art["length"],
                  "url": "http://127.0.0.1:9/a/v2"}, retry_denied=retry_denied)
    return json.dumps(signing.sign_envelope(payload, payload_type, key)).encode()


def tampered_directive() -> bytes:
    env = json.loads(directive())
    body = json.loads(base64.b64decode(env["payload"]))
    body["seq"] = 99
    env["payload"] = base64.b64encode(json.dumps(body).encode()).decode()
    return json.dumps(env).encode()


def signed_raw(body: dict) -> bytes:
    """A directive signed by the rollout key that our own builder would refuse to produce."""
    return json.dumps(signing.sign_envelope(json.dumps(body).encode(), signing.DIRECTIVE_PAYLOAD_TYPE,
                                            ROLLOUT_KEY)).encode()


# --- the table ------------------------------------------------------------------------------------------


@dataclass
class Case:
    payload: Callable[[], bytes]
    decision: type
    code: str | None = None
    seq: int = 0
    known: Known = field(default_factory=Known)
    message: str = ""  # a phrase the refusal message must contain
    then: type | None = None  # Preempt: what it carries out (Accept or AlreadyActive)


def busy(model: str = MODEL, phase: str = "downloading", **known) -> Known:
    """A device updating `model` (by directive 5), now in `phase`."""
    return Known(busy=True, busy_model=model, busy_phase=phase, **known)


CASES = {
    # 1-3: before anything is trusted; reported under seq 0.
    "too_large": Case(lambda: b"{" + b" " * MAX_PAYLOAD_BYTES + b"}", Refuse, "PAYLOAD_TOO_LARGE", 0,
                      message="-byte limit"),
    "not_json": Case(lambda: b'{"payloadType": ', Refuse, "MALFORMED", 0, message="not valid JSON"),
    "not_utf8": Case(lambda: b'{"a": "\xff"}', Refuse, "MALFORMED", 0, message="not valid JSON"),
    "envelope_not_an_object": Case(lambda: b"[1, 2]", Refuse, "MALFORMED", 0, message="must be a JSON object"),
    "directive_unknown_key": Case(lambda: directive(key=STRANGER_KEY), Refuse, "UNKNOWN_KEY", 0),
    "directive_bad_signature": Case(tampered_directive, Refuse, "SIGNATURE_INVALID", 0),
    "directive_wrong_payload_type": Case(lambda: directive(payload_type=signing.RELEASE_PAYLOAD_TYPE), Refuse,
                                         "WRONG_PAYLOAD_TYPE", 0),
    "directive_schema_violation": Case(
        lambda: signed_raw({"_type": "directive", "spec_version": 1, "device_id": DEVICE, "seq": 6}),
        Refuse, "MALFORMED", 0, message="directive refused"),
    "directive_seq_zero": Case(
        lambda: signed_raw({**json.loads(base64.b64decode(json.loads(directive())["payload"])), "seq": 0}),
        Refuse, "MALFORMED", 0, message="seq must be >= 1"),
    # 4: another device's seq means nothing here.
    "wrong_device": Case(lambda: directive(device_id="box-2"), Refuse, "WRONG_DEVICE", 0, message="box-2"),
    "wrong_device_while_busy": Case(lambda: directive(device_id="box-2"), Refuse, "WRONG_DEVICE", 0,
                                    known=Known(busy=True)),
    # 5-7: seq bookkeeping comes before busy, busy before everything about the release.
    "same_seq": Case(lambda: directive(seq=5), Ignore, seq=5),
    "same_seq_even_if_expired": Case(lambda: directive(seq=5, expires_in=-timedelta(minutes=1)), Ignore, seq=5),
    "replayed": Case(lambda: directive(seq=4), Refuse, "REPLAYED", 4, message="not greater than the last accepted 5"),
    "replayed_while_busy": Case(lambda: directive(seq=4), Refuse, "REPLAYED", 4, known=Known(busy=True)),
    "busy": Case(lambda: directive(), Defer, seq=6, known=Known(busy=True)),
    "busy_even_if_expired": Case(lambda: directive(expires_in=-timedelta(minutes=1)), Defer, seq=6,
                                 known=Known(busy=True)),
    # 7 and 19: a newer directive for the model being updated supersedes it before activation; one for
    # another model, or arriving from activation on, waits.
    "another_models_download": Case(lambda: directive(), Defer, seq=6, known=busy("other", "downloading")),
    "same_model_activating": Case(lambda: directive(), Defer, seq=6, known=busy(MODEL, "activating")),
    "same_model_in_trial": Case(lambda: directive(), Defer, seq=6, known=busy(MODEL, "trial")),
    "preempts_received": Case(lambda: directive(), Preempt, seq=6, known=busy(MODEL, "received"), then=Accept),
    "preempts_a_download": Case(lambda: directive(), Preempt, seq=6, known=busy(MODEL, "downloading"), then=Accept),
    "preempts_verifying": Case(lambda: directive(), Preempt, seq=6, known=busy(MODEL, "verifying"), then=Accept),
    "preempts_a_precheck": Case(lambda: directive(), Preempt, seq=6, known=busy(MODEL, "prechecking"), then=Accept),
    "revert_preempts_a_download": Case(
        lambda: directive(rel=release(artifacts=[entry(b"v1 bytes")]), artifact=entry(b"v1 bytes")), Preempt,
        seq=6, known=busy(MODEL, "downloading"), then=AlreadyActive),
    "in_flight_directive_again": Case(lambda: directive(seq=5), Ignore, seq=5, known=busy(MODEL, "downloading")),
    "replayed_during_a_download": Case(lambda: directive(seq=4), Refuse, "REPLAYED", 4,
                                       known=busy(MODEL, "downloading")),
    "expired_during_a_download": Case(lambda: directive(expires_in=-timedelta(minutes=1)), Refuse, "EXPIRED", 6,
                                      known=busy(MODEL, "downloading")),
    "denylisted_during_a_download": Case(
        lambda: directive(rel=release(artifacts=[entry(DENIED)]), artifact=entry(DENIED)), Refuse, "DENYLISTED", 6,
        known=busy(MODEL, "downloading")),
    # 8-16: authentic and fresh; recorded under the directive's seq.
    "expired": Case(lambda: directive(expires_in=-timedelta(minutes=1)), Refuse, "EXPIRED", 6),
    "expired_before_release_checks": Case(
        lambda: directive(expires_in=-timedelta(minutes=1), rel=release(key=STRANGER_KEY)), Refuse, "EXPIRED", 6),
    "release_unknown_key": Case(lambda: directive(rel=release(key=STRANGER_KEY)), Refuse, "UNKNOWN_KEY", 6,
                                message="release refused"),
    "release_signed_by_rollout_key": Case(lambda: directive(rel=release(key=ROLLOUT_KEY)), Refuse, "UNKNOWN_KEY", 6),
    "release_bad_signature": Case(
        lambda: directive(rel={**release(), "payload": release(counter=9)["payload"]}), Refuse, "SIGNATURE_INVALID",
        6),
    "release_wrong_payload_type": Case(
        lambda: directive(rel=release(payload_type=signing.DIRECTIVE_PAYLOAD_TYPE)), Refuse, "WRONG_PAYLOAD_TYPE", 6),
    "release_file_name_escapes": Case(
        lambda: directive(rel=release(edit=lambda b: b["artifacts"][0].update(file_name="../../x.onnx"))),
        Refuse, "MALFORMED", 6, message="must be a plain file name"),
    "model_mismatch": Case(lambda: directive(model="segmenter"), Refuse, "MALFORMED", 6,
                           message="does not match release.model"),
    "release_expired": Case(lambda: directive(rel=release(expires_in=-timedelta(hours=1))), Refuse, "RELEASE_EXPIRED", 6),
    "below_rollback_floor": Case(lambda: directive(rel=release(counter=2)), Refuse, "BELOW_ROLLBACK_FLOOR", 6,
                                 message="below this device's rollback floor 3"),
    "at_rollback_floor": Case(lambda: directive(rel=release(counter=3)), Accept, seq=6),
    "floor_of_another_model_does_not_count": Case(lambda: directive(rel=release(counter=1)), Accept, seq=6,
                                                  known=Known(floors={"segmenter": 9})),
    "no_artifact_for_hardware": Case(
        lambda: directive(rel=release(artifacts=[entry(hardware="hw-b")]), artifact=entry(hardware="hw-b")),
        Refuse, "NO_ARTIFACT", 6, message="'hw-a' (hw-b)"),
    "directive_sha_differs": Case(lambda: directive(artifact=entry(b"other bytes")), Refuse, "ARTIFACT_MISMATCH", 6),
    "directive_length_differs": Case(lambda: directive(artifact=entry(length=len(V2) + 1)), Refuse,
                                     "ARTIFACT_MISMATCH", 6),
    "directive_hardware_differs": Case(
        lambda: directive(rel=release(artifacts=[entry(), entry(hardware="hw-b")]), artifact=entry(hardware="hw-b")),
        Refuse, "ARTIFACT_MISMATCH", 6),
    "hidden_file_name": Case(lambda: directive(rel=release(artifacts=[entry(file_name=".model.onnx")])), Refuse,
                             "MALFORMED", 6, message="is not a plain file name"),
    "denylisted": Case(lambda: directive(rel=release(artifacts=[entry(DENIED)]), artifact=entry(DENIED)), Refuse,
                       "DENYLISTED", 6),
    "denylisted_retried_by_an_operator": Case(
        lambda: directive(rel=release(artifacts=[entry(DENIED)]), artifact=entry(DENIED), retry_denied=True), Accept,
        seq=6),
    "denylisted_retried_during_a_download": Case(
        lambda: directive(rel=release(artifacts=[entry(DENIED)]), artifact=entry(DENIED), retry_denied=True),
        Preempt, seq=6, known=busy(MODEL, "downloading"), then=Accept),
    "retry_of_an_artifact_not_denied": Case(lambda: directive(retry_denied=True), Accept, seq=6),
    "retry_below_rollback_floor": Case(
        lambda: directive(rel=release(counter=2, artifacts=[entry(DENIED)]), artifact=entry(DENIED),
                          retry_denied=True), Refuse, "BELOW_ROLLBACK_FLOOR", 6),
    "floor_before_denylist": Case(
        lambda: directive(rel=release(counter=2, artifacts=[entry(DENIED)]), artifact=entry(DENIED)), Refuse,
        "BELOW_ROLLBACK_FLOOR", 6),
    # 17: converge; otherwise start.
    "already_active_and_committed": Case(
        lambda: directive(rel=release(artifacts=[entry(b"v1 bytes")]), artifact=entry(b"v1 bytes")),
        AlreadyActive, seq=6),
    "active_but_not_committed": Case(
        lambda: directive(rel=release(artifacts=[entry(b"v1 bytes")]), artifact=entry(b"v1 bytes")), Accept, seq=6,
        known=Known(models={MODEL: {"current": V1, "committed": False}})),
    # 18: a format this device has no precheck runtime for (tensorrt, other), unless the contract
    # skips the precheck; converging on it needs no precheck.
    "no_precheck_runtime": Case(lambda: directive(rel=release(artifacts=[entry(format="tensorrt")])), Refuse,
                                "NO_PRECHECK_RUNTIME", 6, message="no precheck runtime here for format 'tensorrt'"),
    "no_precheck_runtime_during_a_download": Case(
        lambda: directive(rel=release(artifacts=[entry(format="other")])), Refuse, "NO_PRECHECK_RUNTIME", 6,
        known=busy(MODEL, "downloading")),
    "no_precheck_runtime_but_precheck_none": Case(
        lambda: directive(rel=release(artifacts=[entry(format="tensorrt")], health={"precheck": "none"})), Accept,
        seq=6),
    "no_precheck_runtime_already_active": Case(
        lambda: directive(rel=release(artifacts=[entry(b"v1 bytes", format="tensorrt")]),
                          artifact=entry(b"v1 bytes")), AlreadyActive, seq=6),
    "tflite": Case(lambda: directive(rel=release(artifacts=[entry(format="tflite", file_name="model.tflite")])),
                   Accept, seq=6),
    "new_model": Case(lambda: directive(), Accept, seq=6, known=Known(models={})),
    "first_directive_ever": Case(lambda: directive(seq=1), Accept, seq=1, known=Known(last_seq=0, models={})),
    "accepted": Case(lambda: directive(), Accept, seq=6),
}


# --- a real agent in that state -------------------------------------------------------------------


def agent_for(tmp_path: Path, known: Known) -> Agent:
    """A real Agent (no MQTT link) whose journal holds `known`; it writes its events to its outbox."""
    state = tmp_path / "state"
    state.mkdir()
    atomic_write_json(state / "journal.json", known.journal())
    cfg = Config(device_id=DEVICE, hardware=HARDWARE, state_dir=state,
                 keys=KeysConfig(release=(RELEASE_PEM,), rollout=(ROLLOUT_PEM,)))
    return Agent(cfg, link_factory=None)


def events(agent: Agent) -> list[dict]:
    """The events `agent` has queued to publish, oldest first."""
    return [json.loads(p.read_bytes()) for p in agent.outbox.pending()]

