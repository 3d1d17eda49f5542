"""Ingest: device → server messages (events, telemetry, presence) into the database. The MQTT
side, a shared subscription on a persistent session, is ota.transport.subscriber.

Several ingest processes can share `$share/modelfleet-ingest/...`; the broker hands each
message to one of them. Correctness never relies on that: events are deduplicated by
(device, seq, event_no) in the database, device state only moves forward by event_no, and
MQTT acknowledgements are sent only after the batch has committed (at-least-once delivery
with idempotent writes).

A message that fails on its own never holds up the others (`Ingestor.store`): a batch the
database refuses for any reason but its own unavailability is retried in halves until the
message that fails alone is found; that one goes to the dead-letter table (ota.models.DeadLetter)
and is acknowledged like the rest. Before that, characters PostgreSQL cannot store are dealt
with field by field (`UNSTORABLE`, below): removed from free text, the message dropped to the
dead-letter table when they sit in an identifier.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta

from django.db import InterfaceError, OperationalError, transaction
from django.utils import timezone

from agent.metrics.aggregate import window_json_merge
from agent.protocol import (
    SHA256_RE,
    Event,
    ProtocolError,
    Topics,
    parse_event,
    parse_presence,
    parse_telemetry,
    parse_time,
)
from ota.db import bulk_set
from ota.models import ActiveRelease, DeadLetter, Device, DeviceEvent, DeviceModelState, ModelMetricsHour
from ota.transport import hooks
from registry.models import Artifact, Model

logger = logging.getLogger(__name__)

# Clock skew we tolerate in device timestamps before falling back to our receive time.
MAX_FUTURE_SKEW = timedelta(minutes=1)

# Errors that say the database itself is unavailable (connection lost, server restarting,
# deadlock, lock timeout, disk full, SQLite busy): no message is to blame, so the whole batch
# is retried later, unacknowledged. Any other error is taken to be caused by a message.
TRANSIENT_ERRORS = (OperationalError, InterfaceError)

# Characters PostgreSQL stores in neither text nor jsonb: NUL (U+0000; legal in JSON as \u0000)
# and lone UTF-16 surrogates (legal JSON escapes, but not UTF-8). What ingest does when a field
# holds one, field by field:
#
#   events     detail, ts, health (keys and strings inside)   removed, event stored: free text or
#                                                             figures; the state transition it
#                                                             reports is what rollouts wait for
#              model, rollout_id, error_code                  message dropped to the dead-letter
#                                                             table: an identifier repaired could
#                                                             name another model or rollout
#              device_id, state, sha256, active_sha256        cannot hold one (checked against the
#                                                             topic, the list of states, hex)
#   telemetry  every key and string                           removed: stored whole, informational
#   presence   agent_version                                  removed
#              an `active` entry whose model name holds one   left out: no model has that name
#
# A repaired message is stored and its original kept in the dead-letter table (outcome
# "repaired"), so a device sending garbage is visible without losing what it reported.
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _without_sketches(telemetry: dict) -> dict:
    """The telemetry kept on the device row: model metrics as their readable summaries only (the
    sketches go to ModelMetricsHour)."""
    metrics = telemetry.get("model_metrics")
    if not metrics:
        return telemetry
    summaries = [{"model": e["model"], "release": e["release"], **(e.get("summary") or {})}
                 for e in metrics.get("models") or []]
    return {**telemetry, "model_metrics": {**{k: v for k, v in metrics.items() if k != "models"}, "models": summaries}}
EVENT_TEXT_FIELDS = ("detail", "ts")
EVENT_IDENTIFIER_FIELDS = ("model", "rollout_id", "error_code")


def _clean(value):
    """(value without UNSTORABLE characters in any string or key, how many were removed)."""
    if isinstance(value, str):
        cleaned, count = UNSTORABLE.subn("", value)
        return cleaned, count
    if isinstance(value, dict):
        out, total = {}, 0
        for key, item in value.items():
            key, n = _clean(key)
            item, m = _clean(item)
            out[key] = item
            total += n + m
        return out, total
    if isinstance(value, list):
        out, total = [], 0
        for item in value:
            item, n = _clean(item)
            out.append(item)
            total += n
        return out, total
    return value, 0


def _storable_text(text: str, limit: int) -> str:
    return UNSTORABLE.sub("", text)[:limit]


@dataclass
class Message:
    topic: str
    payload: bytes
    received_at: datetime = field(default_factory=timezone.now)
    mid: int = 0
    qos: int = 0
    retain: bool = False


@dataclass
class IngestStats:
    received: int = 0
    events_stored: int = 0
    duplicates: int = 0
    presence: int = 0
    telemetry: int = 0
    metrics_windows: int = 0  # model metrics windows merged into ModelMetricsHour rows
    malformed: int = 0
    unknown_device: int = 0
    revoked_device: int = 0
    wrong_device: int = 0
    ignored: int = 0
    repaired: int = 0  # stored after removing unstorable characters (original in the dead-letter table)
    dead_lettered: int = 0  # not stored: kept in the dead-letter table, acknowledged
    batches: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Parsed:
    device_id: str
    kind: str
    received_at: datetime
    message: Message
    event: Event | None = None
    data: dict | None = None


def dead_letter(message: Message, outcome: str, error: str) -> DeadLetter:
    """An unsaved DeadLetter row for `message`; the device id and kind come from the topic when
    it has the shape of a device topic (the message may have failed before it was parsed)."""
    parts = message.topic.split("/")
    device_id, kind = "", ""
    if len(parts) >= 4 and parts[-3] == "devices":
        device_id, kind = parts[-2], parts[-1]
    payload = bytes(message.payload or b"")
    return DeadLetter(
        received_at=message.received_at,
        topic=_storable_text(message.topic, 512),
        kind=_storable_text(kind, 16),
        device_id=_storable_text(device_id, 64),
        retained=bool(message.retain),
        payload=payload[: DeadLetter.MAX_PAYLOAD_BYTES],
        payload_size=len(payload),
        outcome=outcome,
        error=_storable_text(error, 4000),
    )


def _presence_steps(item: _Parsed) -> list[tuple]:
    """Model-state steps from one presence: the active sha of every model, and, from an agent that
    reports them, per model the last directive seq handled, whether it is committed and the seq
    of an update in flight (parse_presence has checked their types). An update parked until its
    maintenance window opens (models[name].waiting) counts as in flight: the device has not
    finished with that seq, so the reconciler must not judge it by what runs."""
    data = item.data
    at = item.received_at
    reported = data.get("models")
    if reported is None:  # an agent from before per-model reports
        return [(item.device_id, name, None, sha, at, None) for name, sha in (data.get("active") or {}).items()
                if isinstance(name, str) and isinstance(sha, str) and SHA256_RE.match(sha)]
    update = data.get("update") or {}
    steps = []
    for name, entry in reported.items():
        sha = entry.get("sha256") or (data.get("active") or {}).get(name) or ""
        if not (isinstance(sha, str) and (not sha or SHA256_RE.match(sha))):
            sha = ""
        waiting = entry.get("waiting") if isinstance(entry.get("waiting"), dict) else {}
        parked = waiting.get("seq")
        if not isinstance(parked, int) or isinstance(parked, bool) or parked < 0:
            parked = None  # parse_presence does not check `waiting`: a device sends it
        steps.append((item.device_id, name, None, sha, at, {
            "seq": entry.get("seq"),
            "committed": entry.get("committed"),
            "update_seq": update.get("seq") if update.get("model") == name else parked,
        }))
    return steps


def _trust(trust: dict) -> dict:
    """presence.trust as stored: the known fields only, strings clipped (a device sends it)."""
    refused = trust.get("refused") if isinstance(trust.get("refused"), dict) else None
    return {
        "keyring_version": trust.get("keyring_version"),
        "timestamp": str(trust["timestamp"])[:40] if trust.get("timestamp") else None,
        "error_code": str(trust["error_code"])[:40] if trust.get("error_code") else None,
        "refused": {k: str(refused.get(k, ""))[:200] for k in ("kind", "code", "detail")} if refused else None,
        "keyring_expired": bool(trust.get("keyring_expired")),
    }


class Ingestor:
    """Turns batches of raw MQTT messages into database rows. No MQTT in here (testable alone)."""

    def __init__(self, topic_root: str = "fleet"):
        self.topics = Topics(topic_root)
        self.stats = IngestStats()

    def _drop(self, counter: str, message: Message, reason: str) -> None:
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        logger.warning("ingest: dropped message on %s (%s): %s", message.topic, counter, reason)

    def _parse(self, message: Message) -> _Parsed | None:
        try:
            device_id, kind = self.topics.parse(message.topic)
        except ProtocolError as exc:
            self._drop("malformed", message, str(exc))
            return None
        try:
            if kind == "events":
                event = parse_event(message.payload)
                if event.device_id != device_id:
                    self._drop("wrong_device", message, f"event claims device {event.device_id!r}")
                    return None
                return _Parsed(device_id, kind, message.received_at, message, event=event)
            if kind == "presence":
                if not message.payload:  # a cleared retained presence
                    self.stats.ignored += 1
                    return None
                return _Parsed(device_id, kind, message.received_at, message, data=parse_presence(message.payload))
            if kind == "telemetry":
                data = parse_telemetry(message.payload)
                claimed = data.get("device_id")
                if claimed is not None and claimed != device_id:
                    self._drop("wrong_device", message, f"telemetry claims device {claimed!r}")
                    return None
                return _Parsed(device_id, kind, message.received_at, message, data=data)
        except ProtocolError as exc:
            self._drop("malformed", message, f"{exc} [{exc.code}]")
            return None
        self.stats.ignored += 1  # directives: our own output, never subscribed on purpose
        return None

    def _make_storable(self, item: _Parsed, letters: list[DeadLetter]) -> _Parsed | None:
        """Apply the UNSTORABLE policy to one accepted message: the item to store (repaired or
        as it was), or None when it goes to the dead-letter table instead."""
        repaired: list[str] = []
        if item.kind == "events":
            event = item.event
            for name in EVENT_IDENTIFIER_FIELDS:
                value = getattr(event, name)
                if isinstance(value, str) and UNSTORABLE.search(value):
                    error = (f"event.{name} holds a character PostgreSQL cannot store (NUL or a lone "
                             f"surrogate): {value!r}; an identifier is never altered, so the event is not stored")
                    self._to_dead_letter(item.message, letters, error)
                    return None
            changes = {}
            for name in (*EVENT_TEXT_FIELDS, "health"):
                value, count = _clean(getattr(event, name))
                if count:
                    changes[name] = value
                    repaired.append(f"event.{name}")
            if changes:
                item = replace(item, event=replace(event, **changes))
        elif item.kind == "telemetry":
            data, count = _clean(item.data)
            if count:
                item = replace(item, data=data)
                repaired.append("telemetry")
        elif item.kind == "presence":
            data = dict(item.data)
            version = data.get("agent_version")
            if isinstance(version, str) and UNSTORABLE.search(version):
                data["agent_version"] = UNSTORABLE.sub("", version)
                repaired.append("presence.agent_version")
            active = data.get("active") or {}
            if any(isinstance(name, str) and UNSTORABLE.search(name) for name in active):
                data["active"] = {k: v for k, v in active.items() if not (isinstance(k, str) and UNSTORABLE.search(k))}
                repaired.append("presence.active (entries left out)")
            if repaired:
                item = replace(item, data=data)
        if repaired:
            self.stats.repaired += 1
            error = ("stored after removing characters PostgreSQL cannot store (NUL or lone surrogates) from "
                     + ", ".join(repaired))
            letters.append(dead_letter(item.message, DeadLetter.Outcome.REPAIRED, error))
            logger.warning("ingest: repaired a message on %s: %s", item.message.topic, error)
        return item

    def _to_dead_letter(self, message: Message, letters: list[DeadLetter], error: str) -> None:
        self.stats.dead_lettered += 1
        letters.append(dead_letter(message, DeadLetter.Outcome.DROPPED, error))
        logger.error("ingest: dead-lettered a message on %s: %s", message.topic, error)

    def store(self, messages: list[Message]) -> list[int]:
        """Store a batch, isolating any message that fails on its own; return new event ids.

        Raises only what says the database is unavailable (TRANSIENT_ERRORS), or when even the
        dead-letter table cannot be written: nothing of the batch may then be acknowledged, and
        the caller retries it whole. Otherwise every message of the batch is accounted for
        (stored, counted as dropped, or in the dead-letter table) and may be acknowledged.
        """
        try:
            return self.process(messages)
        except TRANSIENT_ERRORS:
            raise
        except Exception as exc:
            logger.warning(
                "ingest: a batch of %d was refused (%s: %s); retrying it without the message that fails on its own",
                len(messages), type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "",
            )
            if len(messages) == 1:
                return self._isolate(messages)
            half = len(messages) // 2
            return self._isolate(messages[:half]) + self._isolate(messages[half:])

    def _isolate(self, messages: list[Message]) -> list[int]:
        """Halve a refused batch until the message that fails alone is found (log2(n) levels;
        arrival order kept: each left half is done before its right half)."""
        try:
            return self.process(messages)
        except TRANSIENT_ERRORS:
            raise
        except Exception as exc:
            if len(messages) > 1:
                half = len(messages) // 2
                return self._isolate(messages[:half]) + self._isolate(messages[half:])
            error = exc
        try:  # once more alone: a refusal that was a race with another ingest process goes through now
            return self.process(messages)
        except TRANSIENT_ERRORS:
            raise
        except Exception as exc:
            error = exc
        (message,) = messages
        row = dead_letter(message, DeadLetter.Outcome.DROPPED, f"{type(error).__name__}: {error}".strip())
        with transaction.atomic():
            row.save()
        self.stats.received += 1
        self.stats.dead_lettered += 1
        logger.error("ingest: dead-lettered a message on %s that the database refuses on its own: %s: %s",
                     message.topic, type(error).__name__, error)
        return []

    def process(self, messages: list[Message]) -> list[int]:
        """Store a batch; return the ids of newly stored DeviceEvents (already handed to hooks).

        A batch that fails (say a deadlock with another ingest process) is retried by the caller,
        so the counters move only when its transaction commits."""
        before = replace(self.stats)  # all plain counters: a shallow copy is a full one
        try:
            return self._process_batch(messages)
        except BaseException:
            for name, value in asdict(before).items():
                setattr(self.stats, name, value)
            raise

    def _process_batch(self, messages: list[Message]) -> list[int]:
        self.stats.received += len(messages)
        self.stats.batches += 1
        parsed = [p for p in (self._parse(m) for m in messages) if p is not None]
        if not parsed:
            return []
        devices = {
            d.id: d
            for d in Device.objects.filter(id__in={p.device_id for p in parsed}).only("id", "state", "hardware_id", "last_event_no")
        }
        accepted = []
        letters: list[DeadLetter] = []
        for item in parsed:
            device = devices.get(item.device_id)
            if device is None:
                self.stats.unknown_device += 1
                logger.warning("ingest: dropped %s from unknown device %s", item.kind, item.device_id)
            elif device.state != Device.State.ACTIVE:
                self.stats.revoked_device += 1
                logger.warning("ingest: dropped %s from revoked device %s", item.kind, item.device_id)
            else:
                storable = self._make_storable(item, letters)
                if storable is not None:
                    accepted.append(storable)
        if not accepted and not letters:
            return []
        with transaction.atomic():
            if letters:
                DeadLetter.objects.bulk_create(letters)
            new_events = self._store_events([p for p in accepted if p.kind == "events"])
            self._apply_model_states(accepted, new_events, devices)
            self._update_devices(accepted, devices)
            self._store_model_metrics(accepted)
            new_ids = [e.pk for e in new_events]
            hooks.on_device_events(new_ids)
        return new_ids

    # --- model metrics --------------------------------------------------------------------------

    def _store_model_metrics(self, items: list[_Parsed]) -> None:
        """Merge each telemetry's model metrics windows into the (device, model, release, hour)
        row of the hour ingest received it in (the server's clock: a box's may be wrong)."""
        merged: dict[tuple, dict] = {}
        seen: dict[tuple, tuple[datetime, int]] = {}
        for item in items:
            metrics = item.data.get("model_metrics") if item.kind == "telemetry" else None
            if not metrics:
                continue
            hour = item.received_at.replace(minute=0, second=0, microsecond=0)
            for entry in metrics.get("models") or []:
                key = (item.device_id, entry["model"], entry["release"], hour)
                window_json_merge(merged.setdefault(key, {}), entry)
                first, count = seen.get(key, (item.received_at, 0))
                seen[key] = (min(first, item.received_at), count + 1)
        if not merged:
            return
        rows = {
            (r.device_id, r.model, r.release_sha256, r.hour): r
            for r in ModelMetricsHour.objects.select_for_update().filter(
                device_id__in={k[0] for k in merged}, hour__in={k[3] for k in merged},
                model__in={k[1] for k in merged},
            )
        }
        created, updated = [], []
        for key, window in merged.items():
            first, count = seen[key]
            row = rows.get(key)
            if row is None:
                row = ModelMetricsHour(device_id=key[0], model=key[1], release_sha256=key[2], hour=key[3],
                                       first_at=first, last_at=first, windows=0)
                created.append(row)
            else:
                updated.append(row)
            total = window_json_merge(row.as_window(), window)
            row.requests, row.errors = total["requests"], total["errors"]
            row.latency_ms, row.outputs, row.output_values = total["latency_ms"], total["outputs"], total["output_values"]
            row.windows += count
            row.last_at = max(row.last_at, first)
        if created:
            # Another ingest instance may have created one of these rows since the SELECT: the
            # batch then fails as a whole and is retried, finding the row this time.
            ModelMetricsHour.objects.bulk_create(created)
        if updated:
            ModelMetricsHour.objects.bulk_update(
                updated, ["requests", "errors", "latency_ms", "outputs", "output_values", "windows", "last_at"])
        self.stats.metrics_windows += sum(count for _, count in seen.values())

    # --- events ---------------------------------------------------------------------------------

    def _store_events(self, items: list[_Parsed]) -> list[DeviceEvent]:
        if not items:
            return []
        unique: dict[tuple, _Parsed] = {}
        for item in items:
            e = item.event
            unique.setdefault((e.device_id, e.seq, e.event_no), item)
        self.stats.duplicates += len(items) - len(unique)
        existing = set(
            DeviceEvent.objects.filter(
                device_id__in={k[0] for k in unique}, event_no__in={k[2] for k in unique}
            ).values_list("device_id", "seq", "event_no")
        )
        fresh = {k: v for k, v in unique.items() if k not in existing}
        self.stats.duplicates += len(unique) - len(fresh)
        if not fresh:
            return []
        rows = [
            DeviceEvent(
                device_id=e.device_id,
                event_no=e.event_no,
                seq=e.seq,
                model=e.model[:64],
                state=e.state,
                error_code=(e.error_code or "")[:32],
                detail=e.detail,
                sha256=e.sha256 or "",
                active_sha256=e.active_sha256 or "",
                rollout_id=(e.rollout_id or "")[:64],
                health=e.health,
                device_ts=e.ts[:40],
                delivery=e.delivery or "",
                bytes_downloaded=e.bytes_downloaded,
                next_opening=parse_time(e.next_opening, "next_opening") if e.next_opening else None,
                received_at=item.received_at,
            )
            for item in fresh.values()
            for e in (item.event,)
        ]
        # A second ingest process may insert the same redelivered event between our check and
        # this insert; the unique constraint settles it. ignore_conflicts returns no ids, so the
        # rows this process inserted are told apart by carrying its own receive time: a copy the
        # broker redelivered to us after another process stored it is not ours to count or hand on.
        DeviceEvent.objects.bulk_create(rows, ignore_conflicts=True)
        stored = [
            row
            for row in DeviceEvent.objects.filter(
                device_id__in={k[0] for k in fresh}, event_no__in={k[2] for k in fresh}
            )
            if (key := (row.device_id, row.seq, row.event_no)) in fresh
            and row.received_at == fresh[key].received_at
        ]
        self.stats.events_stored += len(stored)
        return sorted(stored, key=lambda r: (r.device_id, r.event_no))

    # --- per-model state and history ------------------------------------------------------------

    def _locked_states(self, pairs: set[tuple[str, int]]) -> dict[tuple[str, int], DeviceModelState]:
        DeviceModelState.objects.bulk_create(
            [DeviceModelState(device_id=d, model_id=m) for d, m in pairs], ignore_conflicts=True
        )
        rows = (
            DeviceModelState.objects.select_for_update()
            .filter(device_id__in={d for d, _ in pairs}, model_id__in={m for _, m in pairs})
            .order_by("id")  # one lock order for every ingest process: no deadlocks
        )
        return {(r.device_id, r.model_id): r for r in rows if (r.device_id, r.model_id) in pairs}

    @staticmethod
    def _versions(model_ids: set[int], shas: set[str]) -> dict[tuple, int]:
        found: dict[tuple, int] = {}
        for model_id, hardware_id, sha, version_id in Artifact.objects.filter(
            version__model_id__in=model_ids, sha256__in=shas
        ).values_list("version__model_id", "hardware_id", "sha256", "version_id"):
            found[(model_id, hardware_id, sha)] = version_id
            found.setdefault((model_id, None, sha), version_id)
        return found

    @staticmethod
    def _event_time(event: DeviceEvent) -> datetime:
        if event.device_ts:
            try:
                at = parse_time(event.device_ts, "ts")
                if at <= event.received_at + MAX_FUTURE_SKEW:
                    return min(at, event.received_at)
            except ProtocolError:
                pass
        return event.received_at

    class _History:
        """Release-history changes for one batch, written with two queries at the end."""

        def __init__(self, pairs: set[tuple[str, int]]):
            self.open = {
                (r.device_id, r.model_id): r
                for r in ActiveRelease.objects.filter(
                    device_id__in={d for d, _ in pairs}, model_id__in={m for _, m in pairs}, to_time__isnull=True
                )
            }
            self.closed: list[ActiveRelease] = []
            self.created: list[ActiveRelease] = []

        def switch(self, state: DeviceModelState, version_id: int | None, sha: str, at: datetime) -> None:
            key = (state.device_id, state.model_id)
            row = self.open.get(key)
            if row is not None:
                if row.sha256 == sha:
                    return
                at = max(at, row.from_time)
                row.to_time = at
                if row.pk is not None:
                    self.closed.append(row)
            new = ActiveRelease(device_id=key[0], model_id=key[1], version_id=version_id, sha256=sha, from_time=at)
            self.created.append(new)
            self.open[key] = new

        def save(self) -> None:
            bulk_set(self.closed, ["to_time"])
            if self.created:
                ActiveRelease.objects.bulk_create(self.created)

    def _apply_model_states(self, accepted: list[_Parsed], stored: list[DeviceEvent], devices: dict[str, Device]):
        """Walk events and presence in arrival order: what arrived last wins, except that an
        event never moves a model's state behind one with a higher event_no."""
        by_key = {(e.device_id, e.seq, e.event_no): e for e in stored}
        # device, model, event, sha, at, what the presence reported for the model (or None)
        steps: list[tuple[str, str, DeviceEvent | None, str, datetime, dict | None]] = []
        for item in accepted:
            if item.kind == "events":
                e = item.event
                row = by_key.get((e.device_id, e.seq, e.event_no))
                if row is not None:
                    steps.append((row.device_id, row.model, row, row.active_sha256, self._event_time(row), None))
            elif item.kind == "presence":
                steps.extend(_presence_steps(item))
        if not steps:
            return
        models = {m.name: m.pk for m in Model.objects.filter(name__in={s[1] for s in steps})}
        steps = [s for s in steps if s[1] in models]
        if not steps:
            return
        pairs = {(s[0], models[s[1]]) for s in steps}
        states = self._locked_states(pairs)
        history = self._History(pairs)
        versions = self._versions(set(models.values()), {s[3] for s in steps if s[3]})
        now = timezone.now()
        touched: set[int] = set()
        for device_id, model_name, event, sha, at, reported in steps:
            state = states[(device_id, models[model_name])]
            if reported is not None:
                state.reported_seq = reported["seq"]
                state.reported_committed = reported["committed"]
                state.reported_update_seq = reported["update_seq"]
                state.reported_at = at
            if event is not None:
                if event.event_no <= state.last_event_no:
                    continue  # an older report arriving late never moves state backwards
                state.last_event_no = event.event_no
                state.last_seq = max(event.seq, 0)
                state.last_state = event.state
                state.last_error_code = event.error_code
                state.last_rollout_id = event.rollout_id
            if sha and sha != state.active_sha256:
                hardware = devices[device_id].hardware_id
                version_id = versions.get((state.model_id, hardware, sha)) or versions.get((state.model_id, None, sha))
                state.active_sha256 = sha
                state.active_version_id = version_id
                history.switch(state, version_id, sha, at)
            state.updated_at = now
            touched.add(state.pk)
        bulk_set(
            [state for state in states.values() if state.pk in touched],
            ["last_event_no", "last_seq", "last_state", "last_error_code", "last_rollout_id", "updated_at",
             "active_sha256", "active_version", "reported_seq", "reported_committed", "reported_update_seq",
             "reported_at"],
        )
        history.save()

    # --- device row -------------------------------------------------------------------------------

    def _update_devices(self, items: list[_Parsed], devices: dict[str, Device]) -> None:
        per_device: dict[str, dict] = defaultdict(dict)
        for item in items:  # arrival order: the last message decides `online`
            fields = per_device[item.device_id]
            fields["last_seen"] = max(fields.get("last_seen", item.received_at), item.received_at)
            if item.kind == "presence":
                self.stats.presence += 1
                fields["online"] = bool(item.data["online"])
                if item.data.get("models") is not None:
                    fields["reported_at"] = item.received_at
                version = item.data.get("agent_version")
                if isinstance(version, str) and version:
                    fields["agent_version"] = version[:64]
                if item.data.get("models") is not None:
                    # An online presence says everything it understands (parse_presence checked the
                    # names): none listed is an agent from before features, or one downgraded to it,
                    # which must get envelopes inside again. The offline one (the last will) says nothing.
                    fields["features"] = sorted(set(item.data.get("features") or []))
                if item.data.get("trust") is not None:
                    fields["trust"] = _trust(item.data["trust"])
            else:
                fields["online"] = True
            if item.kind == "telemetry":
                self.stats.telemetry += 1
                fields["last_telemetry"] = _without_sketches(item.data)
                fields["last_telemetry_at"] = item.received_at
            if item.kind == "events":
                known = fields.get("last_event_no", devices[item.device_id].last_event_no)
                fields["last_event_no"] = max(known, item.event.event_no)
        # One UPDATE per combination of fields instead of one per device.
        groups: dict[tuple, list[Device]] = defaultdict(list)
        for device_id, fields in per_device.items():
            groups[tuple(sorted(fields))].append(Device(pk=device_id, **fields))
        for names, rows in groups.items():
            bulk_set(rows, list(names))
