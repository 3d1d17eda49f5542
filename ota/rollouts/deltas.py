"""Delta artifacts on the server: asking for one, building it (a Celery task, off the request
path), offering it in directives, serving it to devices.

A delta is built once per (base artifact, target artifact, method): the row is created with
get_or_create on its unique key and a worker claims it with a conditional UPDATE, so a task
delivered twice, or two rollouts asking at once, build it once. It goes to the artifact storage
(filesystem or S3) under deltas/. A directive carries it only when it is ready and its base is
what the device last reported running (DeviceModelState.active_sha256); the agent checks
that again itself, and falls back to the full artifact on any doubt.
"""

from __future__ import annotations

import logging
import tempfile
import time
import types
import uuid
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.core.files import File
from django.db import transaction
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from agent import deltas as delta_format
from ota.models import ArtifactDelta, DeviceModelState
from registry.artifacts import artifact_storage
from registry.models import Artifact, ModelVersion

logger = logging.getLogger(__name__)

# A claim older than this belongs to a worker that died mid-build: another may take it over.
STALE_CLAIM = timedelta(hours=1)
STALE_PENDING = timedelta(minutes=10)

State = ArtifactDelta.State


def delta_request(*, base: Artifact, target: Artifact) -> ArtifactDelta | None:
    """The delta from `base` to `target` (same hardware, different bytes), created pending and
    queued for a build on commit if it is new. None when no delta can exist between them."""
    if base.hardware_id != target.hardware_id or base.sha256 == target.sha256 or base.pk == target.pk:
        return None
    delta, created = ArtifactDelta.objects.get_or_create(base=base, target=target, method=delta_format.METHOD)
    if created:
        _enqueue(delta.pk)
    return delta


def _stuck(delta: ArtifactDelta) -> bool:
    """Pending long after it was asked for (its task lost with a broker outage), or claimed by a
    worker that died: asked for again by the next wave that wants it."""
    now = timezone.now()
    if delta.state == State.PENDING:
        return delta.created_at < now - STALE_PENDING
    return delta.state == State.BUILDING and delta.claimed_at is not None and delta.claimed_at < now - STALE_CLAIM


def _enqueue(delta_id: int) -> None:
    builder = _builder
    if builder is None:
        logger.warning("no delta builder registered; delta %s stays pending", delta_id)
        return

    def send():
        try:
            builder(delta_id)
        except Exception:  # a broker outage must not fail the directives; the next wave asks again
            logger.exception("could not queue the build of delta %s", delta_id)

    transaction.on_commit(send)


_builder: Callable[[int], None] | None = None


def delta_builder_register(builder: Callable[[int], None]) -> None:
    """OtaConfig.ready() plugs in the Celery task here: this module never imports its entry points."""
    global _builder
    _builder = builder


def delta_compute(*, delta_id: int) -> ArtifactDelta:
    """Build one delta if nobody has (claimed with a conditional UPDATE): ready, oversized or
    failed afterwards. Safe to call any number of times; only the claim winner builds."""
    now = timezone.now()
    claimed = ArtifactDelta.objects.filter(
        Q(state=State.PENDING) | Q(state=State.BUILDING, claimed_at__lt=now - STALE_CLAIM), pk=delta_id,
    ).update(state=State.BUILDING, claimed_at=now)
    delta = ArtifactDelta.objects.select_related("base", "target").get(pk=delta_id)
    if not claimed:
        return delta
    storage = artifact_storage()
    started = time.perf_counter()
    key = None
    try:
        with tempfile.TemporaryDirectory(prefix="delta-") as tmp:
            base, target, out = Path(tmp, "base"), Path(tmp, "target"), Path(tmp, "delta")
            for artifact, path in ((delta.base, base), (delta.target, target)):
                with storage.open(artifact.storage_key, "rb") as src, open(path, "wb") as dst:
                    while chunk := src.read(delta_format.CHUNK):
                        dst.write(chunk)
            length, sha256 = delta_format.delta_build(base=base, target=target, out=out)
            seconds = time.perf_counter() - started
            if length > delta_format.MAX_DELTA_RATIO * delta.target.length:
                state = State.OVERSIZED
            else:
                state = State.READY
                pair = f"{delta.base.sha256[:16]}-{delta.target.sha256[:16]}"
                name = f"deltas/{delta.target.hardware_id}/{pair}"
                with open(out, "rb") as handle:
                    key = storage.save(f"{name}/{uuid.uuid4().hex}.zst", File(handle))
        ArtifactDelta.objects.filter(pk=delta_id, state=State.BUILDING).update(
            state=state, length=length, sha256=sha256, storage_key=key or "", build_seconds=seconds,
            finished_at=timezone.now(), error="",
        )
        logger.info("delta %s: %d bytes for a %d-byte artifact in %.2fs (%s)", delta_id, length,
                    delta.target.length, seconds, state)
    except Exception as exc:  # a bad artifact or storage error fails this delta, never the caller
        logger.exception("building delta %s failed", delta_id)
        if key:
            storage.delete(key)
        ArtifactDelta.objects.filter(pk=delta_id).update(state=State.FAILED, error=str(exc)[:2000],
                                                         finished_at=timezone.now())
    delta.refresh_from_db()
    return delta


