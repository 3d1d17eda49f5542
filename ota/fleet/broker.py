"""Broker credentials through Mosquitto's dynamic-security plugin, driven over MQTT.

Why dynamic security and not password_file + acl_file: deleting or disabling a client here
disconnects its live session at once, and changes need no file on the broker host nor a
SIGHUP. Mosquitto 2.0's plugin has no %u substitution in ACLs, so each device gets its own
role holding literal topics for its own subtree (see deploy/mosquitto/README.md).

The server's service account sends commands to `$CONTROL/dynamic-security/v1` and reads the
answers on `.../response`, matched by correlation data.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import uuid
from dataclasses import dataclass

from django.conf import settings

from agent.protocol import Topics, client_id
from ota.models import Device
from ota.transport.mqtt import BrokerSettings, MqttError, connect_blocking, new_client
from registry.errors import ApiError

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
SERVICE_ROLE = "modelfleet-service"
# Mosquitto's own default for new clients; device passwords are 32 random bytes, so the
# iteration count protects nothing a longer one would, and connect storms stay cheap.
PBKDF2_ITERATIONS = 101


class BrokerError(Exception):
    """The broker refused or did not answer a credential change."""


class BrokerUnavailable(ApiError):
    def __init__(self, message: str):
        super().__init__(message, code="broker_unavailable", status_code=503)


def device_role(device_id: str) -> str:
    return f"device:{device_id}"


def device_trust_acls(device_id: str, topic_root: str) -> list[dict]:
    """The root-signed keyring and this device's signed timestamp (agent.trust): read only."""
    topics = Topics(topic_root)
    return [
        {"acltype": acltype, "topic": topic, "allow": True}
        for topic in (topics.keyring(), topics.timestamp(device_id))
        for acltype in ("subscribeLiteral", "publishClientReceive")
    ]


def device_acls(device_id: str, topic_root: str) -> list[dict]:
    topics = Topics(topic_root)
    acls = [
        # Every model's directive of this device: the agent subscribes to this one filter.
        {"acltype": "subscribeLiteral", "topic": topics.directives(device_id), "allow": True},
        {"acltype": "publishClientReceive", "topic": topics.directives(device_id), "allow": True},
        # The server's ingest status: a new epoch has the agent send recent events again.
        {"acltype": "subscribeLiteral", "topic": topics.ingest_status(), "allow": True},
        {"acltype": "publishClientReceive", "topic": topics.ingest_status(), "allow": True},
        *device_trust_acls(device_id, topic_root),
    ]
    for topic in (topics.events(device_id), topics.telemetry(device_id), topics.presence(device_id)):
        acls.append({"acltype": "publishClientSend", "topic": topic, "allow": True})
    return acls


def service_acls(topic_root: str) -> list[dict]:
    def allow(acltype: str, topic: str) -> dict:
        return {"acltype": acltype, "topic": topic, "allow": True}

    return [
        allow("publishClientSend", f"{topic_root}/devices/+/models/+/directive"),
        allow("publishClientSend", Topics(topic_root).ingest_status()),
        allow("publishClientSend", Topics(topic_root).keyring()),
        allow("publishClientSend", f"{topic_root}/devices/+/timestamp"),
        allow("publishClientReceive", f"{topic_root}/#"),
        allow("subscribePattern", f"{topic_root}/#"),
        # Mosquitto checks a shared subscription against its full "$share/<group>/..." filter.
        allow("subscribePattern", f"$share/+/{topic_root}/#"),
        allow("publishClientSend", "$CONTROL/dynamic-security/#"),
        allow("publishClientReceive", "$CONTROL/dynamic-security/#"),
        allow("subscribePattern", "$CONTROL/dynamic-security/#"),
    ]


