"""Simulated devices: many real MQTT connections with real per-device credentials, one thread.

Each simulated device (enrolled by ota.sim.enroll, the same path as `fleet-agent enroll`)
connects with its own username and password, judges every directive with the agent's own
admission function (agent.admission.admit, against the pinned release and rollout keys and the
device's last seq, rollback floors, denylist and active models) and answers with the agent's
event sequence. It skips the download, precheck and trial work itself, so one process can stand
in for thousands of boxes. All sockets share one selector loop (paho's external-loop API)
instead of a thread per device.

A newer directive for the model being updated, arriving before activation, supersedes the update
(admission's Preempt: failed SUPERSEDED, then the newer one starts at once), as on the agent.

Maintenance windows (a directive's signed `windows`, agent.windows) are honoured as the agent does:
after the precheck, a device whose window is closed reports `waiting_for_window` with the next
opening and activates when it opens, by the simulator's clock. Unlike the agent, it keeps the
waiting update in its one slot (other models' directives wait), which is all a fleet test needs.

Behaviours: healthy; fail-precheck (failed PRECHECK_FAILED, active model untouched);
fail-trial (activates, then rolled_back TRIAL_FAILED); slow (long steps); flapping (drops
offline now and then, converging from the retained directive after reconnecting).

Model behaviours (`model_behaviours`, by release sha256): what the app on each box would report
about the model it runs, sent with telemetry as the agent's `model_metrics` and folded by the
agent's own aggregation code (agent.metrics.aggregate.Window): `slower` (latency factor),
`error_rate`, `outputs` (label shares, for drift). A release not listed serves at 10 ms, 0.5 %
errors, labels person/car half and half; each box has its own speed (~10 % apart), as real ones do.

One topic at about 500 lines, kept in one file on purpose: a simulated device (SimDevice) and the
one selector loop that drives thousands of them (FleetSimulator) share their timers and sockets.
"""

from __future__ import annotations

import functools
import heapq
import logging
import random
import selectors
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from hashlib import sha256

import paho.mqtt.client as mqtt

from agent.admission import (
    Accept,
    AlreadyActive,
    Defer,
    DeviceView,
    Ignore,
    NeedRelease,
    Preempt,
    Refuse,
    admit,
    could_not_process,
)
from agent.protocol import (
    FEATURES,
    ErrorCode,
    ReleaseRef,
    release_bytes,
    Event,
    ProtocolError,
    State,
    Topics,
    client_id,
    encode_json,
    format_time,
    parse_ingest_status,
    presence_payload,
    utcnow,
)
from agent import windows as maintenance_windows
from agent.metrics.aggregate import Window
from agent.signing import Keyring
from ota.sim.enroll import SimCredentials, resume_state

logger = logging.getLogger(__name__)

BEHAVIOURS = ("healthy", "fail-precheck", "fail-trial", "slow", "flapping")
MODEL_BASELINE = {"latency_ms": 10.0, "slower": 1.0, "error_rate": 0.005, "outputs": {"person": 0.5, "car": 0.5}}
SIM_AGENT_VERSION = "sim-1"
# The agent's journal remembers this many refused unauthenticated payloads (reported once each).
REFUSED_REMEMBERED = 32


@dataclass
class SimStats:
    connected: int = 0
    connects: int = 0
    refused: int = 0
    disconnects: int = 0
    directives: int = 0
    rejected: int = 0
    updates_started: int = 0
    committed: int = 0
    failed: int = 0
    rolled_back: int = 0
    events_sent: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


# --- one simulated device ---------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class _Update:
    """The simulated update in flight: what its events carry and what a commit or rollback changes."""

    seq: int
    model: str
    sha: str
    rollout_id: str | None
    rollback_floor: int
    version: str | None = None
    windows: tuple[str, ...] = ()  # maintenance windows: activate only while one is open
    next_opening: str | None = None  # the opening last reported while waiting for a window
    steps: list[tuple[str, str | None]] = field(default_factory=list)  # (state, error code), in order
    previous: str | None = None  # the sha `current` pointed at before activation, restored by a rollback
    phase: str = State.RECEIVED  # the last state reported (agent.machine.Phase values)


