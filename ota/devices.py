"""Business logic for devices: enrollment tokens, enrollment, revocation, label parsing.

Views, commands and the simulator call these; they never touch the models' credentials
directly.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from agent.protocol import Topics
from ota.broker import BrokerError, broker_device_add, broker_device_remove
from ota.models import Device, EnrollmentToken, hash_secret
from registry.errors import ApiError
from registry.models import AuditEntry, HardwareTarget

LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
MAX_LABELS = 32
MAX_LABEL_VALUE = 128
_DURATION_RE = re.compile(r"^(\d+)([smhdw])$")
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class EnrollmentRefused(ApiError):
    pass


class BrokerUnavailable(ApiError):
    def __init__(self, message: str):
        super().__init__(message, code="broker_unavailable", status_code=503)


# --- parsing helpers (shared by API, CLI and simulator) ---------------------------------------


def parse_duration(text: str) -> timedelta:
    """'90s', '30m', '12h', '1d', '2w' -> timedelta; ValueError with the accepted forms otherwise."""
    match = _DURATION_RE.match(str(text).strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration; use a positive number with s, m, h, d or w (e.g. 1d, 12h)")
    return timedelta(**{_DURATION_UNITS[match.group(2)]: int(match.group(1))})


def parse_label_pairs(pairs: list[str] | None) -> dict[str, str]:
    """['site=eu', 'tier=gold'] -> {'site': 'eu', 'tier': 'gold'}; ValueError names the bad pair."""
    labels: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"label {pair!r} must look like key=value")
        labels[key.strip()] = value.strip()
    return validate_labels(labels)


def validate_labels(labels: object) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise ValueError("labels must be an object of string keys to string values")
    if len(labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels are allowed, got {len(labels)}")
    for key, value in labels.items():
        if not isinstance(key, str) or not LABEL_KEY_RE.match(key):
            raise ValueError(
                f"label key {key!r} must be 1-63 letters, digits, '.', '_', '/' or '-', starting with a letter or digit"
            )
        if not isinstance(value, str):
            raise ValueError(f"label {key!r} must have a string value, got {type(value).__name__}")
        if len(value) > MAX_LABEL_VALUE:
            raise ValueError(f"label {key!r} value is longer than {MAX_LABEL_VALUE} characters")
    return dict(labels)


# --- enrollment tokens ------------------------------------------------------------------------


def enrollment_token_create(
    *,
    max_uses: int,
    expires_in: timedelta | None = None,
    labels: dict[str, str] | None = None,
    name: str = "",
    created_by: str = "system",
) -> tuple[EnrollmentToken, str]:
    """Create a token; returns (row, secret). Only the secret's hash is stored."""
    if max_uses < 1:
        raise ValueError("max_uses must be at least 1")
    labels = validate_labels(labels or {})
    secret = EnrollmentToken.new_secret()
    token = EnrollmentToken.objects.create(
        name=name,
        prefix=secret[:10],
        token_hash=hash_secret(secret),
        created_by=created_by,
        expires_at=timezone.now() + expires_in if expires_in else None,
        max_uses=max_uses,
        default_labels=labels,
    )
    AuditEntry.objects.create(
        actor=created_by,
        action="enrollment_token.create",
        object_type="enrollment_token",
        object_id=str(token.pk),
        detail={"max_uses": max_uses, "expires_at": token.expires_at.isoformat() if token.expires_at else None,
                "labels": labels, "prefix": token.prefix},
    )
    return token, secret


def enrollment_token_revoke(*, token_id: int, actor: str) -> EnrollmentToken:
    token = EnrollmentToken.objects.get(pk=token_id)
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
        AuditEntry.objects.create(
            actor=actor, action="enrollment_token.revoke", object_type="enrollment_token", object_id=str(token.pk)
        )
    return token


