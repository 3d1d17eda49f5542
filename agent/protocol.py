"""The wire format: MQTT topics, payload schemas, error codes.

The server imports this module; it never defines its own copy of the format. Every parser
raises ProtocolError with a code and a message naming the offending field, so a malformed
payload is counted and reported, never a crash.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from agent.signing import DIRECTIVE_PAYLOAD_TYPE, RELEASE_PAYLOAD_TYPE, Keyring, verify_envelope
from agent.windows import WindowError, parse_windows

SPEC_VERSION = 1
MAX_PAYLOAD_BYTES = 64 * 1024
DEFAULT_TOPIC_ROOT = "fleet"

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
IDENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ErrorCode:
    """Machine-readable outcome codes a device reports. Never 'unknown'."""

    MALFORMED = "MALFORMED"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    SIGNATURE_INVALID = "SIGNATURE_INVALID"
    UNKNOWN_KEY = "UNKNOWN_KEY"
    WRONG_PAYLOAD_TYPE = "WRONG_PAYLOAD_TYPE"
    WRONG_DEVICE = "WRONG_DEVICE"
    REPLAYED = "REPLAYED"
    EXPIRED = "EXPIRED"
    RELEASE_EXPIRED = "RELEASE_EXPIRED"
    BELOW_ROLLBACK_FLOOR = "BELOW_ROLLBACK_FLOOR"
    NO_ARTIFACT = "NO_ARTIFACT"
    DENYLISTED = "DENYLISTED"
    DISK_FULL = "DISK_FULL"
    DOWNLOAD_FAILED = "DOWNLOAD_FAILED"
    NOT_FOUND = "NOT_FOUND"
    TOO_LARGE = "TOO_LARGE"
    HASH_MISMATCH = "HASH_MISMATCH"
    PRECHECK_FAILED = "PRECHECK_FAILED"
    ACTIVATE_FAILED = "ACTIVATE_FAILED"
    TRIAL_FAILED = "TRIAL_FAILED"
    ROLLBACK_LOOP = "ROLLBACK_LOOP"
    # Added with the device agent:
    ARTIFACT_MISMATCH = "ARTIFACT_MISMATCH"  # directive.artifact differs from the signed release artifact
    ROLLBACK_FAILED = "ROLLBACK_FAILED"  # `previous` failed re-verification; the new model stays active
    LOCAL_ROLLBACK = "LOCAL_ROLLBACK"  # an operator ran `fleet-agent rollback MODEL` on the box
    SUPERSEDED = "SUPERSEDED"  # a newer directive for the same model cancelled this update before activation
    NO_PRECHECK_RUNTIME = "NO_PRECHECK_RUNTIME"  # no precheck runtime here for the artifact's format
    SHADOW_DISAGREES = "SHADOW_DISAGREES"  # run beside the current model on real inputs, it disagreed (agent.shadow)
    # Root of trust and freshness (agent.trust): the newest signed timestamp is older than
    # keys.max_staleness_seconds (a freeze attack or a partition), reported in presence.trust.
    STALE_DIRECTIVES = "STALE_DIRECTIVES"


class State:
    """Update states a device reports on its events topic (DESIGN.md §5)."""

    RECEIVED = "received"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    PRECHECKING = "prechecking"
    ACTIVATING = "activating"
    TRIAL = "trial"
    COMMITTED = "committed"  # terminal success: healthy after activation
    ROLLED_BACK = "rolled_back"  # terminal failure after activation
    FAILED = "failed"  # terminal failure before activation; current untouched
    REJECTED = "rejected"  # directive refused before any work
    # Downloaded, verified and prechecked; activates when one of the directive's maintenance
    # windows opens (the event's next_opening), by the device's own clock (agent.windows).
    WAITING_FOR_WINDOW = "waiting_for_window"

    TERMINAL = frozenset({COMMITTED, ROLLED_BACK, FAILED, REJECTED})
    ALL = frozenset({RECEIVED, DOWNLOADING, VERIFYING, PRECHECKING, WAITING_FOR_WINDOW, ACTIVATING, TRIAL}) | TERMINAL


class ProtocolError(Exception):
    def __init__(self, message: str, code: str = ErrorCode.MALFORMED):
        super().__init__(message)
        self.code = code


def client_id(device_id: str) -> str:
    """The MQTT client id of a device. The broker pins it to the device's credentials (a client with
    another id is refused), so no client can knock a device off by connecting with its id."""
    return f"fleet-agent-{device_id}"


@dataclass(frozen=True)
class Topics:
    """The MQTT topics of one fleet. A device's desired state is one retained directive per model
    (`{root}/devices/{id}/models/{model}/directive`), so rollouts of two models on one box never
    overwrite or clear each other; what it reports goes to events, telemetry and presence."""

    root: str = DEFAULT_TOPIC_ROOT

    def device(self, device_id: str, kind: str) -> str:
        return f"{self.root}/devices/{device_id}/{kind}"

    def directive(self, device_id: str, model: str) -> str:
        return f"{self.root}/devices/{device_id}/models/{model}/directive"

    def directives(self, device_id: str) -> str:
        """The subscription filter for every model's directive of one device."""
        return f"{self.root}/devices/{device_id}/models/+/directive"

    def events(self, device_id: str) -> str:
        return self.device(device_id, "events")

    def telemetry(self, device_id: str) -> str:
        return self.device(device_id, "telemetry")

    def presence(self, device_id: str) -> str:
        return self.device(device_id, "presence")

    def keyring(self) -> str:
        """The current root-signed keyring (agent.trust), retained by the server for every device."""
        return f"{self.root}/keyring"

    def timestamp(self, device_id: str) -> str:
        """The device's short-lived signed timestamp (agent.trust), retained and re-signed by the server."""
        return self.device(device_id, "timestamp")

    def ingest_status(self) -> str:
        """Retained by the server's ingest each time it starts a new broker session (first start,
        broker crash, session expired): what the broker had queued for it may be gone, so every
        device sends again the events the broker acknowledged recently (`ingest_status_payload`)."""
        return f"{self.root}/server/ingest"

    def parse(self, topic: str) -> tuple[str, str]:
        """Return (device_id, kind) for a device topic, else raise ProtocolError; kind is
        "directive" for any model's directive topic."""
        parts = topic.split("/")
        root_parts = self.root.split("/")
        n = len(root_parts)
        if parts[:n] != root_parts or len(parts) < n + 3 or parts[n] != "devices" or not IDENT_RE.match(parts[n + 1]):
            raise ProtocolError(f"not a device topic: {topic!r}")
        rest = parts[n + 2:]
        if len(rest) == 1 and rest[0] in ("events", "telemetry", "presence"):
            return parts[n + 1], rest[0]
        if len(rest) == 3 and rest[0] == "models" and IDENT_RE.match(rest[1]) and rest[2] == "directive":
            return parts[n + 1], "directive"
        raise ProtocolError(f"not a device topic: {topic!r}")