class SimDevice:
    def __init__(self, sim: FleetSimulator, creds: SimCredentials, behaviour: str, resume: dict | None = None):
        self.sim = sim
        self.creds = creds
        self.id = creds.device_id
        self.behaviour = behaviour
        resume = resume or {}
        self.event_no = resume.get("event_no", 0)
        # What agent.admission.admit reads, kept in the shape DeviceView takes so that judging a
        # directive copies nothing (the agent keeps the same facts in its journal).
        self.seqs: dict[str, int] = dict(resume.get("seqs", {}))  # model -> highest seq handled
        self.floors: dict[str, int] = dict(resume.get("floors", {}))
        self.denylist: set[str] = set(resume.get("denylist", ()))
        # model -> (sha `current` points at, committed); what the server saw active counts as committed.
        self.models: dict[str, tuple[str, bool]] = {
            model: (sha, True) for model, sha in resume.get("active", {}).items()}
        self.versions: dict[str, str | None] = {}  # model -> release version of what runs, when known
        self.last_health: dict | None = None
        self.refused: list[bytes] = []  # digests of payloads refused without their seq (reported once)
        self.update: _Update | None = None
        self.pending: list[bytes] = []  # directives deferred while an update runs, oldest first
        self.outbox: list[bytes] = []
        # Events handed to the broker, newest last, sent again when ingest announces a new session,
        # as the agent's outbox does with acked/ (a crashed broker may have lost them).
        self.sent: deque[tuple[float, bytes]] = deque(maxlen=64)
        self.ingest_epoch: str | None = None
        self.online = False
        self.dead = False  # refused by the broker (revoked): stop trying
        self.speed = sim.rng.lognormvariate(0, 0.1)  # this box's own speed, for model metrics
        topics = sim.topics
        self.t_directives = topics.directives(self.id)
        self.t_events = topics.events(self.id)
        self.t_presence = topics.presence(self.id)
        self.t_telemetry = topics.telemetry(self.id)
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id(self.id), protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        client.username_pw_set(self.id, creds.password)
        client.will_set(self.t_presence, self._presence(False), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = sim._socket_open
        client.on_socket_close = sim._socket_close
        client.on_socket_register_write = sim._socket_register_write
        client.on_socket_unregister_write = sim._socket_unregister_write
        client.user_data_set(self)
        self.client = client

    # connection ---------------------------------------------------------------------------------

    @property
    def active(self) -> dict[str, str]:
        """model -> active sha, as presence reports it (uncommitted ones too, as the agent does)."""
        return {model: sha for model, (sha, _committed) in self.models.items()}

    def _presence(self, online: bool) -> bytes:
        """As the agent's (agent.publish.presence): models and the update in flight only when online."""
        if not online:
            return presence_payload(online=False, agent_version=SIM_AGENT_VERSION, active=self.active)
        models = {
            name: {"sha256": self.models[name][0] if name in self.models else None,
                   "version": self.versions.get(name) if name in self.models else None,
                   "committed": self.models[name][1] if name in self.models else False,
                   "seq": self.seqs.get(name, 0)}
            for name in sorted(set(self.models) | set(self.seqs))
        }
        upd = self.update
        update = {"model": upd.model, "seq": upd.seq, "phase": upd.phase} if upd else None
        return presence_payload(online=True, agent_version=SIM_AGENT_VERSION, active=self.active, models=models,
                                update=update, features=self.sim.features)

    def connect(self) -> None:
        try:
            self.client.connect(self.sim.host, self.sim.port, keepalive=self.sim.keepalive)
        except OSError as exc:
            logger.debug("sim %s: connect failed: %s", self.id, exc)
            self.sim.schedule(self.sim.reconnect_delay(), self.connect)

    def _on_connect(self, client, _userdata, _flags, reason_code, _properties) -> None:
        if reason_code.is_failure:
            self.sim.stats.refused += 1
            self.dead = True
            logger.warning("sim %s: broker refused the connection: %s", self.id, reason_code)
            return
        self.online = True
        self.sim.stats.connects += 1
        self.sim.stats.connected += 1
        client.subscribe([(self.t_directives, 1), (self.sim.topics.ingest_status(), 1)])
        client.publish(self.t_presence, self._presence(True), qos=1, retain=True)
        outbox, self.outbox = self.outbox, []
        for payload in outbox:
            self._send_event(payload)
        if self.behaviour == "flapping":
            self.sim.schedule(self.sim.flap_period * (0.5 + random.random()), self.flap)

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _properties) -> None:
        if self.online:
            self.sim.stats.connected -= 1
            self.sim.stats.disconnects += 1
        self.online = False
        if not self.dead and not self.sim.stopping and not getattr(self, "_flapping", False):
            self.sim.schedule(self.sim.reconnect_delay(), self.reconnect)

    def reconnect(self) -> None:
        if self.dead or self.sim.stopping:
            return
        self._flapping = False
        try:
            self.client.reconnect()
        except OSError:
            self.sim.schedule(self.sim.reconnect_delay(), self.reconnect)

    def flap(self) -> None:
        if not self.online or self.sim.stopping:
            return
        self._flapping = True
        self.client.publish(self.t_presence, self._presence(False), qos=1, retain=True)
        self.client.disconnect()
        self.sim.schedule(self.sim.flap_down, self.reconnect)

    # directives ---------------------------------------------------------------------------------

    def _on_message(self, _client, _userdata, message) -> None:
        if message.topic == self.sim.topics.ingest_status():
            self._ingest_status(bytes(message.payload))
            return
        if not mqtt.topic_matches_sub(self.t_directives, message.topic) or not message.payload:
            return  # an empty retained payload only clears the topic
        self.sim.stats.directives += 1
        self.handle_directive(bytes(message.payload))

    def _ingest_status(self, payload: bytes) -> None:
        """As agent.mqtt.MqttLink: a new ingest session has the recently sent events go out again."""
        try:
            epoch = parse_ingest_status(payload)
        except ProtocolError:
            return
        if epoch == self.ingest_epoch:
            return
        self.ingest_epoch = epoch
        horizon = time.monotonic() - self.sim.resend_window_seconds
        for at, event in list(self.sent):
            if at >= horizon and self.online:
                self.client.publish(self.t_events, event, qos=1)

    def device_view(self) -> DeviceView:
        upd = self.update
        return DeviceView(device_id=self.id, hardware=self.creds.hardware, seqs=self.seqs,
                          floors=self.floors, denylist=self.denylist, active=self.models,
                          busy=upd is not None, busy_model=upd.model if upd else None,
                          busy_seq=upd.seq if upd else 0, busy_phase=upd.phase if upd else None,
                          releases=self.sim.releases)

    def handle_directive(self, payload: bytes) -> None:
        """Judge one directive payload with the agent's admit() and act on the decision as
        Agent.handle_payload does: same events, error codes, seqs and bookkeeping."""
        try:
            decision = admit(payload=payload, device=self.device_view(), release_keys=self.sim.release_keys,
                             rollout_keys=self.sim.rollout_keys, now=utcnow())
            if isinstance(decision, NeedRelease):  # a lean directive: the envelope it names, then again
                if self.sim.release_for(decision.ref) is None:
                    decision = Refuse(code=ErrorCode.NOT_FOUND, message="the release manifest could not be fetched",
                                      record_seq=True, seq=decision.seq, model=decision.model, sha=decision.sha,
                                      rollout_id=decision.rollout_id)
                else:
                    decision = admit(payload=payload, device=self.device_view(), release_keys=self.sim.release_keys,
                                     rollout_keys=self.sim.rollout_keys, now=utcnow())
        except Exception as exc:
            # As on a real device, input must not take the simulator down; the agent refuses it too.
            logger.warning("sim %s: directive could not be processed: %r", self.id, exc)
            decision = could_not_process(exc)
        if isinstance(decision, Ignore):
            return  # the retained directive again after a reconnect (or the update in flight)
        if isinstance(decision, Refuse):
            self._refuse(decision, payload)
        elif isinstance(decision, Defer):
            # One update at a time: judged again (seq, expiry, keys) once this one ends. An
            # identical payload already waiting would only be ignored then, so keep one copy.
            if payload not in self.pending:
                self.pending.append(payload)
        elif isinstance(decision, AlreadyActive):
            self._confirm(decision)
        elif isinstance(decision, Accept):
            self._start(decision)
        elif isinstance(decision, Preempt):
            # The agent's Agent._preempt: the update before activation ends failed (SUPERSEDED),
            # and the newer directive is carried out at once.
            old = self.update
            self.update = None
            self.sim.stats.failed += 1
            self._emit(State.FAILED, seq=old.seq, model=old.model, sha=old.sha, rollout_id=old.rollout_id,
                       code=ErrorCode.SUPERSEDED, detail=decision.message)
            if isinstance(decision.then, Accept):
                self._start(decision.then)
            else:
                self._confirm(decision.then)

    def _confirm(self, decision: AlreadyActive) -> None:
        self._handled(decision.model, decision.seq)
        self.sim.stats.committed += 1
        self._emit(State.COMMITTED, seq=decision.seq, model=decision.model, sha=decision.sha,
                   rollout_id=decision.rollout_id, detail=decision.message, health=self.last_health)

    def _handled(self, model: str, seq: int) -> None:
        self.seqs[model] = max(self.seqs.get(model, 0), seq)

    def _refuse(self, decision: Refuse, payload: bytes) -> None:
        if decision.record_seq:
            self._handled(decision.model, decision.seq)
        else:
            # Not trusted, or a replay: reported once per payload, or every reconnect would
            # re-deliver the retained payload and report it again.
            digest = sha256(payload).digest()
            if digest in self.refused:
                return
            self.refused = self.refused[-(REFUSED_REMEMBERED - 1):] + [digest]
        self.sim.stats.rejected += 1
        self._emit(State.REJECTED, seq=decision.seq, model=decision.model, sha=decision.sha,
                   rollout_id=decision.rollout_id, code=decision.code, detail=decision.message)

    def _start(self, decision: Accept) -> None:
        upd = decision.update
        self.sim.stats.updates_started += 1
        self._handled(upd.model, upd.seq)
        if decision.lifted:
            self.denylist.discard(decision.lifted)  # an operator's retry (retry_denied)
        self.update = _Update(seq=upd.seq, model=upd.model, sha=upd.sha, rollout_id=upd.rollout_id,
                              rollback_floor=upd.rollback_floor, version=upd.version,
                              windows=tuple(upd.windows or ()), steps=self._plan(upd.sha, bool(upd.windows)))
        self._emit(State.RECEIVED, seq=upd.seq, model=upd.model, sha=upd.sha, rollout_id=upd.rollout_id,
                   detail=decision.detail)
        self.sim.schedule(self.sim.step_delay(self.behaviour), functools.partial(self.step, self.update))

    def _plan(self, sha: str, windows: bool = False) -> list[tuple[str, str | None]]:
        fails_precheck = self.behaviour == "fail-precheck" or sha in self.sim.fail_shas
        steps: list[tuple[str, str | None]] = [(State.DOWNLOADING, None), (State.VERIFYING, None),
                                               (State.PRECHECKING, None)]
        if fails_precheck:
            return steps + [(State.FAILED, ErrorCode.PRECHECK_FAILED)]
        if windows:
            steps.append((State.WAITING_FOR_WINDOW, None))
        steps += [(State.ACTIVATING, None), (State.TRIAL, None)]
        if self.behaviour == "fail-trial":
            return steps + [(State.ROLLED_BACK, ErrorCode.TRIAL_FAILED)]
        return steps + [(State.COMMITTED, None)]

    def step(self, update: _Update | None = None) -> None:
        """The next state of the update in flight; `update`: the one this timer was set for (a
        superseded update's timer must not step its successor)."""
        upd = self.update
        if upd is None or (update is not None and update is not upd):
            return
        state, code = upd.steps.pop(0)
        if state == State.WAITING_FOR_WINDOW:
            self._wait_for_window(upd)
            return
        health = None
        detail = ""
        # The same journal changes as the agent's steps, made before the event that reports them.
        if state == State.TRIAL:
            old = self.models.get(upd.model)
            upd.previous = old[0] if old and old[0] != upd.sha else None
            self.models[upd.model] = (upd.sha, False)
            self.versions[upd.model] = upd.version
        elif state == State.COMMITTED:
            self.sim.stats.committed += 1
            health = {"error_rate": 0.0, "latency_ms_p95": 4.2, "checks": 1, "simulated": True}
            detail = "trial passed"
            self.models[upd.model] = (upd.sha, True)
            self.floors[upd.model] = max(self.floors.get(upd.model, 0), upd.rollback_floor)
            self.last_health = health
        elif state == State.FAILED:
            self.sim.stats.failed += 1
            detail = "simulated precheck failure: outputs outside the contract"
        elif state == State.ROLLED_BACK:
            self.sim.stats.rolled_back += 1
            self.denylist.add(upd.sha)
            if upd.previous:
                self.models[upd.model] = (upd.previous, True)
            else:
                self.models.pop(upd.model, None)
            self.versions.pop(upd.model, None)  # the previous one's is not known here
            detail = "simulated trial failure"
        self._emit(state, seq=upd.seq, model=upd.model, sha=upd.sha, rollout_id=upd.rollout_id, code=code,
                   detail=detail, health=health)
        if state not in State.TERMINAL:
            upd.phase = state
            self.sim.schedule(self.sim.step_delay(self.behaviour), functools.partial(self.step, upd))
            return
        self.update = None
        if self.online:
            self.client.publish(self.t_presence, self._presence(True), qos=1, retain=True)
        # What arrived meanwhile, in order, as the agent reads its inbox; stop once one starts an update.
        while self.pending and self.update is None:
            self.handle_directive(self.pending.pop(0))

    def _wait_for_window(self, upd: _Update) -> None:
        """The agent's waiting_for_window step: on to activating if a window is open now, else
        report the next opening (once per opening) and look again when it comes."""
        found = maintenance_windows.parse_windows(list(upd.windows))
        now = utcnow()
        if maintenance_windows.is_open(found, now):
            self.sim.schedule(0, functools.partial(self.step, upd))
            return
        opening = maintenance_windows.next_opening(found, now)
        upd.steps.insert(0, (State.WAITING_FOR_WINDOW, None))
        upd.phase = State.WAITING_FOR_WINDOW
        if opening is None:
            return  # cannot happen for windows admission accepted; the update stays, as the agent's would
        if format_time(opening) != upd.next_opening:
            upd.next_opening = format_time(opening)
            self._emit(State.WAITING_FOR_WINDOW, seq=upd.seq, model=upd.model, sha=upd.sha, rollout_id=upd.rollout_id,
                       detail=f"downloaded and prechecked; activates when a maintenance window opens "
                              f"({'; '.join(upd.windows)})", next_opening=upd.next_opening)
        self.sim.schedule(max(0.0, (opening - now).total_seconds()) + 0.05, functools.partial(self.step, upd))

    # reports ------------------------------------------------------------------------------------

    def _emit(self, state: str, *, seq: int, model: str, sha, rollout_id, code=None, detail: str = "",
              health=None, next_opening: str | None = None) -> None:
        active = self.models.get(model)
        event = Event(
            device_id=self.id, event_no=self.event_no, seq=seq, model=model, state=state, error_code=code,
            detail=detail[:2000], sha256=sha, active_sha256=active[0] if active else None,
            rollout_id=rollout_id, health=health, ts=format_time(utcnow()), next_opening=next_opening,
        )
        self.event_no += 1
        self._send_event(event.to_payload())

    def _send_event(self, payload: bytes) -> None:
        if not self.online:
            self.outbox.append(payload)  # the agent's on-disk outbox, in memory
            return
        self.client.publish(self.t_events, payload, qos=1)
        self.sent.append((time.monotonic(), payload))
        self.sim.stats.events_sent += 1

    def send_telemetry(self) -> None:
        if self.online:
            data = {"cpu_percent": round(random.uniform(5, 60), 1), "memory_percent": 41.0, "simulated": True}
            metrics = self.model_metrics() if self.sim.metrics_requests else None
            if metrics:
                data["model_metrics"] = metrics
            self.client.publish(self.t_telemetry, encode_json(data), qos=0)

    def model_metrics(self) -> dict | None:
        """One telemetry window of what the app would have reported for each model it runs."""
        entries = []
        rng = self.sim.rng
        for model, (sha, _committed) in sorted(self.models.items()):
            b = {**MODEL_BASELINE, **self.sim.model_behaviours.get(sha, {})}
            labels, shares = list(b["outputs"]), list(b["outputs"].values())
            w = Window()
            for _ in range(self.sim.metrics_requests):
                w.add("latency_ms", rng.lognormvariate(0, 0.2) * b["latency_ms"] * b["slower"] * self.speed, "timing")
                w.add("requests", 1, "counter")
                if rng.random() < b["error_rate"]:
                    w.add("errors", 1, "counter")
                w.add("output." + rng.choices(labels, weights=shares)[0], 1, "counter")
            entries.append({"model": model, "release": sha, **w.to_json(), "summary": w.summary()})
        if not entries:
            return None
        now = format_time(utcnow())
        return {"window_start": now, "window_end": now, "models": entries, "stats": {"samples": len(entries)}}


