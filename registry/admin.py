"""Django admin for the registry. What was hashed or signed is read-only everywhere, and nothing of
a released version can be changed or deleted here: revocation (a state) goes through the API.

AuditedAdmin is the admin side of the audit log, shared by every app's admin: each add, change
and delete made here writes one audit entry (actor `user:<name>`, the changed fields' before and
after), as the API's and the UI's actions do."""

from __future__ import annotations

import json

from django.contrib import admin, messages
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction

from registry.artifacts import artifact_delete_draft
from registry.audit import audit_record, object_type_of
from registry.auth import actor_label
from registry.errors import ApiError
from registry.guards import ADMIN_FORMFIELD_OVERRIDES
from registry.models import (
    Alias,
    AliasMove,
    ApiToken,
    Artifact,
    AuditEntry,
    HardwareTarget,
    Model,
    ModelVersion,
)
from registry.releases import version_delete_draft
from registry.tokens import tokens_revoke

ARTIFACT_FIELDS = (
    "version",
    "hardware",
    "format",
    "file_name",
    "length",
    "sha256",
    "storage_key",
    "created_at",
)


def audited_values(obj) -> dict:
    """The object's stored fields as JSON values (foreign keys as ids), without secrets' hashes."""
    values = {}
    for f in obj._meta.concrete_fields:
        if f.attname.endswith("_hash"):
            continue
        values[f.attname] = f.value_from_object(obj)
    return json.loads(json.dumps(values, cls=DjangoJSONEncoder))


class AuditedAdmin(admin.ModelAdmin):
    """One audit entry per admin add, change or delete: `<object type>.add|change|delete`, actor
    `user:<name>`, detail `{"via": "admin", "before": {...}, "after": {...}}` holding the changed
    fields only (all fields for an add or a delete). A save that changes nothing writes nothing.
    Admins whose deletes go through an action that audits itself (a draft version's) override
    delete_model/delete_queryset, so such a delete is still recorded once."""

    def save_model(self, request, obj, form, change):
        # The form has already written its values onto obj: the stored row is the "before".
        stored = type(obj)._default_manager.filter(pk=obj.pk).first() if change and obj.pk is not None else None
        before = audited_values(stored) if stored is not None else {}
        super().save_model(request, obj, form, change)
        after = audited_values(obj)
        changed = sorted(k for k in after if k not in before or before[k] != after[k])
        if not changed:
            return
        self.audit(request, obj, "change" if stored is not None else "add",
                   before={k: before[k] for k in changed if k in before}, after={k: after[k] for k in changed})

    def delete_model(self, request, obj):
        with transaction.atomic():
            self.audit(request, obj, "delete", before=audited_values(obj), after={})
            super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        with transaction.atomic():
            for obj in queryset:
                self.audit(request, obj, "delete", before=audited_values(obj), after={})
            super().delete_queryset(request, queryset)

    def audit(self, request, obj, verb: str, *, before: dict, after: dict) -> None:
        audit_record(
            actor=actor_label(request.user),
            action=f"{object_type_of(obj)}.{verb}",
            obj=obj,
            reason=f"{verb} in the Django admin",
            detail={"via": "admin", "before": before, "after": after},
        )