def password_entry(password: str) -> dict:
    """The dynsec JSON form of a password: PBKDF2-HMAC-SHA512 over the raw salt, base64'd."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, PBKDF2_ITERATIONS, 64)
    return {
        "password": base64.b64encode(digest).decode("ascii"),
        "salt": base64.b64encode(salt).decode("ascii"),
        "iterations": PBKDF2_ITERATIONS,
    }


def initial_config(*, service_username: str, service_password: str, topic_root: str = "fleet") -> dict:
    """A dynamic-security.json holding only the service account, with every default denied."""
    return {
        "clients": [
            {
                "username": service_username,
                "textName": "modelfleet server (directives, ingest, credential management)",
                **password_entry(service_password),
                "roles": [{"rolename": SERVICE_ROLE}],
            }
        ],
        "roles": [{"rolename": SERVICE_ROLE, "acls": service_acls(topic_root)}],
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
    }


def write_initial_config(path, *, service_username: str, service_password: str, topic_root: str = "fleet") -> None:
    data = initial_config(service_username=service_username, service_password=service_password, topic_root=topic_root)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)


@dataclass
class CommandResult:
    command: str
    error: str | None
    data: dict | None


class BrokerAdmin:
    """A short-lived service-account connection that sends dynsec commands and awaits answers."""

    def __init__(self, broker: BrokerSettings | None = None, *, timeout: float = 10.0):
        self.broker = broker or BrokerSettings.from_settings()
        self.timeout = timeout
        self.client = new_client(self.broker)
        self._cond = threading.Condition()
        self._responses: dict[str, list[dict]] = {}
        self.client.on_message = self._on_message

    def _on_message(self, _client, _userdata, message) -> None:
        try:
            body = json.loads(message.payload)
        except ValueError:
            return
        responses = body.get("responses") or []
        with self._cond:
            for response in responses:
                key = response.get("correlationData")
                if key:
                    self._responses.setdefault(key, []).append(response)
            self._cond.notify_all()

    def __enter__(self) -> BrokerAdmin:
        try:
            connect_blocking(self.client, self.broker, timeout=self.timeout)
        except MqttError as exc:
            raise BrokerError(str(exc)) from None
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.subscribe(RESPONSE_TOPIC, qos=1)
        if not subscribed.wait(self.timeout):
            self.close()
            raise BrokerError("the broker did not confirm the dynamic-security response subscription")
        return self

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __exit__(self, *exc) -> None:
        self.close()

    def execute(self, commands: list[dict]) -> list[CommandResult]:
        """Send commands in one message; return one result per command, in order."""
        batch = uuid.uuid4().hex
        tagged = [{**command, "correlationData": f"{batch}:{i}"} for i, command in enumerate(commands)]
        info = self.client.publish(CONTROL_TOPIC, json.dumps({"commands": tagged}), qos=1)
        info.wait_for_publish(self.timeout)
        wanted = {c["correlationData"] for c in tagged}
        results: dict[str, dict] = {}
        with self._cond:
            ok = self._cond.wait_for(
                lambda: all(k in self._responses for k in wanted), timeout=self.timeout
            )
            for key in wanted:
                if key in self._responses:
                    results[key] = self._responses.pop(key)[0]
        if not ok:
            raise BrokerError(
                f"the broker answered {len(results)} of {len(commands)} dynamic-security commands within "
                f"{self.timeout:.0f}s; is the dynamic-security plugin loaded and the service account allowed "
                f"on {CONTROL_TOPIC}?"
            )
        return [
            CommandResult(command=r.get("command", ""), error=r.get("error"), data=r.get("data"))
            for r in (results[c["correlationData"]] for c in tagged)
        ]

    def check(self, commands: list[dict], *, tolerate: tuple[str, ...] = ()) -> list[CommandResult]:
        results = self.execute(commands)
        for command, result in zip(commands, results):
            if result.error and not any(t in result.error for t in tolerate):
                raise BrokerError(f"broker refused {command['command']}: {result.error}")
        return results

    # --- devices --------------------------------------------------------------------------------

    def device_add(self, *, device_id: str, password: str, topic_root: str) -> None:
        role = device_role(device_id)
        self.check(
            [
                {"command": "createRole", "rolename": role, "acls": device_acls(device_id, topic_root)},
                {
                    "command": "createClient",
                    "username": device_id,
                    "password": password,
                    "clientid": client_id(device_id),
                    "textname": f"device {device_id}",
                    "roles": [{"rolename": role}],
                },
            ]
        )

    def device_remove(self, *, device_id: str) -> None:
        """Delete the client (which disconnects a live session at once) and its role."""
        self.check(
            [
                {"command": "deleteClient", "username": device_id},
                {"command": "deleteRole", "rolename": device_role(device_id)},
            ],
            tolerate=("not found",),
        )

    def device_exists(self, *, device_id: str) -> bool:
        (result,) = self.execute([{"command": "getClient", "username": device_id}])
        return result.error is None


def dynsec_enabled() -> bool:
    return settings.MQTT_BROKER_AUTH == "dynsec"


def broker_service_role_update() -> list[str]:
    """Give the service role every ACL service_acls() names (a broker set up by an older
    version lacks the newer ones); ACLs it has already are left alone. Returns the topics added."""
    if not dynsec_enabled():
        return []
    acls = service_acls(settings.MQTT_TOPIC_ROOT)
    with BrokerAdmin() as admin:
        results = admin.check([{"command": "addRoleACL", "rolename": SERVICE_ROLE, **acl} for acl in acls],
                              tolerate=("already exists",))
    return [acl["topic"] for acl, result in zip(acls, results) if not result.error]


def broker_device_roles_update(*, batch: int = 200) -> int:
    """Give every unrevoked device's role the keyring and timestamp ACLs (device_trust_acls): a
    device enrolled before keyrings lacks them, and would never see a rotation. ACLs a role has
    already are left alone. Returns the number of ACLs added."""
    if not dynsec_enabled():
        return 0
    commands = [
        {"command": "addRoleACL", "rolename": device_role(device_id), **acl}
        for device_id in Device.objects.filter(revoked_at__isnull=True).values_list("id", flat=True)
        for acl in device_trust_acls(device_id, settings.MQTT_TOPIC_ROOT)
    ]
    added = 0
    with BrokerAdmin() as admin:
        for start in range(0, len(commands), batch):
            results = admin.check(commands[start:start + batch], tolerate=("already exists", "not found"))
            added += sum(1 for result in results if not result.error)
    return added


def broker_device_add(*, device_id: str, password: str) -> None:
    if not dynsec_enabled():
        return
    with BrokerAdmin() as admin:
        admin.device_add(device_id=device_id, password=password, topic_root=settings.MQTT_TOPIC_ROOT)


def broker_device_remove(*, device_id: str) -> None:
    if not dynsec_enabled():
        return
    with BrokerAdmin() as admin:
        admin.device_remove(device_id=device_id)