# --- time -------------------------------------------------------------------------------------


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def format_time(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: object, name: str) -> datetime:
    if not isinstance(value, str):
        raise ProtocolError(f"{name} must be an RFC 3339 UTC timestamp string")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ProtocolError(f"{name} is not an RFC 3339 timestamp: {value!r}") from None
    if parsed.tzinfo is None:
        raise ProtocolError(f"{name} must carry a timezone (use Z)")
    return parsed


# --- field helpers ----------------------------------------------------------------------------


def _req(data: Mapping, name: str, kind: type | tuple, where: str) -> Any:
    if name not in data:
        raise ProtocolError(f"{where}.{name} is missing")
    value = data[name]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ProtocolError(f"{where}.{name} must be {expected}, got {type(value).__name__}")
    return value


def _opt(data: Mapping, name: str, kind: type | tuple, where: str, default: Any = None) -> Any:
    if data.get(name) is None:
        return default
    return _req(data, name, kind, where)


def _sha(data: Mapping, name: str, where: str) -> str:
    value = _req(data, name, str, where)
    if not SHA256_RE.match(value):
        raise ProtocolError(f"{where}.{name} must be 64 lowercase hex characters")
    return value


def _path_part(data: Mapping, name: str, where: str, *, ident: bool = False) -> str:
    """A value the agent turns into one path component (models/<model>/, store/<sha>/<file_name>):
    a signed document still must not be able to point outside the state directory."""
    value = _req(data, name, str, where)
    if ident:
        if not IDENT_RE.match(value):
            raise ProtocolError(f"{where}.{name} {value!r} must be 1-128 characters of A-Z a-z 0-9 . _ -")
    elif value in ("", ".", "..") or any(c in value for c in "/\\\0") or len(value) > 255:
        raise ProtocolError(f"{where}.{name} {value!r} must be a plain file name (no path separators)")
    return value


