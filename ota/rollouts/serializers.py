"""Rollout API shapes. The top-level fields are checked here; the nested definition (target,
waves, gates) is checked by ota.rollouts.definition so the API, the admin and the CLI get the same messages."""

from __future__ import annotations

from rest_framework import serializers

from ota.models import Rollout, RolloutDevice
from ota.rollouts.selectors import rollout_summary
from registry.models import AuditEntry
from registry.parsers import CheckedJSONField


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
            "started_by", "finished_at", "reverted_at",
        ]


class RolloutDetailSerializer(RolloutSerializer):
    class Meta(RolloutSerializer.Meta):
        fields = RolloutSerializer.Meta.fields + ["target", "gates", "incompatible"]

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
            "finished_at", "revert_directed_at", "reverted_at", "delivery", "bytes_downloaded",
        ]


class AuditEntrySerializer(serializers.ModelSerializer):
    class Meta:
        model = AuditEntry
        fields = ["id", "created_at", "actor", "action", "object_type", "object_id", "reason", "detail"]
