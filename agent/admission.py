"""Directive admission: what a device does with one directive payload, decided without side effects.

`admit()` holds every rule a directive must pass before it may become an update (or cancel the one
in flight), in the order the agent applies them. The agent (agent.directives, behind Agent.handle_payload) turns its decision
into journal writes and events; the server's fleet simulator calls the same function for
thousands of simulated devices, so the rules are written once. It does no I/O and keeps no state:
everything the device knows comes in as a DeviceView, and `now` is passed in.

The checks, in order (the first that fails decides):

 1. payload size (MAX_PAYLOAD_BYTES)               PAYLOAD_TOO_LARGE  seq 0
 2. JSON                                           MALFORMED          seq 0
 3. directive envelope: rollout key, payload type  UNKNOWN_KEY, SIGNATURE_INVALID,
    and schema (agent.protocol.verify_directive)   WRONG_PAYLOAD_TYPE, MALFORMED  seq 0
 4. addressed to this device                       WRONG_DEVICE       seq 0
 5. seq == the model's last seq                    Ignore: the retained directive re-delivered
 6. seq < the model's last seq                     REPLAYED           its seq, not recorded
 7. an update is in progress, of another model,    Defer: one update at a time
    or of this model past prechecking (activating,
    trial, rolling_back: those finish or roll back)
 8. directive expired                              EXPIRED
 9. release envelope (release key) and schema      UNKNOWN_KEY, SIGNATURE_INVALID,
    (a lean directive's release_ref: the cached     WRONG_PAYLOAD_TYPE, MALFORMED;
    envelope, DeviceView.releases)                 NeedRelease when it is not cached
10. release.model == directive.model               MALFORMED
11. release expired                                RELEASE_EXPIRED
12. release counter >= the model's rollback floor  BELOW_ROLLBACK_FLOOR
13. the release has an artifact for this hardware  NO_ARTIFACT
14. directive.artifact == that signed artifact     ARTIFACT_MISMATCH
    (hardware, sha256, length)
15. its file_name is a plain, non-hidden name      MALFORMED
16. its sha256 is not deny-listed here, unless    DENYLISTED
    the directive says retry_denied (an operator's
    explicit retry: Accept lifts the entry)
17. already the active, committed model            AlreadyActive: report committed
18. a precheck runtime here for its format         NO_PRECHECK_RUNTIME
    (DeviceView.precheck_formats), unless the
    health contract says "precheck": "none"
    otherwise                                      Accept: start the update
19. an update of this model is in flight, still    Preempt: it ends `failed` SUPERSEDED and
    before activation (agent.machine.PREEMPTIBLE),  step 17/18's decision is carried out at once
    or parked waiting for its maintenance window

A refusal from step 8 on carries `record_seq=True`: the directive is authentic and fresh, so the
device remembers its seq as handled and reports under it. Before that the seq is either unknown
or untrusted (seq 0, another device's directive) or must not move the model's seq back (REPLAYED).
Seqs are judged per model: each model's directive is its own retained message, so after a
reconnect an older seq of one model can follow a newer seq of another.

A newer directive for the model being updated is judged in full while that update is still
preemptible (steps 8-18), so a refusal is reported at once and the update in flight goes on; only
a directive that would start (or confirm) something supersedes it. An emergency revert to the
model already running is Preempt(then=AlreadyActive): the download of the release being reverted
stops, and the revert is confirmed without any work.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from agent.inflight import InFlightUpdate
from agent.machine import Phase, preemptible
from agent.protocol import (
    MAX_PAYLOAD_BYTES,
    Directive,
    ErrorCode,
    ProtocolError,
    ReleaseArtifact,
    ReleaseManifest,
    ReleaseRef,
    format_time,
    verify_directive,
    verify_release,
)
from agent.runtimes import FORMATS, precheck_skipped
from agent.signing import Keyring, VerificationError


@dataclass(frozen=True, kw_only=True)
class DeviceView:
    """What a device knows when a directive arrives. Plain data; admit() only reads it.

    device_id, hardware: this device's identity and hardware target.
    seqs: model -> the highest directive seq it accepted or refused under its own seq.
    seq_floor: a bound on every model's seq (a journal from before per-model seqs had one).
    floors: model -> rollback floor (from the newest release committed here).
    denylist: artifact sha256s that failed a trial here (any collection supporting `in`).
    active: model -> (sha256 `current` points at, whether that model is committed).
    busy: an update is in progress (the agent's journal has an in-flight update).
    busy_model, busy_seq, busy_phase: that update's model, directive seq and phase (an
    agent.machine.Phase value). Unknown (None) means it cannot be preempted: Defer.
    precheck_formats: artifact formats this device has a precheck runtime for (the agent: those
    of agent.runtimes whose package is installed; the simulator: all of them).
    waiting: model -> the seq of its update parked until a maintenance window opens (agent.machine).
    releases: sha256 -> release envelope, the ones lean directives referenced (agent.releases;
    read only: a lookup that misses makes admission answer NeedRelease).
    """

    device_id: str
    hardware: str
    seqs: Mapping[str, int] = field(default_factory=dict)
    seq_floor: int = 0
    floors: Mapping[str, int] = field(default_factory=dict)
    denylist: Collection[str] = frozenset()
    active: Mapping[str, tuple[str | None, bool]] = field(default_factory=dict)
    busy: bool = False
    busy_model: str | None = None
    busy_seq: int = 0
    busy_phase: str | None = None
    precheck_formats: Collection[str] = FORMATS
    waiting: Mapping[str, int] = field(default_factory=dict)
    releases: Mapping[str, dict] = field(default_factory=dict)

    def preemptible_by(self, model: str) -> bool:
        """Whether a newer directive for `model` may cancel the update in flight."""
        return self.busy and self.busy_model == model and preemptible(self.busy_phase)


@dataclass(frozen=True, kw_only=True)
class Refuse:
    """Report `rejected` with `code` and `message` (the event's detail); nothing starts.

    record_seq: the directive was authentic and fresh: remember `seq` as handled (the
    model's seq, last_outcome) and report under it. False: report under `seq` as given (0 when the
    directive could not be trusted) and leave the seqs alone; the agent reports such a payload only once.
    seq, model, sha, rollout_id: the event's context, as far as the directive was readable.
    """

    code: str
    message: str
    record_seq: bool = False
    seq: int = 0
    model: str = ""
    sha: str | None = None
    rollout_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class Ignore:
    """The directive with the seq already handled (or in flight), re-delivered: do nothing."""

    seq: int


@dataclass(frozen=True, kw_only=True)
class Defer:
    """An update is in progress: keep the payload and judge it again once the device is idle."""

    seq: int


@dataclass(frozen=True, kw_only=True)
class AlreadyActive:
    """The desired state is already reached: report `committed` under `seq` (and record it)."""

    seq: int
    model: str
    sha: str
    rollout_id: str | None
    message: str = "already active and committed"


@dataclass(frozen=True, kw_only=True)
class Accept:
    """Start `update` (phase received): record its seq as the model's and report `received`.

    directive and release are the verified documents, for callers that want more than the
    update record carries.
    """

    update: InFlightUpdate
    directive: Directive
    release: ReleaseManifest
    # The directive says retry_denied and its artifact is on the denylist: this sha256 comes off
    # it in the journal write that starts the update; `detail` (the received event's) says so.
    lifted: str | None = None
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class Preempt:
    """A newer directive for the model whose update is in flight, before activation, or parked
    waiting for a window (`parked`): end that update `failed` with SUPERSEDED (`message` is the
    event's detail) and carry out `then` (start the new update, or confirm the model already
    running) in the same journal write."""

    superseded: int  # the seq of the update in flight (or parked)
    then: Accept | AlreadyActive
    message: str
    parked: bool = False

    @property
    def seq(self) -> int:
        return self.then.seq if isinstance(self.then, AlreadyActive) else self.then.update.seq

    @property
    def model(self) -> str:
        return self.then.model if isinstance(self.then, AlreadyActive) else self.then.update.model


@dataclass(frozen=True, kw_only=True)
class NeedRelease:
    """A lean directive, authentic and fresh, whose release envelope is not cached here: fetch it
    (agent.releases.fetch_release) and judge the directive again. `preempting`: it may then
    supersede the update in flight (the broker thread stops that update's step meanwhile)."""

    ref: ReleaseRef
    seq: int
    model: str
    sha: str
    rollout_id: str | None
    preempting: bool = False


Decision = Refuse | Ignore | Defer | AlreadyActive | Accept | Preempt | NeedRelease


def admit(
    *,
    payload: bytes | Mapping[str, Any],
    device: DeviceView,
    release_keys: Keyring,
    rollout_keys: Keyring,
    now: datetime,
) -> Decision:
    """Decide what `device` does with one directive; see the module docstring for the checks.

    payload: the raw MQTT payload (bytes), or the envelope the caller already decoded from JSON
    (anything but bytes is taken as that; checks 1 and 2 are then the caller's).
    now: an aware datetime, compared with the directive's and the release's `expires`; an
    accepted update's `started` is this time.

    Returns a Decision for every payload the json module can read. An exception means a bug, or
    input json itself chokes on (RecursionError on deep nesting): callers reading from the
    network turn any exception into could_not_process(exc), as the agent does.
    """
    if isinstance(payload, (bytes, bytearray)):
        if len(payload) > MAX_PAYLOAD_BYTES:
            return Refuse(code=ErrorCode.PAYLOAD_TOO_LARGE,
                          message=f"directive is {len(payload)} bytes, over the {MAX_PAYLOAD_BYTES}-byte limit")
        try:
            envelope = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return Refuse(code=ErrorCode.MALFORMED, message=f"directive is not valid JSON: {exc}")
    else:
        envelope = payload
    try:
        directive = verify_directive(envelope, rollout_keys)
    except (VerificationError, ProtocolError) as exc:
        return Refuse(code=exc.code, message=f"directive refused: {exc}")
    seq = directive.seq
    if directive.device_id != device.device_id:
        # Another device's seq means nothing here: report under seq 0.
        return Refuse(code=ErrorCode.WRONG_DEVICE,
                      message=f"directive is for device {directive.device_id!r}, this is {device.device_id!r}",
                      model=directive.model)
    context = {"seq": seq, "model": directive.model, "sha": directive.artifact.sha256,
               "rollout_id": directive.rollout_id}
    last = max(device.seqs.get(directive.model, 0), device.seq_floor)
    if seq == last:
        return Ignore(seq=seq)
    if seq < last:
        return Refuse(code=ErrorCode.REPLAYED,
                      message=f"directive seq {seq} is not greater than the last accepted {last}", **context)
    preempting = device.preemptible_by(directive.model)
    if device.busy and not preempting:
        return Defer(seq=seq)

    def refuse(code: str, message: str) -> Refuse:
        return Refuse(code=code, message=message, record_seq=True, **context)

    if directive.expires <= now:
        return refuse(ErrorCode.EXPIRED, f"directive expired at {format_time(directive.expires)}")
    envelope = directive.release
    if directive.release_ref is not None:
        envelope = device.releases.get(directive.release_ref.sha256)
        if envelope is None:
            return NeedRelease(ref=directive.release_ref, preempting=preempting or directive.model in device.waiting,
                               **context)
    try:
        release = verify_release(envelope, release_keys)
    except (VerificationError, ProtocolError) as exc:
        return refuse(exc.code, f"release refused: {exc}")
    if release.model != directive.model:
        return refuse(ErrorCode.MALFORMED,
                      f"directive.model {directive.model!r} does not match release.model {release.model!r}")
    if release.expires is not None and release.expires <= now:
        return refuse(ErrorCode.RELEASE_EXPIRED, f"release expired at {format_time(release.expires)}")
    floor = device.floors.get(release.model, 0)
    if release.counter < floor:
        return refuse(ErrorCode.BELOW_ROLLBACK_FLOOR,
                      f"release counter {release.counter} is below this device's rollback floor {floor}")
    artifact = release.artifact_for(device.hardware)
    if artifact is None:
        have = ", ".join(a.hardware for a in release.artifacts)
        return refuse(ErrorCode.NO_ARTIFACT, f"release has no artifact for hardware {device.hardware!r} ({have})")
    d = directive.artifact
    if (d.hardware, d.sha256, d.length) != (artifact.hardware, artifact.sha256, artifact.length):
        return refuse(ErrorCode.ARTIFACT_MISMATCH,
                      "directive.artifact does not match the signed release artifact for this hardware")
    if not safe_file_name(artifact.file_name):
        return refuse(ErrorCode.MALFORMED, f"release file_name {artifact.file_name!r} is not a plain file name")
    lifted = None
    if artifact.sha256 in device.denylist:
        if not directive.retry_denied:
            return refuse(ErrorCode.DENYLISTED, f"artifact {artifact.sha256} failed a trial on this device before")
        lifted = artifact.sha256
    decision = _start(directive, release, artifact, seq=seq, lifted=lifted, device=device, now=now)
    if (isinstance(decision, Accept) and artifact.format not in device.precheck_formats
            and not precheck_skipped(release.health)):
        return refuse(ErrorCode.NO_PRECHECK_RUNTIME,
                      f"no precheck runtime here for format {artifact.format!r} "
                      f"(this device prechecks: {', '.join(sorted(device.precheck_formats)) or 'nothing'}); "
                      'a release the device cannot precheck needs the health contract {"precheck": "none"}')
    parked = device.waiting.get(directive.model)
    if parked is not None and not preempting:
        return Preempt(superseded=parked, then=decision, parked=True,
                       message=f"superseded by directive {seq} while waiting for its maintenance window")
    if not preempting:
        return decision
    return Preempt(superseded=device.busy_seq, then=decision,
                   message=f"superseded by directive {seq} while {device.busy_phase}, before activation")


def _start(directive: Directive, release: ReleaseManifest, artifact: ReleaseArtifact, *, seq: int, lifted: str | None,
           device: DeviceView, now: datetime) -> AlreadyActive | Accept:
    """Steps 17 on: confirm the model already running, or start the update."""
    d = directive.artifact
    active_sha, committed = device.active.get(release.model, (None, False))
    if active_sha == artifact.sha256 and committed:
        return AlreadyActive(seq=seq, model=release.model, sha=artifact.sha256, rollout_id=directive.rollout_id)
    update = InFlightUpdate.new(
        phase=Phase.RECEIVED,
        seq=seq,
        model=release.model,
        version=release.version,
        counter=release.counter,
        rollback_floor=release.rollback_floor,
        rollout_id=directive.rollout_id,
        sha=artifact.sha256,
        length=artifact.length,
        file_name=artifact.file_name,
        format=artifact.format,
        url=d.url,
        health=release.health,
        transitions=1,
        started=format_time(now),
        **({"delta": asdict(directive.delta)} if _delta_applies(directive, active_sha) else {}),
        **({"windows": list(directive.windows), "release_expires": format_time(release.expires) if release.expires
            else None} if directive.windows else {}),
    )
    detail = (f"artifact {lifted} was deny-listed here; allowed again by an operator's retry (retry_denied)"
              if lifted else "")
    return Accept(update=update, directive=directive, release=release, lifted=lifted, detail=detail)


def _delta_applies(directive: Directive, active_sha: str | None) -> bool:
    """The directive's delta is from the model running here (the agent checks the bytes again)."""
    return directive.delta is not None and bool(active_sha) and directive.delta.base_sha256 == active_sha


def could_not_process(exc: BaseException) -> Refuse:
    """The refusal for a payload whose handling raised: input must never crash a device, or a
    retained payload would crash it again on every restart."""
    return Refuse(code=ErrorCode.MALFORMED,
                  message=f"directive could not be processed: {type(exc).__name__}: {exc}")


def safe_file_name(name: str) -> bool:
    """One path component the store can hold: no separators, NUL, dot names or hidden files."""
    return (bool(name) and "/" not in name and "\x00" not in name and name not in (".", "..")
            and not name.startswith("."))