def _nonneg_int(data: Mapping, name: str, where: str) -> int:
    value = _req(data, name, int, where)
    if value < 0:
        raise ProtocolError(f"{where}.{name} must be >= 0")
    return value


def decode_json(payload: bytes, what: str) -> dict:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(
            f"{what} is {len(payload)} bytes, over the {MAX_PAYLOAD_BYTES}-byte limit",
            ErrorCode.PAYLOAD_TOO_LARGE,
        )
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return data


def encode_json(data: Mapping) -> bytes:
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode("utf-8")


# --- release manifest -------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseArtifact:
    hardware: str
    format: str
    file_name: str
    length: int
    sha256: str
    runtime: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ReleaseManifest:
    model: str
    version: str
    counter: int
    rollback_floor: int
    created: datetime
    expires: datetime | None
    artifacts: tuple[ReleaseArtifact, ...]
    health: dict | None
    provenance: dict

    def artifact_for(self, hardware: str) -> ReleaseArtifact | None:
        return next((a for a in self.artifacts if a.hardware == hardware), None)


def build_release_payload(
    *,
    model: str,
    version: str,
    counter: int,
    rollback_floor: int,
    created: datetime,
    expires: datetime | None,
    artifacts: list[dict],
    health: dict | None,
    provenance: dict,
) -> bytes:
    body = {
        "_type": "release",
        "spec_version": SPEC_VERSION,
        "model": model,
        "version": version,
        "counter": counter,
        "rollback_floor": rollback_floor,
        "created": format_time(created),
        "expires": format_time(expires) if expires else None,
        "artifacts": artifacts,
        "health": health,
        "provenance": provenance,
    }
    payload = encode_json(body)
    parse_release(payload)  # never sign something our own agents would refuse
    return payload


def parse_release(payload: bytes) -> ReleaseManifest:
    data = decode_json(payload, "release manifest")
    where = "release"
    if data.get("_type") != "release":
        raise ProtocolError("release._type must be 'release'")
    if data.get("spec_version") != SPEC_VERSION:
        raise ProtocolError(f"release.spec_version {data.get('spec_version')!r} is not supported")
    counter = _nonneg_int(data, "counter", where)
    floor = _nonneg_int(data, "rollback_floor", where)
    if floor > counter:
        raise ProtocolError("release.rollback_floor must not exceed release.counter")
    raw_artifacts = _req(data, "artifacts", list, where)
    if not raw_artifacts:
        raise ProtocolError("release.artifacts must not be empty")
    artifacts = []
    for i, raw in enumerate(raw_artifacts):
        w = f"release.artifacts[{i}]"
        if not isinstance(raw, Mapping):
            raise ProtocolError(f"{w} must be an object")
        artifacts.append(
            ReleaseArtifact(
                hardware=_req(raw, "hardware", str, w),
                format=_req(raw, "format", str, w),
                file_name=_path_part(raw, "file_name", w),
                length=_nonneg_int(raw, "length", w),
                sha256=_sha(raw, "sha256", w),
                runtime=_opt(raw, "runtime", dict, w, {}),
            )
        )
    expires = data.get("expires")
    return ReleaseManifest(
        model=_path_part(data, "model", where, ident=True),
        version=_req(data, "version", str, where),
        counter=counter,
        rollback_floor=floor,
        created=parse_time(data.get("created"), "release.created"),
        expires=parse_time(expires, "release.expires") if expires is not None else None,
        artifacts=tuple(artifacts),
        health=_opt(data, "health", dict, where),
        provenance=_opt(data, "provenance", dict, where, {}),
    )


def verify_release(envelope: object, keyring: Keyring) -> ReleaseManifest:
    return parse_release(verify_envelope(envelope, RELEASE_PAYLOAD_TYPE, keyring))


# --- directive --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DirectiveArtifact:
    hardware: str
    sha256: str
    length: int
    url: str


@dataclass(frozen=True)
class DirectiveDelta:
    """A delta from `base_sha256` (the model the device runs) to the directive's artifact: the
    device may fetch these `length` bytes instead and rebuild the artifact (agent.deltas), which
    it still accepts only if it matches the artifact's signed length and sha256."""

    base_sha256: str
    url: str
    length: int
    sha256: str
    method: str


