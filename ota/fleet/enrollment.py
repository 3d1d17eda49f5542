"""Enrollment: one-time enrollment tokens, and a device created with its broker credentials and
API token in one step. Views, commands and the simulator call these; they never touch the
models' credentials directly."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from ota.fleet.broker import BrokerError, BrokerUnavailable, broker_device_add
from ota.fleet.parsing import validate_labels
from ota.models import Device, EnrollmentToken, hash_secret
from registry.audit import audit_record, audit_values
from registry.errors import ApiError
from registry.keyrings import root_public_pems
from registry.keys import public_key_info, public_keys, release_threshold, require_enough_release_keys
from registry.models import HardwareTarget


class EnrollmentRefused(ApiError):
    pass


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
    audit_record(
        actor=created_by,
        action="enrollment_token.create",
        obj=token,
        detail={"max_uses": max_uses, "expires_at": token.expires_at.isoformat() if token.expires_at else None,
                "labels": labels, "prefix": token.prefix},
    )
    return token, secret


def enrollment_token_revoke(*, token_id: int, actor: str) -> EnrollmentToken:
    token = EnrollmentToken.objects.get(pk=token_id)
    if token.revoked_at is None:
        before = audit_values(token, ["revoked_at"])
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
        audit_record(actor=actor, action="enrollment_token.revoke", obj=token, before=before)
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


@dataclass(frozen=True)
class Enrollment:
    """What a freshly enrolled device needs; the secrets exist only here, never in the database."""

    device: Device
    mqtt_password: str
    api_token: str

    def agent_settings(self) -> dict:
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
                "release": [info.public_key_pem for info in require_enough_release_keys()],
                "rollout": [public_key_info("rollout").public_key_pem],
                "release_threshold": release_threshold(),
                # The offline root's public keys (registry.keyrings): the agent takes later keyrings
                # it signed, so keys rotate without re-enrollment. Left out when none is configured.
                **({"root": root} if (root := root_public_pems()) else {}),
            },
        }


def _new_device_id() -> str:
    return "dev-" + secrets.token_hex(8)


def device_enroll(*, token_secret: str, hardware: str, labels: dict | None = None, name: str = "") -> Enrollment:
    """Create a device with broker credentials and an API token, consuming one token use.

    The broker registration runs inside the transaction on purpose: a device whose broker
    credentials could not be created must not exist, and the token use is given back.
    """
    try:
        labels = validate_labels(labels or {})
    except ValueError as exc:
        raise EnrollmentRefused(str(exc), code="invalid_labels") from None
    if not isinstance(name, str) or len(name) > 200:
        raise EnrollmentRefused("name must be a string of at most 200 characters", code="invalid_name")
    if not isinstance(hardware, str) or not hardware:
        raise EnrollmentRefused("hardware is required (a hardware target id)", code="hardware_required")
    # Refuse before consuming a use if the server cannot hand out its keys.
    public_keys()
    require_enough_release_keys()
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
        audit_record(
            actor=f"enrollment:{token.prefix}",
            action="device.enroll",
            obj=device,
            detail={"hardware": hardware, "labels": device.labels, "token_id": token.pk},
        )
        try:
            broker_device_add(device_id=device.id, password=mqtt_password)
        except BrokerError as exc:
            raise BrokerUnavailable(f"Could not register the device with the MQTT broker: {exc}") from None
    return Enrollment(device=device, mqtt_password=mqtt_password, api_token=api_token)
