"""Distributing the current root-signed keyring (registry.keyrings) to devices: retained on
`{root}/keyring`, so an agent that connects later still gets it (agent.trust)."""

from __future__ import annotations

import json
import logging

from django.conf import settings

from agent.protocol import Topics
from ota.transport import mqtt
from registry.keyrings import current_keyring, keyring_push
from registry.models import Keyring

log = logging.getLogger(__name__)


def keyring_publish(row: Keyring) -> bool:
    """Retain `row` on the keyring topic; False when the broker cannot be reached (the keyring is
    stored all the same, and `keyring_push_and_publish` or a later push publishes it again)."""
    try:
        mqtt.get_publisher().publish(Topics(settings.MQTT_TOPIC_ROOT).keyring(),
                                     json.dumps(row.envelope).encode("utf-8"), retain=True)
    except (mqtt.MqttError, OSError) as exc:
        log.warning("keyring v%d stored but not published: %s", row.version, exc)
        return False
    return True


def keyring_push_and_publish(*, envelope: object, actor: str) -> tuple[Keyring, bool]:
    """registry.keyrings.keyring_push, then retain it for the devices."""
    row = keyring_push(envelope=envelope, actor=actor)
    return row, keyring_publish(row)


def keyring_republish() -> bool:
    """Retain the current keyring again (after a broker lost its retained store); False when none."""
    row = current_keyring()
    return keyring_publish(row) if row is not None else False
