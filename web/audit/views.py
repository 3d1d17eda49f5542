"""The audit log, newest first, filtered by actor, 100 entries a page."""

from __future__ import annotations

from django.core.paginator import Paginator
from django.views.decorators.http import require_GET

from registry.models import AuditEntry
from web.pages import page
from web.roles import scope_required


@require_GET
@scope_required("read")
def audit_log(request):
    entries = AuditEntry.objects.order_by("-created_at", "-id")
    actor = request.GET.get("actor", "")
    if actor:
        entries = entries.filter(actor=actor)
    page_obj = Paginator(entries, 100).get_page(request.GET.get("page"))
    return page(request, "web/audit.html", {"page_obj": page_obj, "actor": actor}, section="audit")
