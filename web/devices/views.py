"""The device list and the device page, and revoking a device (admin). The filter is
ota.fleet.selectors'; revoking is ota.fleet.revocation's, as in the API."""

from __future__ import annotations

from django.contrib import messages
from django.core.paginator import Paginator
from django.shortcuts import get_object_or_404, redirect
from django.views.decorators.http import require_GET, require_POST

from ota.fleet import revocation
from ota.fleet.selectors import devices_filter, devices_with_states
from ota.models import ActiveRelease, Device, DeviceEvent
from registry.audit import audit_entries_for
from registry.auth import actor_label
from registry.errors import ApiError
from web.devices import queries
from web.devices.model_metrics import device_model_metrics
from web.forms import DeviceFilterForm
from web.pages import is_htmx, page
from web.roles import scope_required

DEVICE_PAGE_SIZE = 50


@require_GET
@scope_required("read")
def device_list(request):
    form = DeviceFilterForm(request.GET or None)
    if form.is_bound and not form.is_valid():
        devices = Device.objects.none()  # the errors are shown above an empty table
    else:
        devices = devices_filter(devices_with_states(), **(form.filters() if form.is_bound else {}))
    devices = devices.order_by("id")
    paginator = Paginator(devices, DEVICE_PAGE_SIZE)
    page_obj = paginator.get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    context = {"form": form, "page_obj": page_obj, "query": query.urlencode()}
    template = "web/devices/_table.html" if is_htmx(request) else "web/devices/list.html"
    return page(request, template, context, section="devices")


@require_GET
@scope_required("read")
def device_detail(request, device_id):
    device = get_object_or_404(
        devices_with_states(), pk=device_id
    )
    events = list(DeviceEvent.objects.filter(device=device).order_by("-received_at", "-id")[:100])
    history = list(
        ActiveRelease.objects.filter(device=device).select_related("model", "version").order_by("-from_time")[:50]
    )
    directives = queries.device_directives(device)
    timeline = queries.device_timeline(events=events, history=history, directives=directives)
    context = {
        "device": device,
        "timeline": timeline,
        "history": history,
        "telemetry": queries.telemetry_figures(device),
        "health_chart": queries.device_health_chart(events),
        "model_metrics": device_model_metrics(device, history=history),
        "audit": audit_entries_for(device)[:20],
    }
    return page(request, "web/devices/detail.html", context, section="devices")


@require_POST
@scope_required("admin")
def device_revoke(request, device_id):
    get_object_or_404(Device, pk=device_id)
    try:
        revocation.device_revoke(device_id=device_id, actor=actor_label(request.user))
    except ApiError as exc:
        messages.error(request, str(exc.detail))
    else:
        messages.success(request, f"Device {device_id} revoked: API token and broker credentials removed.")
    return redirect("web:device", device_id=device_id)
