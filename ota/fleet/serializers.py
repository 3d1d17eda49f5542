"""Serializers for devices and enrollment (shapes only; rules live in ota.fleet)."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from ota.fleet.parsing import MAX_LABEL_VALUE, MAX_LABELS, validate_labels
from ota.models import ActiveRelease, Device, DeviceEvent, DeviceModelState, EnrollmentToken
from registry.limits import MAX_ENROLLMENT_USES, parse_duration
from registry.parsers import CheckedJSONField


# Keys follow ota.fleet.parsing.LABEL_KEY_RE too, which OpenAPI 3.0 cannot say of object keys.
@extend_schema_field({"type": "object", "maxProperties": MAX_LABELS,
                      "additionalProperties": {"type": "string", "maxLength": MAX_LABEL_VALUE}})
class LabelsField(CheckedJSONField):
    def to_internal_value(self, data):
        try:
            return validate_labels(super().to_internal_value(data))
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from None


class EnrollmentTokenSerializer(serializers.ModelSerializer):
    labels = serializers.JSONField(source="default_labels")

    class Meta:
        model = EnrollmentToken
        fields = ["id", "name", "prefix", "max_uses", "uses", "labels", "expires_at", "revoked_at", "created_at",
                  "created_by"]


class EnrollmentTokenCreateSerializer(serializers.Serializer):
    max_uses = serializers.IntegerField(min_value=1, max_value=MAX_ENROLLMENT_USES)
    expires_in = serializers.CharField(required=False, allow_blank=False, help_text="e.g. 30m, 12h, 1d, 2w")
    labels = LabelsField(required=False, default=dict)
    name = serializers.CharField(required=False, allow_blank=True, max_length=100, default="")

    def validate_expires_in(self, value):
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from None


class EnrollRequestSerializer(serializers.Serializer):
    token = serializers.CharField(required=False, allow_blank=True, default="")
    hardware = serializers.CharField(max_length=64)
    labels = LabelsField(required=False, default=dict)
    name = serializers.CharField(required=False, allow_blank=True, max_length=200, default="")


class ModelStateSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name")
    active_version = serializers.CharField(source="active_version.version", default=None, allow_null=True)

    class Meta:
        model = DeviceModelState
        fields = ["model", "active_version", "active_sha256", "last_state", "last_error_code", "last_seq",
                  "last_rollout_id", "updated_at"]


class ActiveReleaseSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name")
    version = serializers.CharField(source="version.version", default=None, allow_null=True)

    class Meta:
        model = ActiveRelease
        fields = ["model", "version", "sha256", "from_time", "to_time"]


class DeviceEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = DeviceEvent
        fields = ["event_no", "seq", "model", "state", "error_code", "detail", "sha256", "active_sha256",
                  "rollout_id", "health", "received_at"]


class DeviceSerializer(serializers.ModelSerializer):
    hardware = serializers.CharField(source="hardware_id")
    models = ModelStateSerializer(source="model_states", many=True)

    class Meta:
        model = Device
        fields = ["id", "name", "hardware", "labels", "state", "online", "last_seen", "agent_version", "created_at",
                  "revoked_at", "models"]


class DeviceDetailSerializer(DeviceSerializer):
    history = serializers.SerializerMethodField()
    events = serializers.SerializerMethodField()

    class Meta(DeviceSerializer.Meta):
        fields = DeviceSerializer.Meta.fields + ["last_telemetry", "last_telemetry_at", "directive_seq", "trust",
                                                 "history", "events"]

    def get_history(self, device) -> list[dict]:
        rows = device.release_history.select_related("model", "version").order_by("-from_time", "-id")[:200]
        return ActiveReleaseSerializer(rows, many=True).data

    def get_events(self, device) -> list[dict]:
        rows = device.events.order_by("-event_no", "-id")[:100]
        return DeviceEventSerializer(rows, many=True).data


class KeyringSerializer(serializers.Serializer):
    """A stored root-signed keyring (registry.models.Keyring)."""

    version = serializers.IntegerField()
    envelope = serializers.JSONField(help_text="The DSSE envelope the root key signed (agent.trust)")
    expires_at = serializers.DateTimeField()
    created_at = serializers.DateTimeField()
    created_by = serializers.CharField()


class KeyringPushSerializer(serializers.Serializer):
    envelope = CheckedJSONField(help_text="A DSSE envelope of payloadType application/vnd.modelfleet.keyring+json, "
                                          "signed by a root key (`fleetctl keyring sign`)")


class KeyringPushedSerializer(KeyringSerializer):
    published = serializers.BooleanField(help_text="Retained on the broker's keyring topic now")
