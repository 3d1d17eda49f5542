"""Revoking a device: API token and broker credentials gone at once, retained directive cleared."""

from __future__ import annotations

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agent.protocol import Topics
from ota.fleet.broker import BrokerError, BrokerUnavailable, broker_device_remove
from ota.models import Device, Directive
from ota.transport.mqtt import MqttError, clear_retained, retained_topics
from registry.audit import audit_record, audit_values


def device_revoke(*, device_id: str, actor: str) -> Device:
    """Revoke at once: API token and broker credentials gone, live session dropped, retained
    directive cleared. Safe to call again (it retries the broker side)."""
    with transaction.atomic():
        device = Device.objects.select_for_update().get(pk=device_id)
        if device.state != Device.State.REVOKED:
            before = audit_values(device, ["state", "revoked_at", "revoked_by", "online"])
            device.state = Device.State.REVOKED
            device.revoked_at = timezone.now()
            device.revoked_by = actor
            device.api_token_hash = None
            device.mqtt_password_hash = ""
            device.online = False
            device.save(
                update_fields=["state", "revoked_at", "revoked_by", "api_token_hash", "mqtt_password_hash", "online"]
            )
            audit_record(actor=actor, action="device.revoke", obj=device, before=before)
        transaction.on_commit(lambda: _revoke_on_broker(device.id))
    return device


def _revoke_on_broker(device_id: str) -> None:
    try:
        broker_device_remove(device_id=device_id)
        # Every model's retained directive goes: the models this server sent directives for,
        # and whatever else the broker holds for the device (a restored broker, an older server).
        topics = Topics(settings.MQTT_TOPIC_ROOT)
        models = Directive.objects.filter(device_id=device_id).values_list("version__model__name", flat=True)
        retained = {topics.directive(device_id, model) for model in models}
        retained.update(retained_topics(topics.directives(device_id)))
        for topic in sorted(retained):
            clear_retained(topic)
    except (BrokerError, MqttError) as exc:
        raise BrokerUnavailable(
            f"Device {device_id} is revoked for the API, but the broker could not be updated ({exc}); "
            "revoke again once the broker is reachable."
        ) from None