@dataclass(frozen=True)
class ReleaseRef:
    """A lean directive's reference to its release envelope, instead of the envelope itself: the
    device fetches `length` bytes from `url` (the server it enrolled with), accepts them only if
    their sha256 is `sha256`, verifies the envelope with the release keys as always, and caches it
    (agent.releases), so the broker keeps a few hundred bytes per device and model instead of the
    whole signed release with its health contract."""

    sha256: str
    length: int
    url: str


def release_bytes(envelope: Mapping) -> bytes:
    """The canonical bytes of a release envelope (sorted keys, no spaces): what a lean directive's
    ReleaseRef digests and what the server serves for it."""
    return encode_json(envelope)


# What this agent understands beyond the original wire format, advertised in its presence so
# the server sends it only what it can take: release_ref (lean directives, ReleaseRef).
FEATURES = ("release_ref",)


@dataclass(frozen=True)
class Directive:
    device_id: str
    seq: int
    issued: datetime
    expires: datetime
    rollout_id: str | None
    model: str
    # The release DSSE envelope, verified separately with the release key; None in a lean
    # directive, which carries `release_ref` instead (exactly one of the two is set).
    release: dict | None
    artifact: DirectiveArtifact
    # An operator's explicit retry: the artifact may be tried again even if it is on this device's
    # denylist (it failed a trial here before); the agent lifts the entry. Absent: false.
    retry_denied: bool = False
    delta: DirectiveDelta | None = None  # absent: only the full artifact (agents before deltas ignore it)
    # Maintenance windows (agent.windows): activate only while one is open. Empty: at once.
    windows: tuple[str, ...] = ()
    release_ref: ReleaseRef | None = None


def build_directive_payload(
    *,
    device_id: str,
    seq: int,
    issued: datetime,
    expires: datetime,
    rollout_id: str | None,
    model: str,
    release_envelope: dict | None = None,
    artifact: dict,
    retry_denied: bool = False,
    delta: dict | None = None,
    windows: list[str] | tuple[str, ...] = (),
    release_ref: dict | None = None,
) -> bytes:
    """The signed body of a directive. retry_denied=True (an operator retrying a device that rolled
    back) lets the device try the artifact again although it deny-listed it; the key is left out
    when false, so such a payload is byte for byte what earlier servers built. `delta` ({base_sha256,
    url, length, sha256, method}) is left out likewise when None, and `windows` (maintenance
    windows, agent.windows) when empty. Exactly one of `release_envelope` (the whole signed release)
    and `release_ref` ({sha256, length, url}: a lean directive, ReleaseRef) is given."""
    body = {
        "_type": "directive",
        "spec_version": SPEC_VERSION,
        "device_id": device_id,
        "seq": seq,
        "issued": format_time(issued),
        "expires": format_time(expires),
        "rollout_id": rollout_id,
        "model": model,
        "artifact": artifact,
    }
    if release_ref is not None:
        body["release_ref"] = release_ref
    else:
        body["release"] = release_envelope
    if retry_denied:
        body["retry_denied"] = True
    if delta is not None:
        body["delta"] = delta
    if windows:
        body["windows"] = list(windows)
    payload = encode_json(body)
    parse_directive(payload)
    return payload