def deltas_request_for(*, release, device_ids: list[str]) -> int:
    """Ask for the deltas a rollout of `release` to these devices will want: from each artifact
    they last reported running to the release's artifact of their hardware. Built before the
    first directives go out when the workers keep up. Returns how many pairs there are."""
    targets = {a.hardware_id: a for a in release.artifacts.all()}
    running = (
        DeviceModelState.objects.filter(device_id__in=device_ids, model_id=release.model_id)
        .exclude(active_sha256="").values_list("active_sha256", "device__hardware_id").distinct()
    )
    pairs = set(running)
    if not pairs:
        return 0
    bases = Artifact.objects.filter(sha256__in={sha for sha, _ in pairs}, version__model_id=release.model_id)
    count = 0
    for base in bases:
        target = targets.get(base.hardware_id)
        if target is None or (base.sha256, base.hardware_id) not in pairs:
            continue
        if delta_request(base=base, target=target):
            count += 1
    return count


def deltas_request_on_release(*, version_id: int) -> int:
    """On a release: the deltas from the model's previous release (the highest counter below it,
    released or deprecated) to it, per hardware, queued for a build so the first wave of a
    rollout can already use them. Returns how many pairs were asked for."""
    version = ModelVersion.objects.get(pk=version_id)
    previous = (
        ModelVersion.objects.filter(model_id=version.model_id, counter__lt=version.counter,
                                    state__in=(ModelVersion.State.RELEASED, ModelVersion.State.DEPRECATED))
        .order_by("-counter").first()
    )
    if previous is None:
        return 0
    targets = {a.hardware_id: a for a in version.artifacts.all()}
    count = 0
    for base in previous.artifacts.all():
        target = targets.get(base.hardware_id)
        if target is not None and delta_request(base=base, target=target):
            count += 1
    return count


def on_version_released(sender, *, version_id: int, **kwargs) -> None:
    """registry.signals.version_released receiver (connected in OtaConfig.ready)."""
    deltas_request_on_release(version_id=version_id)


def delta_download_url(*, delta: ArtifactDelta) -> str:
    """Where a device fetches a delta: this server, device-token auth, like artifacts."""
    return f"{settings.PUBLIC_URL}{reverse('delta-download', kwargs={'pk': delta.pk})}"


def deltas_offered(*, requests: Iterable, artifacts: dict) -> dict[str, dict]:
    """Per device id, the `delta` of its directive: the ready delta from the artifact it last
    reported running to the one it is directed to. A pair without one yet is asked for (built for
    later waves and retries); such a device gets the full artifact now."""
    requests = list(requests)
    if not requests:
        return {}
    model_ids = {r.version.model_id for r in requests}
    running = {
        (s["device_id"], s["model_id"]): s["active_sha256"]
        for s in DeviceModelState.objects.filter(
            device_id__in=[r.device_id for r in requests], model_id__in=model_ids
        ).exclude(active_sha256="").values("device_id", "model_id", "active_sha256")
    }
    if not running:
        return {}
    bases = {
        (a.sha256, a.hardware_id): a
        for a in Artifact.objects.filter(sha256__in=set(running.values()), version__model_id__in=model_ids)
    }
    pairs: dict[tuple[int, int], tuple[Artifact, Artifact]] = {}
    wanted: dict[str, tuple[int, int]] = {}
    for req in requests:
        target = artifacts.get((req.version.pk, req.hardware))
        sha = running.get((req.device_id, req.version.model_id))
        base = bases.get((sha, req.hardware)) if sha else None
        if target is None or base is None or base.sha256 == target.sha256:
            continue
        pairs[(base.pk, target.pk)] = (base, target)
        wanted[req.device_id] = (base.pk, target.pk)
    if not pairs:
        return {}
    known = {
        (d.base_id, d.target_id): d
        for d in ArtifactDelta.objects.filter(
            base_id__in={b for b, _ in pairs}, target_id__in={t for _, t in pairs}, method=delta_format.METHOD
        )
    }
    for pair, (base, target) in pairs.items():
        if pair not in known:
            delta_request(base=base, target=target)
        elif _stuck(known[pair]):
            _enqueue(known[pair].pk)
    offers = {}
    for pair, delta in known.items():
        if delta.state == State.READY:
            offers[pair] = {
                "base_sha256": pairs[pair][0].sha256 if pair in pairs else "",
                "url": delta_download_url(delta=delta),
                "length": delta.length,
                "sha256": delta.sha256,
                "method": delta.method,
            }
    return {device_id: offers[pair] for device_id, pair in wanted.items() if pair in offers}


def delta_as_download(delta: ArtifactDelta):
    """The fields registry.downloads.artifact_response serves a stored file by."""
    return types.SimpleNamespace(storage_key=delta.storage_key, sha256=delta.sha256, length=delta.length,
                                 file_name=f"{delta.target.file_name}.from-{delta.base.sha256[:12]}.zst")
