"""Module-scoped building blocks for agent tests: one broker, artifact server, key pair and
subscriber per test module, plus a template state directory with v1 installed and committed by
a real agent (cloned per test so every test starts from a genuinely installed device)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.support.agent_harness import (
    Artifact,
    ArtifactServer,
    Keys,
    Rig,
    Subscriber,
    clone_state,
    linear_contract,
    release_envelope,
    wait_for,
)
from tests.support.mosquitto import Mosquitto
from tests.support.onnx_models import linear_model

MODEL = "detector"


@dataclass
class Installed:
    rig: Rig
    template: Path  # state dir with v1 committed
    v1: Artifact
    rel1: dict
    v1_counter: int


def make_rig(tmp: Path) -> tuple[Rig, Mosquitto]:
    broker = Mosquitto(tmp / "broker").start()
    server = ArtifactServer().start()
    subscriber = Subscriber(broker.port).start()
    return Rig(broker=broker, server=server, keys=Keys.generate(), subscriber=subscriber, tmp=tmp), broker


def close_rig(rig: Rig) -> None:
    rig.close()
    rig.subscriber.stop()
    rig.server.stop()
    rig.broker.stop()


def install_template(rig: Rig, *, counter: int = 1, rollback_floor: int = 0, **config) -> Installed:
    v1 = Artifact(linear_model(scale=2.0, bias=1.0, padding_bytes=200_000))
    rel1 = release_envelope(rig.keys, model=MODEL, version="1.0", counter=counter, rollback_floor=rollback_floor,
                            artifacts=[v1.entry()], health=linear_contract(scale=2.0, bias=1.0))
    rig.config("template", **config)
    agent = rig.agent("template").start()
    rig.publish_directive("template", rig.directive("template", 1, MODEL, rel1, v1))
    outcome = rig.subscriber.wait_outcome("template", 1, agent=agent)
    assert outcome["state"] == "committed", outcome
    state = rig.tmp / "template" / "state"
    wait_for(lambda: not list((state / "outbox").glob("*.json")), 10, "template outbox drained", agent=agent)
    assert agent.stop() == 0
    return Installed(rig=rig, template=state, v1=v1, rel1=rel1, v1_counter=counter)


def device_from(inst: Installed, device: str, **update) -> Path:
    """A new device named `device` whose state directory is a copy of the template's (v1 installed
    and committed) and whose agent.toml has `update` as its [update] table; returns the state dir."""
    state = clone_state(inst.template, inst.rig.tmp / device / "state")
    inst.rig.config(device, state_dir=state, update=update)
    return state


def add_v2(inst: Installed, *, padding_bytes: int) -> None:
    """inst.v2 and inst.rel2: release 2.0 of MODEL (y = 3x + 0.5, padded to the size a test needs)
    with a health contract its model passes, signed with the rig's release key."""
    inst.v2 = Artifact(linear_model(scale=3.0, bias=0.5, padding_bytes=padding_bytes))
    inst.rel2 = release_envelope(inst.rig.keys, model=MODEL, version="2.0", counter=2, artifacts=[inst.v2.entry()],
                                 health=linear_contract(scale=3.0, bias=0.5))