def parse_directive(payload: bytes) -> Directive:
    data = decode_json(payload, "directive")
    where = "directive"
    if data.get("_type") != "directive":
        raise ProtocolError("directive._type must be 'directive'")
    if data.get("spec_version") != SPEC_VERSION:
        raise ProtocolError(f"directive.spec_version {data.get('spec_version')!r} is not supported")
    raw_artifact = _req(data, "artifact", dict, where)
    w = "directive.artifact"
    url = _req(raw_artifact, "url", str, w)
    if not url.startswith(("http://", "https://")):
        raise ProtocolError("directive.artifact.url must be an http(s) URL")
    seq = _req(data, "seq", int, where)
    if seq < 1:
        raise ProtocolError("directive.seq must be >= 1")
    rollout_id = data.get("rollout_id")
    if rollout_id is not None and not isinstance(rollout_id, (str, int)):
        raise ProtocolError("directive.rollout_id must be a string or null")
    retry_denied = _opt(data, "retry_denied", bool, where, False)
    raw_delta = _opt(data, "delta", dict, where)
    delta = None
    if raw_delta is not None:
        w = "directive.delta"
        delta_url = _req(raw_delta, "url", str, w)
        if not delta_url.startswith(("http://", "https://")):
            raise ProtocolError("directive.delta.url must be an http(s) URL")
        delta = DirectiveDelta(
            base_sha256=_sha(raw_delta, "base_sha256", w), url=delta_url,
            length=_nonneg_int(raw_delta, "length", w), sha256=_sha(raw_delta, "sha256", w),
            method=_req(raw_delta, "method", str, w),
        )
    raw_ref = _opt(data, "release_ref", dict, where)
    release_ref = None
    if raw_ref is not None:
        if data.get("release") is not None:
            raise ProtocolError("directive has both release and release_ref; a directive carries one of them")
        w = "directive.release_ref"
        ref_url = _req(raw_ref, "url", str, w)
        if not ref_url.startswith(("http://", "https://")):
            raise ProtocolError("directive.release_ref.url must be an http(s) URL")
        release_ref = ReleaseRef(sha256=_sha(raw_ref, "sha256", w), length=_nonneg_int(raw_ref, "length", w),
                                 url=ref_url)
        if release_ref.length > MAX_PAYLOAD_BYTES:
            raise ProtocolError(f"directive.release_ref.length {release_ref.length} is over the "
                                f"{MAX_PAYLOAD_BYTES}-byte limit of a release manifest", ErrorCode.PAYLOAD_TOO_LARGE)
    windows = _opt(data, "windows", list, where, [])
    try:
        parse_windows(windows, "directive.windows")
    except WindowError as exc:
        raise ProtocolError(str(exc)) from None
    return Directive(
        device_id=_req(data, "device_id", str, where),
        seq=seq,
        issued=parse_time(data.get("issued"), "directive.issued"),
        expires=parse_time(data.get("expires"), "directive.expires"),
        rollout_id=str(rollout_id) if rollout_id is not None else None,
        model=_req(data, "model", str, where),
        release=None if release_ref is not None else _req(data, "release", dict, where),
        artifact=DirectiveArtifact(
            hardware=_req(raw_artifact, "hardware", str, w),
            sha256=_sha(raw_artifact, "sha256", w),
            length=_nonneg_int(raw_artifact, "length", w),
            url=url,
        ),
        retry_denied=retry_denied,
        delta=delta,
        windows=tuple(windows),
        release_ref=release_ref,
    )


def verify_directive(envelope: object, keyring: Keyring) -> Directive:
    return parse_directive(verify_envelope(envelope, DIRECTIVE_PAYLOAD_TYPE, keyring))


# --- device → server --------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One update-progress report. (device_id, seq, event_no) is unique: the server drops repeats."""

    device_id: str
    event_no: int  # per-device, strictly increasing across all directives
    seq: int  # the directive this event is about (0: none, e.g. a local rollback)
    model: str
    state: str
    error_code: str | None = None
    detail: str = ""
    sha256: str | None = None  # the artifact the event concerns
    active_sha256: str | None = None  # what `current` points at after this step
    rollout_id: str | None = None
    health: dict | None = None
    ts: str = ""
    # How the artifact arrived (downloading's outcome onwards): "delta" or "full", and the bytes
    # fetched for it (a failed delta's included). Left out when None, as earlier agents sent them.
    delivery: str | None = None
    bytes_downloaded: int | None = None
    # waiting_for_window: when the next window opens (RFC 3339 UTC). Left out when None.
    next_opening: str | None = None

    def to_payload(self) -> bytes:
        body = asdict(self)
        for name in ("delivery", "bytes_downloaded", "next_opening"):
            if body[name] is None:
                del body[name]
        return encode_json({"_type": "event", **body})


