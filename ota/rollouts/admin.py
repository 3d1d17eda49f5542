"""Django admin for rollouts: read-only records, operator actions through ota.rollouts.actions."""

from __future__ import annotations

from django.contrib import admin, messages
from django.core.exceptions import ValidationError

from ota.models import Directive, Rollout, RolloutDevice, Wave
from ota.rollouts.actions import rollout_act
from ota.rollouts.catalogue import ACTIONS, RolloutAction, may_run
from registry.auth import actor_label, scopes_of
from registry.errors import ApiError


class WaveInline(admin.TabularInline):
    model = Wave
    extra = 0
    can_delete = False
    fields = ["index", "spec", "size", "state", "started_at", "gate_met_at", "finished_at"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False


def admin_action(entry: RolloutAction):
    """A Django admin action running one catalogue action on every selected rollout, with the
    catalogue's scope check (the same a browser user meets in the web UI)."""

    def run(modeladmin, request, queryset):
        if not may_run(entry, scopes_of(request.user)):
            modeladmin.message_user(
                request, f"{entry.label} needs the {' or '.join(entry.scopes)} role.", messages.ERROR
            )
            return
        done = 0
        for rollout_id in queryset.values_list("pk", flat=True):
            try:
                rollout_act(action=entry.name, rollout_id=rollout_id, actor=actor_label(request.user),
                            reason=f"{entry.past} from the admin")
                done += 1
            except (ApiError, ValidationError) as exc:
                modeladmin.message_user(request, f"rollout {rollout_id}: {getattr(exc, 'detail', exc)}", messages.ERROR)
        if done:
            modeladmin.message_user(request, f"{entry.label}: done for {done} rollout(s).", messages.SUCCESS)

    run.__name__ = f"{entry.name}_rollouts"
    return admin.action(description=f"{entry.label}: {entry.summary}")(run)


@admin.register(Rollout)
class RolloutAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "release", "state", "current_wave", "abort_policy", "created_by", "created_at"]
    list_filter = ["state", "model", "abort_policy"]
    search_fields = ["name", "release__version", "model__name"]
    inlines = [WaveInline]
    actions = [admin_action(entry) for entry in ACTIONS]
    readonly_fields = [f.name for f in Rollout._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False  # definitions go through the API/CLI, where they are validated and planned


@admin.register(RolloutDevice)
class RolloutDeviceAdmin(admin.ModelAdmin):
    list_display = ["rollout", "device", "wave", "state", "seq", "error_code", "directed_at", "finished_at"]
    list_filter = ["state", "rollout"]
    search_fields = ["device__id"]
    readonly_fields = [f.name for f in RolloutDevice._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(Directive)
class DirectiveAdmin(admin.ModelAdmin):
    list_display = ["device", "seq", "kind", "rollout", "version", "created_at", "published_at"]
    list_filter = ["kind"]
    search_fields = ["device__id"]
    readonly_fields = [f.name for f in Directive._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
