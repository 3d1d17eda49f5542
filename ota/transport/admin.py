"""Django admin: the dead-letter table, read-only (ingest writes it; nothing is edited here)."""

from django.contrib import admin
from django.utils.text import Truncator

from ota.models import DeadLetter
from registry.admin import AuditedAdmin


def payload_text(row: DeadLetter) -> str:
    """The raw payload as text: UTF-8 where it is, every other byte (and NUL) as an escape."""
    raw = bytes(row.payload or b"")
    return raw.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")


@admin.register(DeadLetter)
class DeadLetterAdmin(AuditedAdmin):  # read-only; audited should that change
    list_display = ["received_at", "device_id", "kind", "outcome", "short_error", "payload_size", "retained"]
    list_filter = ["outcome", "kind", "retained"]
    search_fields = ["device_id", "topic", "error"]
    date_hierarchy = "received_at"
    fields = ["received_at", "topic", "kind", "device_id", "retained", "outcome", "error", "payload_size", "payload_as_text"]
    readonly_fields = fields

    @admin.display(description="error")
    def short_error(self, row: DeadLetter) -> str:
        return Truncator(row.error).chars(120)

    @admin.display(description="payload (NUL and non-UTF-8 bytes escaped)")
    def payload_as_text(self, row: DeadLetter) -> str:
        return payload_text(row)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