def parse_event(payload: bytes) -> Event:
    data = decode_json(payload, "event")
    where = "event"
    state = _req(data, "state", str, where)
    if state not in State.ALL:
        raise ProtocolError(f"event.state {state!r} is not a known state")
    error_code = _opt(data, "error_code", str, where)
    if state in (State.FAILED, State.ROLLED_BACK, State.REJECTED) and not error_code:
        raise ProtocolError(f"event.error_code is required when state is {state!r}")
    for name in ("sha256", "active_sha256"):
        if data.get(name) is not None:
            _sha(data, name, where)
    rollout_id = data.get("rollout_id")
    delivery = _opt(data, "delivery", str, where)
    if delivery not in (None, "delta", "full"):
        raise ProtocolError(f"event.delivery {delivery!r} must be 'delta' or 'full'")
    bytes_downloaded = None
    if data.get("bytes_downloaded") is not None:
        bytes_downloaded = _nonneg_int(data, "bytes_downloaded", where)
    next_opening = _opt(data, "next_opening", str, where)
    if next_opening is not None:
        parse_time(next_opening, "event.next_opening")
    return Event(
        device_id=_req(data, "device_id", str, where),
        event_no=_nonneg_int(data, "event_no", where),
        seq=_nonneg_int(data, "seq", where),
        model=_req(data, "model", str, where),
        state=state,
        error_code=error_code,
        detail=_opt(data, "detail", str, where, "")[:2000],
        sha256=data.get("sha256"),
        active_sha256=data.get("active_sha256"),
        rollout_id=str(rollout_id) if rollout_id is not None else None,
        health=_opt(data, "health", dict, where),
        ts=_opt(data, "ts", str, where, ""),
        delivery=delivery,
        bytes_downloaded=bytes_downloaded,
        next_opening=next_opening,
    )


def ingest_status_payload(*, epoch: str) -> bytes:
    """Topics.ingest_status: `epoch` names the ingest session; a device that sees a new one sends
    its recently acknowledged events again (agent/README.md, "Outbox")."""
    return encode_json({"_type": "ingest_status", "epoch": epoch, "since": format_time(utcnow())})


def parse_ingest_status(payload: bytes) -> str:
    """The epoch of an ingest status message (ProtocolError if it is not one)."""
    data = decode_json(payload, "ingest status")
    if data.get("_type") != "ingest_status":
        raise ProtocolError("not an ingest status message")
    epoch = _req(data, "epoch", str, "ingest status")
    if not epoch or len(epoch) > 200:
        raise ProtocolError("ingest status epoch must be 1-200 characters")
    return epoch


def presence_payload(
    *,
    online: bool,
    agent_version: str,
    active: Mapping[str, str] | None = None,
    models: Mapping[str, Mapping[str, Any]] | None = None,
    update: Mapping[str, Any] | None = None,
    trust: Mapping[str, Any] | None = None,
    features: tuple[str, ...] | list[str] | None = None,
) -> bytes:
    """The retained presence of a device (agent/README.md, "Presence").

    active: model -> the sha256 `current` points at (every agent sends it).
    models: model -> {"sha256": running sha or None, "version": its release version or None,
    "committed": bool, "seq": the last directive seq handled for that model}, for a server-side
    reconciler: what the device runs and which directive it has seen. update: the update in flight
    as {"model", "seq", "phase"}, or None. Both are left out when not given (earlier agents
    sent neither), so the old shape stays byte for byte what it was. trust (agent.trust, only from
    a device that pins a root key): {"keyring_version", "timestamp" (the newest signed timestamp's
    issued time or None), "error_code" (STALE_DIRECTIVES or None), "refused" (the last keyring or
    timestamp refused: {"kind", "code", "detail"}, or None), "keyring_expired" (the keyring in force
    is past its expiry)}. features: what the agent understands beyond the original wire format
    (FEATURES); left out when None, as earlier agents sent none.
    """
    body: dict[str, Any] = {
        "_type": "presence", "online": online, "agent_version": agent_version, "active": dict(active or {}),
    }
    if models is not None:
        body["models"] = {name: dict(entry) for name, entry in models.items()}
        body["update"] = dict(update) if update else None
    if trust is not None:
        body["trust"] = dict(trust)
    if features is not None:
        body["features"] = list(features)
    payload = encode_json(body)
    if models is not None:
        parse_presence(payload)  # never send what our own server would refuse
    return payload