class ReadOnlyAdmin(admin.ModelAdmin):
    """Records that are written only by the registry's functions (alias history, audit)."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(HardwareTarget)
class HardwareTargetAdmin(AuditedAdmin):
    list_display = ("id", "description", "max_artifact_bytes", "created_at")
    search_fields = ("id", "description")

    def get_readonly_fields(self, request, obj=None):
        return ("id", "created_at") if obj else ("created_at",)


@admin.register(Model)
class ModelAdmin(AuditedAdmin):
    formfield_overrides = ADMIN_FORMFIELD_OVERRIDES
    list_display = ("name", "description", "created_at")
    search_fields = ("name", "description")
    readonly_fields = ("created_at",)


class ArtifactInline(admin.TabularInline):
    model = Artifact
    fields = ARTIFACT_FIELDS[1:]
    readonly_fields = ARTIFACT_FIELDS[1:]
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False  # uploads go through the API, which streams, hashes and validates them

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(ModelVersion)
class ModelVersionAdmin(AuditedAdmin):
    formfield_overrides = ADMIN_FORMFIELD_OVERRIDES
    list_display = ("__str__", "counter", "state", "created_at", "released_at", "manifest_sha256")
    list_filter = ("state", "model")
    search_fields = ("model__name", "version", "git_sha", "manifest_sha256")
    inlines = [ArtifactInline]
    # Releases are signed through the API only; the admin can edit descriptive fields of drafts.
    SIGNED = (
        "model",
        "version",
        "counter",
        "rollback_floor",
        "state",
        "health",
        "git_sha",
        "ci_run_url",
        "training_run_id",
        "approver",
        "created_at",
        "created_by",
        "released_at",
        "released_by",
        "expires_at",
        "envelope",
        "manifest_sha256",
    )

    def has_add_permission(self, request):
        return False  # counters are assigned by registry.versions.version_create

    def get_readonly_fields(self, request, obj=None):
        if obj is not None and obj.is_immutable:
            return self.SIGNED + ("metadata", "metrics")
        return self.SIGNED

    def has_delete_permission(self, request, obj=None):
        if obj is not None and obj.is_immutable:
            return False
        return super().has_delete_permission(request, obj)

    def delete_model(self, request, obj):
        version_delete_draft(version=obj, actor=actor_label(request.user))

    def delete_queryset(self, request, queryset):
        for version in queryset:
            try:
                version_delete_draft(version=version, actor=actor_label(request.user))
            except ApiError as exc:
                self.message_user(request, str(exc.detail), messages.ERROR)


@admin.register(Artifact)
class ArtifactAdmin(AuditedAdmin):
    list_display = ("version", "hardware", "format", "file_name", "length", "sha256")
    list_filter = ("format", "hardware")
    search_fields = ("sha256", "version__model__name", "version__version")
    readonly_fields = ARTIFACT_FIELDS

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        # Every field is a hash, size or storage location: nothing here is editable, ever.
        return False

    def has_delete_permission(self, request, obj=None):
        if obj is None:
            return False  # no bulk delete: it would bypass the released-version check
        return not obj.version.is_immutable and super().has_delete_permission(request, obj)

    def delete_model(self, request, obj):
        artifact_delete_draft(artifact=obj, actor=actor_label(request.user))


class AliasMoveInline(admin.TabularInline):
    model = AliasMove
    fk_name = "alias"
    fields = ("from_version", "to_version", "moved_by", "moved_at")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Alias)
class AliasAdmin(ReadOnlyAdmin):
    """Read-only: moves go through the API so that every one is recorded with who and when."""

    list_display = ("__str__", "version", "updated_at", "updated_by")
    inlines = [AliasMoveInline]


@admin.register(AliasMove)
class AliasMoveAdmin(ReadOnlyAdmin):
    list_display = ("alias", "from_version", "to_version", "moved_by", "moved_at")
    list_filter = ("alias__model",)
    date_hierarchy = "moved_at"


@admin.register(ApiToken)
class ApiTokenAdmin(AuditedAdmin):
    list_display = ("name", "scope", "prefix", "created_at", "expires_at", "last_used_at", "revoked_at")
    list_filter = ("scope",)
    readonly_fields = (
        "name",
        "scope",
        "prefix",
        "token_hash",
        "created_at",
        "created_by",
        "expires_at",
        "last_used_at",
        "revoked_at",
    )
    actions = ["revoke_selected"]

    def has_add_permission(self, request):
        return False  # `manage.py tokens create` shows the secret once; the admin cannot

    def has_delete_permission(self, request, obj=None):
        return False  # revoke instead, so the audit trail keeps its actor

    @admin.action(description="Revoke the selected tokens")
    def revoke_selected(self, request, queryset):
        count = tokens_revoke(tokens=queryset, actor=actor_label(request.user))
        self.message_user(request, f"Revoked {count} token(s).")


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "actor", "action", "object_type", "object_id", "reason")
    list_filter = ("action", "object_type")
    search_fields = ("actor", "object_id", "reason")
    date_hierarchy = "created_at"
