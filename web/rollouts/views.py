"""The rollout list and a rollout's page: its live figures (refreshed by htmx) and the buttons of
ota.rollouts.catalogue, run through ota.rollouts.actions as the API runs them."""

from __future__ import annotations

from django.contrib import messages
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect
from django.views.decorators.http import require_GET, require_POST

from ota.models import Rollout
from ota.rollouts.actions import rollout_act
from ota.rollouts.catalogue import ACTION_SCOPES, action_named, actions_available, may_run
from ota.rollouts.selectors import rollout_delivery, rollout_window_wait
from registry.auth import actor_label, scopes_of
from registry.errors import ApiError
from web.pages import is_htmx, page
from web.roles import scope_required
from web.rollouts import queries
from web.rollouts.progress import rollout_counts, summarise


@require_GET
@scope_required("read")
def rollout_list(request):
    rollouts = list(Rollout.objects.select_related("release", "model").order_by("-created_at", "-id")[:200])
    counts = rollout_counts(r.pk for r in rollouts)
    for rollout in rollouts:
        rollout.progress = summarise(counts.get(rollout.pk, {}))
    return page(request, "web/rollouts/list.html", {"rollouts": rollouts}, section="rollouts")


@require_GET
@scope_required("read")
def rollout_detail(request, pk):
    context = rollout_context(request, pk)
    return page(request, "web/rollouts/detail.html", context, section="rollouts")


@require_GET
@scope_required("read")
def rollout_live(request, pk):
    return page(request, "web/rollouts/_live.html", rollout_context(request, pk), section="rollouts")


def _action_scopes(*, action: str, **_kwargs) -> tuple[str, ...]:
    entry = action_named(action)
    return entry.scopes if entry else ACTION_SCOPES


@require_POST
@scope_required(_action_scopes)
def rollout_action(request, pk, action):
    entry = action_named(action)
    if entry is None:
        raise Http404(f"No rollout action '{action}'.")
    get_object_or_404(Rollout, pk=pk)
    reason = request.POST.get("reason", "").strip()[:500]
    try:
        result = rollout_act(action=entry.name, rollout_id=pk, actor=actor_label(request.user), reason=reason)
    except ApiError as exc:
        note = ("error", f"{entry.label} refused: {exc.detail}")
    else:
        done = f"{result} devices queued or sent their directive again." if entry.name == "retry" else f"{entry.label}: done."
        note = ("success", done)
    if is_htmx(request):
        context = rollout_context(request, pk)
        context["note"] = note
        # htmx swaps 2xx only; a refusal is still a full fragment that shows why.
        return page(request, "web/rollouts/_live.html", context, section="rollouts")
    getattr(messages, note[0])(request, note[1])
    return redirect("web:rollout", pk=pk)


def rollout_context(request, pk):
    rollout = get_object_or_404(Rollout.objects.select_related("release", "model"), pk=pk)
    live = queries.rollout_live(rollout)
    scopes = scopes_of(request.user)
    available = actions_available(
        state=rollout.state, requires_approval=rollout.requires_approval, approved=rollout.approved_at is not None
    )
    buttons = [
        {"action": entry.name, "label": entry.label, "css": entry.style,
         "confirm": queries.confirm_text(rollout, entry, live)}
        for entry in available
        if may_run(entry, scopes)
    ]
    return {"rollout": rollout, "live": live, "buttons": buttons, "delivery": rollout_delivery(rollout),
            "window_wait": rollout_window_wait(rollout), "window_waiters": queries.window_waiters(rollout)}