def parse_presence(payload: bytes) -> dict:
    """The presence as sent. `models` and `update` are absent from an older agent's presence (its
    shape: online, agent_version, active); when present, they are checked field by field."""
    data = decode_json(payload, "presence")
    where = "presence"
    _req(data, "online", bool, where)
    _opt(data, "active", dict, where, {})
    models = _opt(data, "models", dict, where)
    for name, entry in (models or {}).items():
        w = f"presence.models[{name!r}]"
        if not isinstance(entry, Mapping):
            raise ProtocolError(f"{w} must be an object")
        if entry.get("sha256") is not None:
            _sha(entry, "sha256", w)
        _opt(entry, "version", str, w)
        _opt(entry, "committed", bool, w)
        if entry.get("seq") is not None:
            _nonneg_int(entry, "seq", w)
    update = _opt(data, "update", dict, where)
    if update is not None:
        w = "presence.update"
        _req(update, "model", str, w)
        _nonneg_int(update, "seq", w)
        _req(update, "phase", str, w)
    trust = _opt(data, "trust", dict, where)
    if trust is not None:
        w = "presence.trust"
        _nonneg_int(trust, "keyring_version", w)
        _opt(trust, "timestamp", str, w)
        _opt(trust, "error_code", str, w)
        _opt(trust, "refused", dict, w)  # the last keyring or timestamp refused: {kind, code, detail}
        _opt(trust, "keyring_expired", bool, w)
    features = _opt(data, "features", list, where)
    if features is not None and (len(features) > 32 or not all(isinstance(f, str) and IDENT_RE.match(f)
                                                                  for f in features)):
        raise ProtocolError("presence.features must be a list of at most 32 names (A-Z a-z 0-9 . _ -)")
    return data


def parse_telemetry(payload: bytes) -> dict:
    data = decode_json(payload, "telemetry")
    for name in ("cpu_percent", "memory_percent", "disk_percent", "temperature_c"):
        if data.get(name) is not None:
            _req(data, name, (int, float), "telemetry")
    metrics = _opt(data, "model_metrics", dict, "telemetry")
    if metrics is not None:
        _model_metrics(metrics)
    return data


# The agent's windows (agent/metrics/aggregate.py) stay far below these; a report past them is
# not the agent's and is refused whole rather than stored in part.
MAX_METRIC_MODELS = 64
MAX_METRIC_LABELS = 64
MAX_SKETCH_BINS = 4096


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ProtocolError(f"{where} must be a finite number >= 0")
    return float(value)


def _sketch(value: Any, where: str) -> None:
    if not isinstance(value, Mapping):
        raise ProtocolError(f"{where} must be an object")
    bins = value.get("bins") or {}
    if not isinstance(bins, Mapping) or len(bins) > MAX_SKETCH_BINS:
        raise ProtocolError(f"{where}.bins must be an object of at most {MAX_SKETCH_BINS} buckets")
    for key, count in bins.items():
        if not (isinstance(key, str) and key.lstrip("-").isdigit() and len(key) <= 6):
            raise ProtocolError(f"{where}.bins has a bucket key {str(key)[:20]!r} that is not a small integer")
        _number(count, f"{where}.bins[{key}]")
    for name in ("zero", "count", "sum"):
        if value.get(name) is not None:
            _number(value[name], f"{where}.{name}")
    for name in ("min", "max"):
        if value.get(name) is not None:
            _number(value[name], f"{where}.{name}")


def _model_metrics(metrics: Mapping) -> None:
    where = "telemetry.model_metrics"
    entries = _req(metrics, "models", list, where)
    if len(entries) > MAX_METRIC_MODELS:
        raise ProtocolError(f"{where}.models lists more than {MAX_METRIC_MODELS} entries")
    for i, entry in enumerate(entries):
        w = f"{where}.models[{i}]"
        if not isinstance(entry, Mapping):
            raise ProtocolError(f"{w} must be an object")
        _path_part(entry, "model", w, ident=True)
        _sha(entry, "release", w)
        for name in ("requests", "errors"):
            _number(entry.get(name, 0), f"{w}.{name}")
        _sketch(entry.get("latency_ms") or {}, f"{w}.latency_ms")
        for name, check in (("outputs", _number), ("output_values", _sketch)):
            table = entry.get(name) or {}
            if not isinstance(table, Mapping) or len(table) > MAX_METRIC_LABELS:
                raise ProtocolError(f"{w}.{name} must be an object of at most {MAX_METRIC_LABELS} labels")
            for label, value in table.items():
                if not isinstance(label, str) or not 0 < len(label) <= 200:
                    raise ProtocolError(f"{w}.{name} has a label that is not a 1-200 character string")
                check(value, f"{w}.{name}[{label[:40]}]")
