"""Simulated devices' credentials: enrolled through ota.fleet.enrollment (the same path as
`fleet-agent enroll`), saved to and loaded from a file, and resumed from what the server heard."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class SimCredentials:
    device_id: str
    password: str
    hardware: str
    api_token: str = ""


def enroll_simulated_devices(
    *,
    count: int,
    hardware: str,
    labels: dict[str, str] | None = None,
    token_secret: str | None = None,
    name_prefix: str = "sim",
) -> list[SimCredentials]:
    """Enroll `count` devices through ota.fleet.enrollment.device_enroll (needs Django set up)."""
    from ota.fleet.enrollment import device_enroll, enrollment_token_create

    if token_secret is None:
        _token, token_secret = enrollment_token_create(
            max_uses=count, labels={}, name=f"simulate_fleet x{count}", created_by="simulator"
        )
    creds = []
    for i in range(count):
        enrollment = device_enroll(
            token_secret=token_secret, hardware=hardware, labels=dict(labels or {}), name=f"{name_prefix}-{i:05d}"
        )
        creds.append(
            SimCredentials(enrollment.device.id, enrollment.mqtt_password, hardware, enrollment.api_token)
        )
    return creds


def load_credentials(path: Path) -> list[SimCredentials]:
    return [SimCredentials(**row) for row in json.loads(path.read_text())]


def save_credentials(path: Path, creds: list[SimCredentials]) -> None:
    path.write_text(json.dumps([asdict(c) for c in creds]))
    path.chmod(0o600)


def resume_state(device_ids: list[str]) -> dict[str, dict]:
    """What the server last heard from each device, so a restarted simulator neither reuses
    event numbers nor re-runs updates it already finished, and admits directives against the
    same floors and denylist (the agent keeps all this in its journal)."""
    from ota.models import Device, DeviceEvent, DeviceModelState

    state = {d: {"event_no": 0, "seqs": {}, "active": {}, "floors": {}, "denylist": set()}
             for d in device_ids}
    for device_id, last_event_no in Device.objects.filter(pk__in=device_ids).values_list("id", "last_event_no"):
        state[device_id]["event_no"] = last_event_no + 1
    model_states = DeviceModelState.objects.filter(device_id__in=device_ids).values_list(
        "device_id", "model__name", "active_sha256", "last_seq", "active_version__rollback_floor"
    )
    for device_id, model, sha, seq, floor in model_states:
        if sha:
            state[device_id]["active"][model] = sha
        if floor:
            # The active release was committed here, and a commit raises the agent's floor to its own.
            state[device_id]["floors"][model] = floor
        state[device_id]["seqs"][model] = seq
    for device_id, sha in DeviceEvent.objects.filter(device_id__in=device_ids, state="rolled_back").exclude(
        sha256=""
    ).values_list("device_id", "sha256"):
        state[device_id]["denylist"].add(sha)  # the agent deny-lists what it rolled back from
    return state
