"""Dispatch: sign and send the directives of queued devices, within the rate cap."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from ota.db import bulk_set
from ota.models import DeviceModelState, Directive, Rollout, RolloutDevice, Wave
from ota.rollouts.definition import device_windows
from ota.rollouts.directives import DirectiveRequest, directives_issue
from registry.models import Artifact

RD = RolloutDevice.State


def wave_dispatch(rollout: Rollout, wave: Wave) -> int:
    """Sign and send directives for queued devices, within the rate cap. Each carries the device's
    maintenance windows (its label group's, else the rollout's), by its labels at dispatch."""
    rate = wave.gates.get("rate_per_minute")
    now = timezone.now()
    limit = None
    if rate:
        recent = RolloutDevice.objects.filter(rollout=rollout, directed_at__gte=now - timedelta(seconds=60)).count()
        limit = max(0, rate - recent)
        if limit == 0:
            return 0
    queued = RolloutDevice.objects.filter(rollout=rollout, state=RD.QUEUED).select_related("device").order_by("rank")
    if limit is not None:
        queued = queued[:limit]
    batch = list(queued[:5000])
    if not batch:
        return 0
    release = rollout.release
    states = {
        s.device_id: s
        for s in DeviceModelState.objects.filter(device_id__in=[a.device_id for a in batch], model_id=rollout.model_id)
    }
    previous_by_sha = _versions_by_sha(rollout.model_id, {s.active_sha256 for s in states.values() if s.active_sha256})
    requests = [DirectiveRequest(device_id=a.device_id, hardware=a.device.hardware_id, version=release,
                                 retry_denied=a.lift_denylist,
                                 windows=tuple(device_windows(windows=rollout.windows, label_windows=rollout.label_windows,
                                                              labels=a.device.labels)))
                for a in batch]
    issued = directives_issue(requests=requests, rollout_id=rollout.pk, kind=Directive.Kind.UPDATE)
    for a in batch:
        directive = issued.get(a.device_id)
        state = states.get(a.device_id)
        if state is not None and a.previous_version_id is None and a.seq is None:
            a.previous_version_id = state.active_version_id or previous_by_sha.get(state.active_sha256)
            a.previous_sha256 = state.active_sha256
        if directive is None:
            a.state, a.detail = RD.SKIPPED, "device was revoked before its directive went out"
        else:
            a.state, a.seq = RD.DIRECTED, directive.seq
            a.attempts += 1
            a.lift_denylist = False  # signed into this directive
            a.received_at = a.download_started_at = a.verify_started_at = None
            a.activate_started_at = a.trial_started_at = a.finished_at = a.window_opens_at = None
        a.directed_at = a.updated_at = now
    bulk_set(
        batch,
        [
            "state", "seq", "attempts", "lift_denylist", "previous_version", "previous_sha256", "directed_at", "updated_at", "detail",
            "received_at", "download_started_at", "verify_started_at", "activate_started_at",
            "trial_started_at", "finished_at", "window_opens_at",
        ],
    )
    return len(issued)


def _versions_by_sha(model_id: int, shas: set[str]) -> dict[str, int]:
    if not shas:
        return {}
    return dict(
        Artifact.objects.filter(version__model_id=model_id, sha256__in=shas).values_list("sha256", "version_id")
    )