def _claim_token(secret: str) -> EnrollmentToken:
    if not secret:
        raise EnrollmentRefused(
            "An enrollment token is required (body field 'token' or 'Authorization: Bearer <token>').",
            code="enrollment_token_required",
            status_code=401,
        )
    token = EnrollmentToken.objects.filter(token_hash=hash_secret(secret)).first()
    if token is None:
        raise EnrollmentRefused("Unknown enrollment token.", code="enrollment_token_invalid", status_code=401)
    now = timezone.now()
    if token.revoked_at is not None:
        raise EnrollmentRefused(
            f"Enrollment token {token.prefix}… was revoked at {token.revoked_at:%Y-%m-%d %H:%M:%S}Z.",
            code="enrollment_token_revoked",
            status_code=403,
        )
    if token.expires_at is not None and token.expires_at <= now:
        raise EnrollmentRefused(
            f"Enrollment token {token.prefix}… expired at {token.expires_at:%Y-%m-%d %H:%M:%S}Z.",
            code="enrollment_token_expired",
            status_code=403,
        )
    # The conditional UPDATE is the real check: two devices racing for the last use cannot both win.
    claimed = (
        EnrollmentToken.objects.filter(pk=token.pk, uses__lt=F("max_uses"), revoked_at__isnull=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .update(uses=F("uses") + 1)
    )
    if not claimed:
        raise EnrollmentRefused(
            f"Enrollment token {token.prefix}… has been used {token.max_uses} of {token.max_uses} times.",
            code="enrollment_token_used_up",
            status_code=403,
        )
    token.refresh_from_db()
    return token


# --- enrollment -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Enrollment:
    """What a freshly enrolled device needs; the secrets exist only here, never in the database."""

    device: Device
    mqtt_password: str
    api_token: str

    def agent_settings(self) -> dict:
        from registry.keys import public_key_info

        return {
            "device_id": self.device.id,
            "name": self.device.name,
            "hardware": self.device.hardware_id,
            "labels": self.device.labels,
            "mqtt": {
                "host": settings.MQTT_PUBLIC_HOST,
                "port": settings.MQTT_PUBLIC_PORT,
                "username": self.device.mqtt_username,
                "password": self.mqtt_password,
                "tls": settings.MQTT_PUBLIC_TLS,
                "topic_root": settings.MQTT_TOPIC_ROOT,
                "keepalive": 30,
            },
            "server": {"url": settings.PUBLIC_URL, "token": self.api_token},
            "keys": {
                "release": [public_key_info("release").public_key_pem],
                "rollout": [public_key_info("rollout").public_key_pem],
            },
        }


def _new_device_id() -> str:
    return "dev-" + secrets.token_hex(8)


def device_enroll(*, token_secret: str, hardware: str, labels: dict | None = None, name: str = "") -> Enrollment:
    """Create a device with broker credentials and an API token, consuming one token use.

    The broker registration runs inside the transaction on purpose: a device whose broker
    credentials could not be created must not exist, and the token use is given back.
    """
    from registry.keys import public_keys

    try:
        labels = validate_labels(labels or {})
    except ValueError as exc:
        raise EnrollmentRefused(str(exc), code="invalid_labels") from None
    if not isinstance(name, str) or len(name) > 200:
        raise EnrollmentRefused("name must be a string of at most 200 characters", code="invalid_name")
    if not isinstance(hardware, str) or not hardware:
        raise EnrollmentRefused("hardware is required (a hardware target id)", code="hardware_required")
    public_keys()  # refuse before consuming a use if the server cannot hand out its keys
    with transaction.atomic():
        token = _claim_token(token_secret)
        target = HardwareTarget.objects.filter(pk=hardware).first()
        if target is None:
            known = ", ".join(HardwareTarget.objects.order_by("id").values_list("id", flat=True)[:20]) or "none"
            raise EnrollmentRefused(
                f"Unknown hardware {hardware!r}; known hardware targets: {known}.", code="unknown_hardware"
            )
        mqtt_password = secrets.token_urlsafe(24)
        api_token = Device.new_api_token()
        for _attempt in range(3):
            device_id = _new_device_id()
            try:
                with transaction.atomic():
                    device = Device.objects.create(
                        id=device_id,
                        name=name or device_id,
                        hardware=target,
                        labels={**token.default_labels, **labels},
                        enrolled_with=token,
                        mqtt_username=device_id,
                        mqtt_password_hash=hash_secret(mqtt_password),
                        api_token_prefix=api_token[:10],
                        api_token_hash=hash_secret(api_token),
                    )
                break
            except IntegrityError:
                continue
        else:  # pragma: no cover - 64 random bits colliding three times
            raise EnrollmentRefused("Could not allocate a device id; retry.", code="conflict", status_code=409)
        AuditEntry.objects.create(
            actor=f"enrollment:{token.prefix}",
            action="device.enroll",
            object_type="device",
            object_id=device.id,
            detail={"hardware": hardware, "labels": device.labels, "token_id": token.pk},
        )
        try:
            broker_device_add(device_id=device.id, password=mqtt_password)
        except BrokerError as exc:
            raise BrokerUnavailable(f"Could not register the device with the MQTT broker: {exc}") from None
    return Enrollment(device=device, mqtt_password=mqtt_password, api_token=api_token)


# --- revocation -------------------------------------------------------------------------------


def device_revoke(*, device_id: str, actor: str) -> Device:
    """Revoke at once: API token and broker credentials gone, live session dropped, retained
    directive cleared. Safe to call again (it retries the broker side)."""
    with transaction.atomic():
        device = Device.objects.select_for_update().get(pk=device_id)
        if device.state != Device.State.REVOKED:
            device.state = Device.State.REVOKED
            device.revoked_at = timezone.now()
            device.revoked_by = actor
            device.api_token_hash = None
            device.mqtt_password_hash = ""
            device.online = False
            device.save(
                update_fields=["state", "revoked_at", "revoked_by", "api_token_hash", "mqtt_password_hash", "online"]
            )
            AuditEntry.objects.create(actor=actor, action="device.revoke", object_type="device", object_id=device.id)
        transaction.on_commit(lambda: _revoke_on_broker(device.id))
    return device


def _revoke_on_broker(device_id: str) -> None:
    from ota.mqtt import MqttError, clear_retained

    try:
        broker_device_remove(device_id=device_id)
        clear_retained(Topics(settings.MQTT_TOPIC_ROOT).directive(device_id))
    except (BrokerError, MqttError) as exc:
        raise BrokerUnavailable(
            f"Device {device_id} is revoked for the API, but the broker could not be updated ({exc}); "
            "revoke again once the broker is reachable."
        ) from None
