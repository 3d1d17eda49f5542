"""Django admin for devices, their events and enrollment tokens. Edits and deletes are audited
(registry.admin.AuditedAdmin): a device's labels decide which rollouts target it."""

from django import forms
from django.contrib import admin, messages

from ota.fleet.enrollment import enrollment_token_revoke
from ota.fleet.parsing import validate_labels
from ota.fleet.revocation import device_revoke
from ota.models import ActiveRelease, Device, DeviceEvent, DeviceModelState, EnrollmentToken
from registry.admin import AuditedAdmin
from registry.auth import actor_label
from registry.errors import ApiError
from registry.guards import ADMIN_FORMFIELD_OVERRIDES


class DeviceModelStateInline(admin.TabularInline):
    model = DeviceModelState
    extra = 0
    can_delete = False
    fields = ["model", "active_version", "active_sha256", "last_state", "last_error_code", "last_seq", "updated_at"]
    readonly_fields = fields


class ActiveReleaseInline(admin.TabularInline):
    model = ActiveRelease
    extra = 0
    can_delete = False
    fields = ["model", "version", "sha256", "from_time", "to_time"]
    readonly_fields = fields
    ordering = ["-from_time"]


def labels_clean(value):
    """Labels decide which rollouts target a device: the admin checks them by the rule the API,
    CLI and web UI use (ota.fleet.parsing.validate_labels)."""
    try:
        return validate_labels(value)
    except ValueError as exc:
        raise forms.ValidationError(str(exc)) from None


class DeviceForm(forms.ModelForm):
    class Meta:
        model = Device
        fields = ["name", "labels"]

    def clean_labels(self):
        return labels_clean(self.cleaned_data.get("labels"))


class EnrollmentTokenForm(forms.ModelForm):
    class Meta:
        model = EnrollmentToken
        fields = ["name", "max_uses", "expires_at", "default_labels"]

    def clean_default_labels(self):
        return labels_clean(self.cleaned_data.get("default_labels"))


@admin.register(Device)
class DeviceAdmin(AuditedAdmin):
    form = DeviceForm
    formfield_overrides = ADMIN_FORMFIELD_OVERRIDES
    list_display = ["id", "name", "hardware", "state", "online", "last_seen", "agent_version"]
    list_filter = ["state", "online", "hardware"]
    search_fields = ["id", "name"]
    readonly_fields = [
        "id", "hardware", "state", "created_at", "enrolled_with", "last_seen", "online", "agent_version",
        "last_telemetry", "last_telemetry_at", "directive_seq", "last_event_no", "mqtt_username",
        "api_token_prefix", "revoked_at", "revoked_by",
    ]
    fields = ["name", "labels", *readonly_fields]
    inlines = [DeviceModelStateInline, ActiveReleaseInline]
    actions = ["revoke_devices"]

    def has_add_permission(self, request):
        return False  # devices come from enrollment, which creates their broker credentials

    def has_delete_permission(self, request, obj=None):
        return False  # revoke instead: deleting would leave broker credentials behind

    @admin.action(description="Revoke selected devices (drops broker session, credentials, API token)")
    def revoke_devices(self, request, queryset):
        done = 0
        for device_id in queryset.values_list("id", flat=True):
            try:
                device_revoke(device_id=device_id, actor=actor_label(request.user))
                done += 1
            except ApiError as exc:
                self.message_user(request, str(exc.detail), messages.ERROR)
        self.message_user(request, f"Revoked {done} device(s).", messages.SUCCESS)


@admin.register(DeviceEvent)
class DeviceEventAdmin(AuditedAdmin):
    list_display = ["received_at", "device", "model", "seq", "event_no", "state", "error_code", "rollout_id"]
    list_filter = ["state", "error_code"]
    search_fields = ["device__id", "rollout_id"]
    list_select_related = ["device"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        # Events are the record of what each device did (rollout gates and the device page read
        # them); only housekeeping prunes them, by age, never an admin by hand.
        return False


@admin.register(EnrollmentToken)
class EnrollmentTokenAdmin(AuditedAdmin):
    form = EnrollmentTokenForm
    formfield_overrides = ADMIN_FORMFIELD_OVERRIDES
    list_display = ["id", "prefix", "name", "uses", "max_uses", "expires_at", "revoked_at", "created_by"]
    readonly_fields = ["prefix", "uses", "created_at", "created_by", "revoked_at"]
    fields = ["name", "max_uses", "expires_at", "default_labels", *readonly_fields]
    actions = ["revoke_tokens"]

    def has_add_permission(self, request):
        return False  # the secret is shown once: create with the API or `manage.py enrollment create`

    @admin.action(description="Revoke selected enrollment tokens")
    def revoke_tokens(self, request, queryset):
        for token_id in queryset.values_list("id", flat=True):
            enrollment_token_revoke(token_id=token_id, actor=actor_label(request.user))
        self.message_user(request, "Revoked.", messages.SUCCESS)
