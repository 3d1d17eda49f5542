"""Django admin for rollouts: read-only records, operator actions through ota.rollouts.actions.
Deletes: a finished rollout may be deleted (audited, registry.admin.AuditedAdmin); an open one and
any directive never (see the has_delete_permission methods)."""

from __future__ import annotations

from django.contrib import admin, messages
from django.core.exceptions import ValidationError

from ota.models import Directive, Rollout, RolloutDevice, Wave
from ota.rollouts.actions import rollout_act
from ota.rollouts.catalogue import ACTIONS, RolloutAction, may_run
from registry.admin import AuditedAdmin
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
class RolloutAdmin(AuditedAdmin):
    list_display = ["id", "name", "release", "state", "current_wave", "abort_policy", "created_by", "created_at"]
    list_filter = ["state", "model", "abort_policy"]
    search_fields = ["name", "release__version", "model__name"]
    inlines = [WaveInline]
    actions = [admin_action(entry) for entry in ACTIONS]
    readonly_fields = [f.name for f in Rollout._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False  # definitions go through the API/CLI, where they are validated and planned

    def has_delete_permission(self, request, obj=None) -> bool:
        # An open rollout owns its devices and has directives in flight: deleting it would leave
        # devices mid-update with nothing watching them. Abort it first; a finished one may go
        # (its audit entries stay). A bulk delete checks each selected rollout by this same rule.
        if obj is not None and obj.state in Rollout.OPEN_STATES:
            return False
        return super().has_delete_permission(request, obj)


@admin.register(RolloutDevice)
class RolloutDeviceAdmin(AuditedAdmin):
    list_display = ["rollout", "device", "wave", "state", "seq", "error_code", "directed_at", "finished_at"]
    list_filter = ["state", "rollout"]
    search_fields = ["device__id"]
    readonly_fields = [f.name for f in RolloutDevice._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        # Only along with its finished rollout (the admin asks this for each cascaded row): alone,
        # deleting an assignment would falsify the rollout's counts.
        return obj is not None and obj.rollout.state not in Rollout.OPEN_STATES and super().has_delete_permission(
            request, obj
        )


@admin.register(Directive)
class DirectiveAdmin(AuditedAdmin):
    list_display = ["device", "seq", "kind", "rollout", "version", "created_at", "published_at"]
    list_filter = ["kind"]
    search_fields = ["device__id"]
    readonly_fields = [f.name for f in Directive._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        # Directives are the signed record of what each device was told (and its seq counter's
        # history); superseded ones are pruned by housekeeping only.
        return False
