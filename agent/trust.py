"""The root of trust and freshness: TUF's root and timestamp roles, kept small.

Keyring. An offline root key signs a versioned keyring: the release keys with their threshold and
the rollout keys (KEYRING_PAYLOAD_TYPE, a DSSE envelope). A device that pins root keys
(`[keys] root`, written at enrollment) takes a keyring from the broker's retained `{root}/keyring`
only when a pinned root key signed it, its version is higher than the one it holds and it has not
expired; from then on releases and directives are verified with the keyring's keys instead of the
pinned `keys.release` / `keys.rollout`, so rotating either key needs no re-enrollment, and a
directive signed by a rollout key the current keyring no longer lists is refused UNKNOWN_KEY. The
keyring held is in the journal (`keyring`: version and envelope), so a restart keeps it and an
older one is never taken back (REPLAYED); the same version again (the retained message after every
reconnect) is ignored. A keyring with `"reset_seqs": true` also forgets the directive seqs handled,
in the same journal write (so once): the way back from a fast-forward attack, where a stolen
rollout key signed huge seqs and the server's own would otherwise be REPLAYED for ever. Directives
still expire, which bounds the replay of the new key's older directives that a reset allows.

Timestamp. The server re-signs, with the rollout key, a short-lived timestamp of each device's
desired state ({"_type": "timestamp", "device_id", "issued", "expires", "seqs": {model: seq}},
TIMESTAMP_PAYLOAD_TYPE) retained on the device's `timestamp` topic. The agent keeps the newest valid
one (journal `timestamp`); one for another device (WRONG_DEVICE), expired (EXPIRED), not newer than
the one held (ignored) or naming a lower seq for a model than the device already handled (a rollback
of its desired state: REPLAYED) is refused. When the newest is older than
`keys.max_staleness_seconds` (0: off) the device reports STALE_DIRECTIVES in its presence (`trust`)
instead of running on silently: the server, or someone between it and the device, may be freezing
its view of the fleet. With no timestamp yet, the age counts from the first start that checked.

A device without `keys.root` (enrolled before keyrings) keeps its pinned keys and checks nothing here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from agent.protocol import (
    ErrorCode,
    ProtocolError,
    _nonneg_int,
    _req,
    decode_json,
    encode_json,
    format_time,
    parse_time,
)
from agent.signing import (
    KEYRING_PAYLOAD_TYPE,
    TIMESTAMP_PAYLOAD_TYPE,
    Keyring,
    VerificationError,
    load_public_key_pem,
    verify_envelope,
)

log = logging.getLogger("fleet_agent.trust")


@dataclass(frozen=True)
class KeyringDoc:
    """A root-signed keyring: which keys sign releases (k of them) and directives."""

    version: int
    expires: datetime
    release: tuple[str, ...]
    release_threshold: int
    rollout: tuple[str, ...]
    # Forget the directive seqs handled (TUF's fast-forward recovery): after a rollout key was
    # stolen and used to sign huge seqs, the server's own would be REPLAYED for ever otherwise.
    reset_seqs: bool = False

    def release_keys(self) -> Keyring:
        return Keyring.from_pems(*self.release, threshold=self.release_threshold)

    def rollout_keys(self) -> Keyring:
        return Keyring.from_pems(*self.rollout)


def build_keyring_payload(*, version: int, expires: datetime, release_pems: list[str] | tuple[str, ...],
                          rollout_pems: list[str] | tuple[str, ...], release_threshold: int = 1,
                          reset_seqs: bool = False) -> bytes:
    """The body the root key signs (checked by parse_keyring before it is returned); `reset_seqs`
    is left out when false."""
    body = {
        "_type": "keyring",
        "version": version,
        "expires": format_time(expires),
        "release": {"keys": list(release_pems), "threshold": release_threshold},
        "rollout": {"keys": list(rollout_pems), "threshold": 1},
    }
    if reset_seqs:
        body["reset_seqs"] = True
    payload = encode_json(body)
    parse_keyring(payload)
    return payload


def _role(data: dict, name: str) -> tuple[tuple[str, ...], int]:
    role = _req(data, name, dict, "keyring")
    keys = _req(role, "keys", list, f"keyring.{name}")
    if not keys:
        raise ProtocolError(f"keyring.{name}.keys must not be empty")
    for i, pem in enumerate(keys):
        if not isinstance(pem, str):
            raise ProtocolError(f"keyring.{name}.keys[{i}] must be a PEM string")
        try:
            load_public_key_pem(pem)
        except ValueError as exc:
            raise ProtocolError(f"keyring.{name}.keys[{i}]: {exc}") from None
    threshold = _nonneg_int(role, "threshold", f"keyring.{name}")
    if not 1 <= threshold <= len(keys):
        raise ProtocolError(f"keyring.{name}.threshold must be from 1 to {len(keys)}, got {threshold}")
    return tuple(keys), threshold


def parse_keyring(payload: bytes) -> KeyringDoc:
    data = decode_json(payload, "keyring")
    if data.get("_type") != "keyring":
        raise ProtocolError("keyring._type must be 'keyring'")
    version = _nonneg_int(data, "version", "keyring")
    if version < 1:
        raise ProtocolError("keyring.version must be >= 1")
    release, release_threshold = _role(data, "release")
    rollout, rollout_threshold = _role(data, "rollout")
    if rollout_threshold != 1:
        raise ProtocolError("keyring.rollout.threshold must be 1 (the server signs directives with one key)")
    reset_seqs = data.get("reset_seqs", False)
    if not isinstance(reset_seqs, bool):
        raise ProtocolError("keyring.reset_seqs must be true or false")
    return KeyringDoc(version=version, expires=parse_time(data.get("expires"), "keyring.expires"),
                      release=release, release_threshold=release_threshold, rollout=rollout, reset_seqs=reset_seqs)


def verify_keyring(envelope: object, root: Keyring, *, held_version: int, now: datetime) -> KeyringDoc:
    """The keyring in `envelope` if a pinned root key signed it, it is newer than `held_version` and
    unexpired. VerificationError codes: those of verify_envelope, MALFORMED, REPLAYED (not newer),
    EXPIRED."""
    payload = verify_envelope(envelope, KEYRING_PAYLOAD_TYPE, root)
    try:
        doc = parse_keyring(payload)
    except ProtocolError as exc:
        raise VerificationError(str(exc), ErrorCode.MALFORMED) from None
    if doc.version <= held_version:
        raise VerificationError(f"keyring version {doc.version} is not newer than the held {held_version}",
                                ErrorCode.REPLAYED)
    if doc.expires <= now:
        raise VerificationError(f"keyring version {doc.version} expired at {format_time(doc.expires)}",
                                ErrorCode.EXPIRED)
    return doc


@dataclass(frozen=True)
class Timestamp:
    device_id: str
    issued: datetime
    expires: datetime
    seqs: dict[str, int]


def build_timestamp_payload(*, device_id: str, issued: datetime, expires: datetime, seqs: dict[str, int]) -> bytes:
    payload = encode_json({"_type": "timestamp", "device_id": device_id, "issued": format_time(issued),
                           "expires": format_time(expires), "seqs": dict(seqs)})
    parse_timestamp(payload)
    return payload


def parse_timestamp(payload: bytes) -> Timestamp:
    data = decode_json(payload, "timestamp")
    if data.get("_type") != "timestamp":
        raise ProtocolError("timestamp._type must be 'timestamp'")
    seqs = _req(data, "seqs", dict, "timestamp")
    for model in seqs:
        _nonneg_int(seqs, model, "timestamp.seqs")
    return Timestamp(device_id=_req(data, "device_id", str, "timestamp"),
                     issued=parse_time(data.get("issued"), "timestamp.issued"),
                     expires=parse_time(data.get("expires"), "timestamp.expires"), seqs=dict(seqs))


def verify_timestamp(envelope: object, rollout: Keyring, *, device_id: str, handled: dict[str, int],
                     now: datetime) -> Timestamp:
    """The timestamp in `envelope` if the rollout key signed it for this device, it is unexpired and
    names no lower seq than the device handled for any model (codes WRONG_DEVICE, EXPIRED, REPLAYED,
    MALFORMED and those of verify_envelope)."""
    payload = verify_envelope(envelope, TIMESTAMP_PAYLOAD_TYPE, rollout)
    try:
        ts = parse_timestamp(payload)
    except ProtocolError as exc:
        raise VerificationError(str(exc), ErrorCode.MALFORMED) from None
    if ts.device_id != device_id:
        raise VerificationError(f"timestamp is for device {ts.device_id!r}", ErrorCode.WRONG_DEVICE)
    if ts.expires <= now:
        raise VerificationError(f"timestamp expired at {format_time(ts.expires)}", ErrorCode.EXPIRED)
    behind = {m: s for m, s in ts.seqs.items() if s < handled.get(m, 0)}
    if behind:
        model, seq = sorted(behind.items())[0]
        raise VerificationError(
            f"timestamp names seq {seq} for {model!r}, below the seq {handled[model]} this device handled",
            ErrorCode.REPLAYED,
        )
    return ts


class Trust:
    """The keys one agent verifies with, and its freshness, kept in its journal (`keyring`,
    `timestamp`, `trust`). `commit(data, point)` is the journal's commit; only the run loop calls
    the methods that change the journal (accept_keyring, accept_timestamp, check_staleness)."""

    def __init__(self, *, cfg, journal):
        self.cfg = cfg
        self.journal = journal
        self.root = Keyring.from_pems(*cfg.keys.root) if cfg.keys.root else None
        self.release_keys = Keyring.from_pems(*cfg.keys.release, threshold=cfg.keys.release_threshold)
        self.rollout_keys = Keyring.from_pems(*cfg.keys.rollout)
        self._version = 0  # the keyring in force; 0: the keys pinned at enrollment
        self._expires: datetime | None = None  # its expiry: past it, reported (presence.trust.keyring_expired)
        held = journal.data.get("keyring")
        if self.root is not None and held:
            # Re-verified against the pinned root: a journal edited by hand grants nothing, and after
            # re-enrolling under another root the old keyring neither applies nor blocks lower versions.
            try:
                payload = verify_envelope(held["envelope"], KEYRING_PAYLOAD_TYPE, self.root)
                self._use(parse_keyring(payload))
            except (VerificationError, ProtocolError, KeyError, TypeError) as exc:
                log.error("the journalled keyring does not verify against keys.root (%s); using the pinned keys", exc)

    @property
    def enabled(self) -> bool:
        return self.root is not None

    @property
    def keyring_version(self) -> int:
        return self._version

    def _use(self, doc: KeyringDoc) -> None:
        self.release_keys = doc.release_keys()
        self.rollout_keys = doc.rollout_keys()
        self._version = doc.version
        self._expires = doc.expires

    def accept_keyring(self, envelope: Any, now: datetime) -> KeyringDoc | None:
        """Take a keyring from the broker. None (and nothing changes) when it is the held version
        again; VerificationError when refused."""
        if self.root is None:
            return None
        held = self.keyring_version
        # A lower version is refused; the held one again (the retained message after every
        # reconnect) passes verify_keyring and is ignored here.
        doc = verify_keyring(envelope, self.root, held_version=held - 1, now=now)
        if doc.version == held:
            return None
        data = self.journal.snapshot()
        data["keyring"] = {"version": doc.version, "envelope": envelope}
        # Directives refused under the old keys (UNKNOWN_KEY) may verify now: judge them again.
        data["refused"] = []
        data["trust"] = {**(data.get("trust") or {}), "keyring_version": doc.version}
        if doc.reset_seqs:
            # Only in the same write that takes this (root-signed, newer) keyring: applied once.
            log.warning("keyring version %d resets the directive seqs handled (were %s)", doc.version,
                        data.get("seqs"))
            data.update(seqs={}, seq_floor=0, last_seq=0, timestamp=None)
        self.journal.commit(data, "keyring")
        self._use(doc)
        log.info("keyring version %d taken (release keys %d of %d, rollout keys %d)", doc.version,
                 doc.release_threshold, len(doc.release), len(doc.rollout))
        return doc

    def accept_timestamp(self, envelope: Any, now: datetime) -> Timestamp | None:
        """Take a signed timestamp; None when it is not newer than the held one."""
        if self.root is None:
            return None
        data = self.journal.data
        handled = {m: max(s, data.get("seq_floor", 0)) for m, s in (data.get("seqs") or {}).items()}
        ts = verify_timestamp(envelope, self.rollout_keys, device_id=self.cfg.device_id, handled=handled, now=now)
        held = data.get("timestamp") or {}
        if held.get("issued") and parse_time(held["issued"], "timestamp.issued") >= ts.issued:
            return None
        new = self.journal.snapshot()
        new["timestamp"] = {"issued": format_time(ts.issued), "expires": format_time(ts.expires), "seqs": ts.seqs}
        new["trust"] = {**(new.get("trust") or {}), "timestamp": format_time(ts.issued)}
        self.journal.commit(new, "timestamp")
        return ts

    def refused(self, kind: str, code: str, detail: str) -> None:
        """Journal the last keyring or timestamp refused (presence.trust.refused)."""
        new = self.journal.snapshot()
        new["trust"] = {**(new.get("trust") or {}), "refused": {"kind": kind, "code": code, "detail": detail[:200]}}
        self.journal.commit(new, "trust")

    def check_staleness(self, now: datetime) -> bool:
        """Whether the newest signed state is too old; journals the verdict (presence.trust) when it
        changes, and returns True when it did (the caller sends its presence again)."""
        limit = self.cfg.keys.max_staleness_seconds
        if self.root is None:
            return False
        data = self.journal.data
        trust = dict(data.get("trust") or {})
        changed = False
        if not trust.get("since"):
            trust["since"] = format_time(now)  # no timestamp yet: the age counts from here
            changed = True
        if trust.get("keyring_version") != self._version:  # e.g. a journalled keyring that no longer verifies
            trust["keyring_version"] = self._version
            changed = True
        # An expired keyring stays in force (its keys are the newest the root signed) but is reported:
        # the root's owner has not re-signed it, which TUF treats as a freeze.
        expired = self._expires is not None and now >= self._expires
        if trust.get("keyring_expired") is not expired:
            if expired:
                log.warning("keyring version %d expired at %s; waiting for a newer one signed by the root",
                            self._version, format_time(self._expires))
            trust["keyring_expired"] = expired
            changed = True
        newest = (data.get("timestamp") or {}).get("issued") or trust["since"]
        stale = limit > 0 and now - parse_time(newest, "timestamp.issued") > timedelta(seconds=limit)
        code = ErrorCode.STALE_DIRECTIVES if stale else None
        if trust.get("error_code") != code or "error_code" not in trust:
            if stale:
                log.warning("newest signed timestamp is from %s, older than keys.max_staleness_seconds (%d): "
                            "reporting %s", newest, limit, code)
            trust["error_code"] = code
            changed = True
        if changed:
            new = self.journal.snapshot()
            new["trust"] = trust
            self.journal.commit(new, "trust")
        return changed
