"""Django admin for rollouts: read-only records, operator actions through ota.rollouts.actions."""

from __future__ import annotations

from django.contrib import admin, messages
from django.core.exceptions import ValidationError

from ota.models import Directive, Rollout, RolloutDevice, Wave
from ota.rollouts import actions
from registry.auth import actor_label
from registry.errors import ApiError


class WaveInline(admin.TabularInline):
    model = Wave
    extra = 0
    can_delete = False
    fields = ["index", "spec", "size", "state", "started_at", "gate_met_at", "finished_at"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False


def _run(modeladmin, request, queryset, func, verb: str, **kwargs) -> None:
    done = 0
    for rollout in queryset:
        try:
            func(rollout_id=rollout.pk, actor=actor_label(request.user), **kwargs)
            done += 1
        except (ApiError, ValidationError) as exc:
            modeladmin.message_user(request, f"rollout {rollout.pk}: {getattr(exc, 'detail', exc)}", messages.ERROR)
    if done:
        modeladmin.message_user(request, f"{verb} {done} rollout(s).", messages.SUCCESS)


@admin.action(description="Start (or approve then start) selected rollouts")
def start_rollouts(modeladmin, request, queryset):
    _run(modeladmin, request, queryset, actions.rollout_start, "Started")


@admin.action(description="Pause selected rollouts")
def pause_rollouts(modeladmin, request, queryset):
    _run(modeladmin, request, queryset, actions.rollout_pause, "Paused", reason="paused from the admin")


@admin.action(description="Resume selected rollouts")
def resume_rollouts(modeladmin, request, queryset):
    _run(modeladmin, request, queryset, actions.rollout_resume, "Resumed")


@admin.action(description="Abort selected rollouts")
def abort_rollouts(modeladmin, request, queryset):
    _run(modeladmin, request, queryset, actions.rollout_abort, "Aborted", reason="aborted from the admin")


@admin.action(description="Roll back selected rollouts (devices to their previous release)")
def rollback_rollouts(modeladmin, request, queryset):
    _run(modeladmin, request, queryset, actions.rollout_rollback, "Rolled back", reason="rolled back from the admin")


@admin.register(Rollout)
class RolloutAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "release", "state", "current_wave", "abort_policy", "created_by", "created_at"]
    list_filter = ["state", "model", "abort_policy"]
    search_fields = ["name", "release__version", "model__name"]
    inlines = [WaveInline]
    actions = [start_rollouts, pause_rollouts, resume_rollouts, abort_rollouts, rollback_rollouts]
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