# --- the fleet --------------------------------------------------------------------------------


class FleetSimulator:
    def __init__(
        self,
        creds: list[SimCredentials],
        *,
        host: str,
        port: int,
        release_pems: list[str],
        rollout_pems: list[str],
        topic_root: str = "fleet",
        behaviour: str | dict[str, str] = "healthy",
        step_seconds: float = 0.05,
        slow_step_seconds: float = 2.0,
        flap_period: float = 20.0,
        flap_down: float = 5.0,
        fail_shas: set[str] | None = None,
        telemetry_seconds: float = 0.0,
        keepalive: int = 60,
        resume: dict[str, dict] | None = None,
        resend_window_seconds: float = 1800.0,
        model_behaviours: dict[str, dict] | None = None,
        metrics_requests: int = 0,
        seed: int | None = None,
        release_threshold: int = 1,
        release_resolver=None,
    ):
        if isinstance(behaviour, str) and behaviour not in BEHAVIOURS:
            raise ValueError(f"behaviour {behaviour!r} is not one of {', '.join(BEHAVIOURS)}")
        self.host, self.port = host, port
        self.topics = Topics(topic_root)
        self.release_keys = Keyring.from_pems(*release_pems, threshold=release_threshold)
        self.rollout_keys = Keyring.from_pems(*rollout_pems)
        self.step_seconds = step_seconds
        self.slow_step_seconds = slow_step_seconds
        self.flap_period = flap_period
        self.flap_down = flap_down
        self.fail_shas = set(fail_shas or ())
        self.telemetry_seconds = telemetry_seconds
        self.keepalive = keepalive
        self.resend_window_seconds = resend_window_seconds  # agent: mqtt.resend_window_seconds
        # Model metrics: requests each box's app serves per telemetry window (0: no model_metrics).
        self.model_behaviours = dict(model_behaviours or {})
        self.metrics_requests = metrics_requests
        self.rng = random.Random(seed)
        # Lean directives: with a resolver (ReleaseRef -> envelope or None; from_settings reads the
        # registry, as the agent would fetch it) the devices advertise release_ref and look the
        # envelopes up through it, once per release; without one they take envelopes inside.
        self.release_resolver = release_resolver
        self.features = FEATURES if release_resolver is not None else None
        self.releases: dict[str, dict] = {}
        self.stats = SimStats()
        self.stopping = False
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, object]] = []
        self._timer_seq = 0
        self._lock = threading.Lock()  # guards _timers against schedule() from other threads
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        resume = resume or {}
        self.devices = [
            SimDevice(self, c, behaviour if isinstance(behaviour, str) else behaviour.get(c.device_id, "healthy"),
                      resume.get(c.device_id))
            for c in creds
        ]

    @classmethod
    def from_settings(cls, creds: list[SimCredentials], **kwargs) -> FleetSimulator:
        """Broker address and pinned keys as an enrolled agent would get them (needs Django)."""
        from django.conf import settings

        from registry.keys import public_key_info, release_threshold, require_enough_release_keys

        kwargs.setdefault("resume", resume_state([c.device_id for c in creds]))
        return cls(
            creds,
            host=settings.MQTT_PUBLIC_HOST,
            port=settings.MQTT_PUBLIC_PORT,
            topic_root=settings.MQTT_TOPIC_ROOT,
            release_pems=[info.public_key_pem for info in require_enough_release_keys()],
            rollout_pems=[public_key_info("rollout").public_key_pem],
            release_threshold=release_threshold(),
            release_resolver=_release_from_registry,
            **kwargs,
        )

    def release_for(self, ref: ReleaseRef) -> dict | None:
        """The envelope a lean directive names, if the resolver has it and it matches the reference."""
        if ref.sha256 not in self.releases and self.release_resolver is not None:
            envelope = self.release_resolver(ref)
            if envelope is not None and sha256(release_bytes(envelope)).hexdigest() == ref.sha256:
                self.releases[ref.sha256] = envelope
        return self.releases.get(ref.sha256)

    # timers and sockets -------------------------------------------------------------------------

    def schedule(self, delay: float, callback) -> None:
        with self._lock:
            self._timer_seq += 1
            heapq.heappush(self._timers, (time.monotonic() + delay, self._timer_seq, callback))

    def step_delay(self, behaviour: str) -> float:
        base = self.slow_step_seconds if behaviour == "slow" else self.step_seconds
        return base * (0.5 + random.random())

    def reconnect_delay(self) -> float:
        return 1.0 + random.random() * 2

    def _socket_open(self, client, device, sock) -> None:
        self._selector.register(sock, selectors.EVENT_READ, device)

    def _socket_close(self, client, device, sock) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _socket_register_write(self, client, device, sock) -> None:
        try:
            self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, device)
        except (KeyError, ValueError):
            pass

    def _socket_unregister_write(self, client, device, sock) -> None:
        try:
            self._selector.modify(sock, selectors.EVENT_READ, device)
        except (KeyError, ValueError):
            pass

    # running ------------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None, duration: float = 0.0) -> SimStats:
        stop = stop or self._stop
        deadline = time.monotonic() + duration if duration else None
        for device in self.devices:
            device.connect()
        if self.telemetry_seconds:
            self.schedule(self.telemetry_seconds, self._telemetry_tick)
        last_misc = 0.0
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            with self._lock:
                next_due = self._timers[0][0] if self._timers else time.monotonic() + 0.5
            timeout = max(0.0, min(next_due - time.monotonic(), 0.5))
            for key, mask in self._selector.select(timeout) if self._selector.get_map() else _sleep(timeout):
                client = key.data.client
                if mask & selectors.EVENT_READ:
                    client.loop_read()
                if mask & selectors.EVENT_WRITE:
                    client.loop_write()
            now = time.monotonic()
            while True:
                with self._lock:
                    if not self._timers or self._timers[0][0] > now:
                        break
                    _, _, callback = heapq.heappop(self._timers)
                try:
                    callback()
                except Exception:
                    logger.exception("simulator: a scheduled step failed")
            if now - last_misc >= 1.0:
                for device in self.devices:
                    device.client.loop_misc()
                last_misc = now
        self._shutdown()
        return self.stats

    def _telemetry_tick(self) -> None:
        for device in self.devices:
            device.send_telemetry()
        self.schedule(self.telemetry_seconds, self._telemetry_tick)

    def _shutdown(self) -> None:
        self.stopping = True
        for device in self.devices:
            if device.online:
                device.client.publish(device.t_presence, device._presence(False), qos=1, retain=True)
                device.client.disconnect()
        deadline = time.monotonic() + 2
        while self._selector.get_map() and time.monotonic() < deadline:
            for key, mask in self._selector.select(0.05):
                if mask & selectors.EVENT_READ:
                    key.data.client.loop_read()
                if mask & selectors.EVENT_WRITE:
                    key.data.client.loop_write()

    def start(self) -> FleetSimulator:
        """Run in a background thread (for tests and benchmarks in one process)."""
        self._thread = threading.Thread(target=self.run, args=(self._stop,), name="fleet-simulator", daemon=True)
        self._thread.start()
        return self

    def wait_connected(self, count: int | None = None, timeout: float = 60.0) -> None:
        count = len(self.devices) if count is None else count
        deadline = time.monotonic() + timeout
        while self.stats.connected < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.stats.connected} of {count} simulated devices connected")
            time.sleep(0.05)

    def stop(self) -> SimStats:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
        return self.stats


def _sleep(timeout: float):
    time.sleep(timeout)
    return ()


def _release_from_registry(ref: ReleaseRef) -> dict | None:
    """The envelope of the release a lean directive's URL names (.../versions/<v>/release-envelope),
    read from the registry: what the agent would fetch from that URL (needs Django)."""
    from urllib.parse import unquote, urlsplit

    from registry.models import ModelVersion

    parts = [unquote(p) for p in urlsplit(ref.url).path.split("/")]
    if "models" not in parts or "versions" not in parts:
        return None
    name, version = parts[parts.index("models") + 1], parts[parts.index("versions") + 1]
    found = ModelVersion.objects.filter(model__name=name, version=version).values_list("envelope", flat=True).first()
    return found
