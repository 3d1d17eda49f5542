"""The overview page: the fleet by version and by hardware, the automatic decisions worth an
operator's eye, the open rollouts."""

from __future__ import annotations

from django.views.decorators.http import require_GET

from registry.audit import SYSTEM
from registry.models import AuditEntry
from web.overview import queries
from web.pages import page
from web.roles import scope_required


def chart(chart_type: str, labels, datasets, **extra) -> dict:
    return {"type": chart_type, "data": {"labels": list(labels), "datasets": datasets}, **extra}


@require_GET
@scope_required("read")
def overview(request):
    fleet = queries.fleet_counts()
    by_version = fleet["by_version"]
    version_chart = chart(
        "bar",
        [f"{row['model__name']}@{row['active_version__version'] or 'none'}" for row in by_version],
        [{"label": "devices", "data": [row["total"] for row in by_version]}],
        legend=False,
        options={"indexAxis": "y"},
    )
    hardware_chart = chart(
        "bar",
        [row["hardware_id"] for row in fleet["by_hardware"]],
        [
            {"label": "online", "data": [row["online"] for row in fleet["by_hardware"]], "color": "#1f8a4c"},
            {
                "label": "offline",
                "data": [row["total"] - row["online"] for row in fleet["by_hardware"]],
                "color": "#a0aec0",
            },
        ],
        options={"scales": {"x": {"stacked": True}, "y": {"stacked": True}}},
    )
    # Automatic decisions worth an operator's eye; a wave merely starting is routine.
    decisions = AuditEntry.objects.filter(actor=SYSTEM).exclude(action="wave.start").order_by("-created_at", "-id")[:15]
    context = {
        "fleet": fleet,
        "version_chart": version_chart,
        "hardware_chart": hardware_chart,
        "decisions": decisions,
        "rollouts": queries.running_rollouts(),
    }
    return page(request, "web/overview.html", context, section="overview")
