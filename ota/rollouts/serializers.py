"""Rollout API shapes. The top-level fields are checked here; the nested definition (target,
waves, gates) is checked by ota.rollouts.definition so the API, the admin and the CLI get the same messages."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from agent.windows import MAX_WINDOW_CHARS, MAX_WINDOWS
from ota.models import Rollout, RolloutDevice
from ota.rollouts.definition import MAX_LABEL_WINDOW_GROUPS
from ota.rollouts.selectors import rollout_summary
from registry.models import AuditEntry
from registry.parsers import CheckedJSONField


_WINDOWS_SCHEMA = {
    "type": "array", "maxItems": MAX_WINDOWS,
    "items": {"type": "string", "maxLength": MAX_WINDOW_CHARS},
    "description": "Maintenance windows: [DAYS] HH:MM-HH:MM [ZONE] in the device's local time or an IANA zone, "
    "e.g. 'Mon-Fri 02:00-04:00 Europe/Berlin'. A device activates the release only while one is open "
    "(it downloads, verifies and prechecks at once). Empty: activate at once.",
    "example": ["Mon-Fri 02:00-04:00 Europe/Berlin"],
}


@extend_schema_field(_WINDOWS_SCHEMA)
class WindowsField(CheckedJSONField):
    """Checked by ota.rollouts.definition.windows_validate (the agent's own parser)."""


@extend_schema_field({
    "type": "array", "maxItems": MAX_LABEL_WINDOW_GROUPS,
    "items": {"type": "object", "required": ["labels", "windows"], "properties": {
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "windows": _WINDOWS_SCHEMA,
    }},
    "description": "Per label group: a device whose labels include all of a group's labels (the first such "
    "group) gets that group's windows instead of `windows`.",
})
class LabelWindowsField(CheckedJSONField):
    """Checked by ota.rollouts.definition.label_windows_validate."""


class RolloutCreateSerializer(serializers.Serializer):
    model = serializers.CharField(max_length=64)
    version = serializers.CharField(max_length=64)
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    target = CheckedJSONField()
    waves = CheckedJSONField()
    gates = CheckedJSONField(required=False, default=dict)
    abort_policy = serializers.ChoiceField(choices=Rollout.AbortPolicy.choices, default=Rollout.AbortPolicy.PAUSE)
    requires_approval = serializers.BooleanField(default=False)
    follow_target = serializers.BooleanField(
        default=False, help_text="after the last wave, keep taking in devices that start matching the target"
    )
    windows = WindowsField(required=False, default=list)
    label_windows = LabelWindowsField(required=False, default=list)
    start_at = serializers.DateTimeField(
        required=False, allow_null=True, default=None,
        help_text="RFC 3339, in the future (at most 90 days): starting the rollout before then schedules it "
        "(state scheduled) and the engine starts it at this time",
    )


class RolloutReasonSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=2000, required=False, allow_blank=True, default="")


class RolloutSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name")
    version = serializers.CharField(source="release.version")

    class Meta:
        model = Rollout
        fields = [
            "id", "name", "model", "version", "state", "state_reason", "abort_policy", "requires_approval", "follow_target",
            "current_wave", "created_at", "created_by", "approved_at", "approved_by", "started_at",
            "started_by", "finished_at", "reverted_at", "start_at",
        ]


class DeliverySerializer(serializers.Serializer):
    delta_devices = serializers.IntegerField(help_text="devices that said they installed from a delta")
    full_devices = serializers.IntegerField(help_text="devices that said they downloaded the full artifact")
    bytes_downloaded = serializers.IntegerField(help_text="bytes those devices fetched")
    bytes_saved = serializers.IntegerField(help_text="full artifact lengths of the delta devices less what they fetched")


class WindowWaitSerializer(serializers.Serializer):
    devices = serializers.IntegerField(help_text="devices downloaded and waiting for a maintenance window")
    next_opening = serializers.DateTimeField(allow_null=True, help_text="the earliest opening they reported")
    last_opening = serializers.DateTimeField(allow_null=True, help_text="the latest opening they reported")


class RolloutDetailSerializer(RolloutSerializer):
    # Filled in by to_representation from rollout_summary (one pass over the assignments for all
    # its figures); declared here so that the OpenAPI schema documents them.
    delivery = serializers.SerializerMethodField()
    waiting_for_window = serializers.SerializerMethodField()

    class Meta(RolloutSerializer.Meta):
        fields = RolloutSerializer.Meta.fields + ["target", "gates", "incompatible", "windows", "label_windows",
                                                  "delivery", "waiting_for_window"]

    @extend_schema_field(DeliverySerializer)
    def get_delivery(self, obj):
        return None  # rollout_summary's

    @extend_schema_field(WindowWaitSerializer)
    def get_waiting_for_window(self, obj):
        return None  # rollout_summary's

    def to_representation(self, instance):
        data = super().to_representation(instance)
        data.update(rollout_summary(instance))
        return data


class RolloutDeviceSerializer(serializers.ModelSerializer):
    wave = serializers.IntegerField(source="wave.index")
    previous_version = serializers.CharField(source="previous_version.version", default=None, allow_null=True)

    class Meta:
        model = RolloutDevice
        fields = [
            "device", "wave", "rank", "state", "seq", "revert_seq", "previous_version", "previous_sha256",
            "error_code", "detail", "attempts", "queued_at", "directed_at", "received_at",
            "download_started_at", "verify_started_at", "activate_started_at", "trial_started_at",
            "finished_at", "revert_directed_at", "reverted_at", "delivery", "bytes_downloaded", "window_opens_at",
        ]


class AuditEntrySerializer(serializers.ModelSerializer):
    class Meta:
        model = AuditEntry
        fields = ["id", "created_at", "actor", "action", "object_type", "object_id", "reason", "detail"]
