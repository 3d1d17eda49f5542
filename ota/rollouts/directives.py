"""Per-device directives: seq allocation, batch signing, and publishing after commit.

A wave of thousands of devices is one transaction: one UPDATE ... RETURNING hands out every
device's next seq, the payloads are built and signed in a loop (Ed25519 costs tens of
microseconds), the records go in with one bulk INSERT, and the messages are published retained
with QoS 1 once the transaction has committed, so a device never sees a directive the database
does not know about. A worker killed between commit and publish leaves rows with
`published_at` NULL, which the beat tick publishes byte for byte later (same seq, so an agent
that already has it ignores the copy).

Lean directives (issue 12): a device whose agent advertised "release_ref" gets the release by
reference (registry.downloads.release_ref: sha256, length, URL of the envelope's canonical
bytes) instead of the whole envelope in every retained message; it fetches the envelope once and
caches it (agent.releases). Others, and every device with DIRECTIVE_RELEASE_BY_REFERENCE off, get
the envelope inside as before.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, Max, OuterRef
from django.utils import timezone

from agent.protocol import Topics, build_directive_payload, encode_json
from agent.signing import DIRECTIVE_PAYLOAD_TYPE, sign_envelope
from ota.models import Device, Directive
from ota.rollouts.deltas import deltas_offered
from ota.transport import mqtt
from registry.downloads import artifact_download_url, release_ref
from registry.keys import load_rollout_key
from registry.models import Artifact, ModelVersion

logger = logging.getLogger(__name__)

# How long a directive stays valid: long enough for a device that is offline for weeks to
# converge on reconnect; a newer directive (higher seq) supersedes it anyway.
DIRECTIVE_VALIDITY = timedelta(days=30)
PUBLISH_CHUNK = 500


@dataclass(frozen=True)
class DirectiveRequest:
    device_id: str
    hardware: str
    version: ModelVersion
    retry_denied: bool = False  # an operator's retry: the device may try a deny-listed artifact again
    # Maintenance windows (agent.windows), signed into the directive: the device activates only
    # while one is open. Updates of a rollout with windows carry them; reverts never do.
    windows: tuple[str, ...] = ()


def allocate_seqs(device_ids: list[str]) -> dict[str, int]:
    """Bump each device's directive counter in one conditional UPDATE and return the new values.

    The UPDATE row-locks the devices until commit, so two transactions can never hand out the
    same seq to one device; the unique (device, seq) constraint on Directive backs that up.
    """
    if not device_ids:
        return {}
    table = connection.ops.quote_name(Device._meta.db_table)
    placeholders = ", ".join(["%s"] * len(device_ids))
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET directive_seq = directive_seq + 1 "
            f"WHERE id IN ({placeholders}) AND state = %s RETURNING id, directive_seq",
            [*device_ids, Device.State.ACTIVE],
        )
        return dict(cursor.fetchall())


def directives_issue(
    *, requests: list[DirectiveRequest], rollout_id: int | None, kind: str
) -> dict[str, Directive]:
    """Sign and record one directive per request inside the caller's transaction; publish on commit.

    Returns the Directive per device id. Revoked devices get none (and are simply absent).
    """
    if not requests:
        return {}
    started = time.perf_counter()
    seqs = allocate_seqs([r.device_id for r in requests])
    key = load_rollout_key()
    issued = timezone.now()
    expires = issued + DIRECTIVE_VALIDITY
    artifacts = _artifacts_for(requests)
    offered = deltas_offered(requests=requests, artifacts=artifacts)
    lean = _lean_devices([r.device_id for r in requests])
    # version pk -> its release_ref, once per version of the batch (a wave is one version)
    lean_versions = {r.version.pk: r.version for r in requests if r.device_id in lean}
    refs = {pk: release_ref(version=version) for pk, version in lean_versions.items()}
    records = []
    for req in requests:
        seq = seqs.get(req.device_id)
        if seq is None:
            continue
        art = artifacts[(req.version.pk, req.hardware)]
        payload = build_directive_payload(
            device_id=req.device_id,
            seq=seq,
            issued=issued,
            expires=expires,
            rollout_id=str(rollout_id) if rollout_id is not None else None,
            model=req.version.model.name,
            **({"release_ref": refs[req.version.pk]} if req.device_id in lean
               else {"release_envelope": req.version.envelope}),
            artifact={
                "hardware": req.hardware,
                "sha256": art.sha256,
                "length": art.length,
                "url": artifact_download_url(artifact=art),
            },
            retry_denied=req.retry_denied,
            delta=offered.get(req.device_id),
            windows=req.windows,
        )
        records.append(
            Directive(
                device_id=req.device_id,
                seq=seq,
                rollout_id=rollout_id,
                kind=kind,
                version=req.version,
                payload_sha256=hashlib.sha256(payload).hexdigest(),
                envelope=sign_envelope(payload, DIRECTIVE_PAYLOAD_TYPE, key),
                created_at=issued,
            )
        )
    created = Directive.objects.bulk_create(records, batch_size=1000)
    ids = [d.pk for d in created]
    logger.info("signed and recorded %d %s directives in %.3fs", len(ids), kind, time.perf_counter() - started)
    transaction.on_commit(lambda: directives_publish(directive_ids=ids))
    return {d.device_id: d for d in created}


def _lean_devices(device_ids: list[str]) -> set[str]:
    """The devices that get lean directives (a release_ref instead of the envelope): those whose
    agent advertised "release_ref" (Device.features), while DIRECTIVE_RELEASE_BY_REFERENCE is on."""
    if not settings.DIRECTIVE_RELEASE_BY_REFERENCE or not device_ids:
        return set()
    # Filtered here, not with features__contains: SQLite (make run's database) has no JSON contains.
    rows = Device.objects.filter(pk__in=device_ids).values_list("pk", "features")
    return {pk for pk, features in rows if "release_ref" in (features or [])}


def _artifacts_for(requests: list[DirectiveRequest]) -> dict[tuple[int, str], Artifact]:
    version_ids = {r.version.pk for r in requests}
    return {
        (a.version_id, a.hardware_id): a
        for a in Artifact.objects.filter(version_id__in=version_ids).select_related("version__model")
    }


def directives_publish(*, directive_ids: list[int]) -> int:
    """Publish the given directives (retained, QoS 1, on their model's topic of their device) that
    are not yet marked published.

    Only the newest directive of a (device, model) goes out: a retained message replaces the one
    before it, so publishing a late copy of an older directive (its worker died between commit and
    publish) after a newer one would roll the device's desired state back. Superseded ones are
    marked published without being sent. A withdrawn directive goes out as an empty retained
    message (the topic cleared). Returns how many went out. A broker outage is logged, not raised:
    the rows stay unpublished and the beat tick tries again.
    """
    topics = Topics(settings.MQTT_TOPIC_ROOT)
    published = 0
    started = time.perf_counter()
    for start in range(0, len(directive_ids), PUBLISH_CHUNK):
        chunk = directive_ids[start : start + PUBLISH_CHUNK]
        rows = list(
            Directive.objects.filter(pk__in=chunk, published_at__isnull=True).values_list(
                "pk", "device_id", "version__model__name", "seq", "envelope", "withdrawn_at"
            )
        )
        if not rows:
            continue
        newest = _newest_seqs({(r[1], r[2]) for r in rows})
        sending = [r for r in rows if r[3] >= newest[(r[1], r[2])]]
        messages = [(topics.directive(device_id, model), b"" if withdrawn else encode_json(envelope))
                    for _, device_id, model, _, envelope, withdrawn in sending]
        try:
            mqtt.publish_many(messages, qos=1, retain=True)
        except Exception:  # any transport failure leaves the rows for the tick
            logger.exception("publishing %d directives failed; the beat tick will retry", len(rows))
            return published
        Directive.objects.filter(pk__in=[r[0] for r in rows], published_at__isnull=True).update(
            published_at=timezone.now()
        )
        published += len(sending)
    logger.info("published %d directives in %.3fs", published, time.perf_counter() - started)
    return published


def _newest_seqs(pairs: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """(device, model) -> the highest seq signed for it."""
    rows = (
        Directive.objects.filter(device_id__in={d for d, _ in pairs}, version__model__name__in={m for _, m in pairs})
        .values_list("device_id", "version__model__name")
        .annotate(top=Max("seq"))
        .order_by()
    )
    return {(d, m): top for d, m, top in rows if (d, m) in pairs}


def directives_withdraw(*, device_ids: list[str], model: str) -> None:
    """Take back the newest `model` directive of each of these devices (those that have not
    picked it up): after commit its topic is cleared with an empty retained message, so an
    offline box that reconnects after an abort finds nothing to install. A device that already
    has the message is unaffected (it reports on, and the engine keeps listening). Other models'
    directives are left alone. Marked in the database first, so a broker outage only delays it:
    the beat tick publishes the withdrawal until it sticks."""
    if not device_ids:
        return
    newer = Directive.objects.filter(device_id=OuterRef("device_id"), version__model_id=OuterRef("version__model_id"),
                                     seq__gt=OuterRef("seq"))
    newest = (
        Directive.objects.filter(device_id__in=list(device_ids), version__model__name=model)
        .exclude(Exists(newer))
        .values_list("pk", flat=True)
    )
    ids = list(newest)
    Directive.objects.filter(pk__in=ids).update(withdrawn_at=timezone.now(), published_at=None)
    transaction.on_commit(lambda: directives_publish(directive_ids=ids))


def directives_publish_stale(*, older_than: timedelta = timedelta(seconds=10)) -> int:
    """Publish directives whose publisher died between commit and publish."""
    cutoff = timezone.now() - older_than
    ids = list(
        Directive.objects.filter(published_at__isnull=True, created_at__lt=cutoff)
        .order_by("pk")
        .values_list("pk", flat=True)[:5000]
    )
    if ids:
        logger.warning("re-publishing %d directives that were committed but never published", len(ids))
    return directives_publish(directive_ids=ids) if ids else 0
