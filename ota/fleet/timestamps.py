"""Freshness (TUF's timestamp role, agent.trust): a short-lived statement, signed with the rollout
key, of each device's desired state ({model: newest directive seq}), retained on the device's
`timestamp` topic and re-signed by Celery beat (`ota.tasks.timestamps_refresh`) well before it
expires. An agent whose newest valid timestamp grows older than its keys.max_staleness_seconds
reports STALE_DIRECTIVES: a frozen server or a partition shows instead of passing unnoticed.

Only while ROOT_PUBLIC_KEY_PATH is set: devices enrolled without a root check no timestamps.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Max
from django.utils import timezone

from agent.protocol import Topics
from agent.signing import TIMESTAMP_PAYLOAD_TYPE, sign_envelope
from agent.trust import build_timestamp_payload
from ota.fleet.keyring import keyring_republish
from ota.models import Device, Directive
from ota.transport import mqtt
from registry.keyrings import root_public_pems
from registry.keys import load_rollout_key


def desired_seqs() -> dict[str, dict[str, int]]:
    """device id -> {model name: the newest directive seq for it} (every directive ever made)."""
    seqs: dict[str, dict[str, int]] = {}
    rows = Directive.objects.values("device_id", "version__model__name").annotate(seq=Max("seq"))
    for row in rows:
        seqs.setdefault(row["device_id"], {})[row["version__model__name"]] = row["seq"]
    return seqs


def timestamp_messages(*, now: datetime) -> list[tuple[str, bytes]]:
    """One signed timestamp per unrevoked device: (topic, envelope bytes)."""
    key = load_rollout_key()
    topics = Topics(settings.MQTT_TOPIC_ROOT)
    expires = now + timedelta(seconds=settings.TIMESTAMP_VALIDITY_SECONDS)
    seqs = desired_seqs()
    messages = []
    for device_id in Device.objects.filter(revoked_at__isnull=True).values_list("id", flat=True).iterator():
        payload = build_timestamp_payload(device_id=device_id, issued=now, expires=expires,
                                          seqs=seqs.get(device_id, {}))
        envelope = sign_envelope(payload, TIMESTAMP_PAYLOAD_TYPE, key)
        messages.append((topics.timestamp(device_id), json.dumps(envelope).encode("utf-8")))
    return messages


def timestamps_refresh(*, now: datetime | None = None) -> int:
    """Sign and retain every device's timestamp; the number published (0 without a root key). The
    current keyring is retained again first: a broker that lost its retained store (or was down
    when the keyring was pushed) has it back within one refresh."""
    if not root_public_pems():
        return 0
    keyring_republish()
    messages = timestamp_messages(now=now or timezone.now())
    return mqtt.publish_many(messages, retain=True) if messages else 0
