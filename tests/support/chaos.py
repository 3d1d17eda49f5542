"""A storm for the server side of a rollout: each process the platform runs (Celery worker, Celery
beat, mqtt_ingest, Redis, Mosquitto) killed with SIGKILL in turn and started again, as a power
cut or the OOM killer would. Used by tests/test_chaos.py and benchmarks/chaos.py, with the
checks both make on what the fleet was told and what it reported."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

KILL_ORDER = ("worker", "beat", "ingest", "redis", "broker")


@dataclass
class Storm:
    """Kills `KILL_ORDER` in turn: each is down `down_seconds`, then `between_seconds` pass before
    the next. `platform` is a tests.support.platform.Platform whose worker, beat and ingest this
    storm (re)starts; `broker` has kill()/start(); `redis` a tests.support.redis_server.RedisServer."""

    platform: object
    broker: object
    redis: object
    down_seconds: float = 2.0
    between_seconds: float = 3.0
    kills: list[dict] = field(default_factory=list)
    procs: dict = field(default_factory=dict)

    def start_server(self) -> None:
        self.procs["ingest"] = self.platform.start_ingest("ingest")
        self.procs["worker"] = self.platform.start_worker("worker")
        self.procs["beat"] = self.platform.start_beat()

    def kill(self, what: str, *, while_=None) -> None:
        t0 = time.monotonic()
        running = while_() if while_ else None
        if what in ("worker", "beat", "ingest"):
            self.platform.kill(self.procs[what])
        else:
            getattr(self, what).kill()
        time.sleep(self.down_seconds)
        if what == "worker":
            self.procs[what] = self.platform.start_worker(f"worker-after-{len(self.kills)}")
        elif what == "beat":
            self.procs[what] = self.platform.start_beat()
        elif what == "ingest":
            self.procs[what] = self.platform.start_ingest(f"ingest-after-{len(self.kills)}")
        else:
            getattr(self, what).start()
        self.kills.append({"what": what, "down_seconds": round(time.monotonic() - t0, 2), "mid_rollout": running})

    def run(self, *, rounds: int = 1, while_=None, stop_early: bool = False) -> list[dict]:
        """Each of KILL_ORDER once per round. `while_()` (e.g. "the rollout is running") is
        recorded with each kill, so a caller can check the storm hit the rollout, not its end;
        with stop_early, the storm ends at the first full round after while_() turned false."""
        for _ in range(rounds):
            if stop_early and while_ is not None and not while_():
                break
            for what in KILL_ORDER:
                self.kill(what, while_=while_)
                time.sleep(self.between_seconds)
        return self.kills


def directives_per_wave(rollout_id: int) -> dict[tuple[str, int], set[int]]:
    """(device, wave index) -> the seqs of update directives signed for it in this rollout."""
    from ota.models import Directive, RolloutDevice

    wave_of = dict(RolloutDevice.objects.filter(rollout_id=rollout_id).values_list("device_id", "wave__index"))
    seqs: dict[tuple[str, int], set[int]] = defaultdict(set)
    for device_id, seq in Directive.objects.filter(rollout_id=rollout_id, kind="update").values_list("device_id", "seq"):
        seqs[(device_id, wave_of[device_id])].add(seq)
    return seqs


def event_gaps(device_ids) -> dict[str, list[int]]:
    """Per device, the event numbers missing between its first and last stored event: every
    agent (and the simulator) numbers its events 0, 1, 2, ... so a hole is an event lost."""
    from ota.models import DeviceEvent

    numbers: dict[str, set[int]] = defaultdict(set)
    for device_id, n in DeviceEvent.objects.filter(device_id__in=list(device_ids)).values_list("device_id", "event_no"):
        numbers[device_id].add(n)
    return {d: sorted(set(range(min(ns), max(ns) + 1)) - ns) for d, ns in numbers.items()
            if len(ns) != max(ns) - min(ns) + 1}


# What a healthy update reports, in order (agent.protocol.State; the simulator sends the same).
UPDATE_STATES = ("received", "downloading", "verifying", "prechecking", "activating", "trial", "committed")


def events_missing(rollout_id: int) -> dict[str, list[str]]:
    """Per device of the rollout, the states of its update (UPDATE_STATES) with no stored event:
    unlike event_gaps, this sees a lost last event too."""
    from ota.models import DeviceEvent, RolloutDevice

    assignments = dict(RolloutDevice.objects.filter(rollout_id=rollout_id).values_list("device_id", "seq"))
    seen: dict[str, set[str]] = defaultdict(set)
    for device_id, seq, state in DeviceEvent.objects.filter(device_id__in=list(assignments)).values_list(
            "device_id", "seq", "state"):
        if assignments.get(device_id) == seq:
            seen[device_id].add(state)
    return {d: [s for s in UPDATE_STATES if s not in seen[d]] for d in assignments
            if not set(UPDATE_STATES) <= seen[d]}
