"""The new-rollout wizard's views: the form, its live target preview (htmx), the review page and
the create. What they show comes from web.rollouts.preview; the create is ota.rollouts.create's."""

from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import HttpResponseNotAllowed
from django.shortcuts import redirect
from django.views.decorators.http import require_GET

from ota.rollouts.catalogue import CREATE_SCOPES
from ota.rollouts.create import rollout_create
from registry.auth import actor_label
from registry.errors import ApiError
from web.forms import WAVE_TEMPLATES, RolloutForm
from web.pages import page
from web.roles import scope_required
from web.rollouts.preview import rollout_dry_run, target_preview


@scope_required(CREATE_SCOPES)
def rollout_new(request):
    """The wizard: one form (release, target with live preview, wave plan, gates), then a review
    page, then create. Every check that decides whether a rollout is valid is ota.rollouts'."""
    if request.method == "GET":
        initial = {"release": request.GET.get("release")} if request.GET.get("release") else {}
        return wizard_page(request, RolloutForm(initial=initial))
    if request.method != "POST":
        return HttpResponseNotAllowed(["GET", "POST"])
    form = RolloutForm(request.POST)
    step = request.POST.get("step", "review")
    if step == "edit" or not form.is_valid():
        return wizard_page(request, form, status=200 if step == "edit" else 400)
    if step == "create":
        try:
            rollout = rollout_create(**form.create_kwargs(), actor=actor_label(request.user))
        except ValidationError as exc:
            form.add_action_errors(exc.message_dict)
        except ApiError as exc:
            form.add_error("target", str(exc.detail))
        else:
            messages.success(request, f"Rollout #{rollout.pk} created. Check it, then start it.")
            return redirect("web:rollout", pk=rollout.pk)
        return wizard_page(request, form, status=400)
    try:
        review = rollout_dry_run(form)
    except ValidationError as exc:
        form.add_action_errors(exc.message_dict)
        return wizard_page(request, form, status=400)
    return page(request, "web/rollouts/review.html", {"form": form, "review": review}, section="rollouts")


def wizard_page(request, form, status=200):
    context = {"form": form, "templates": WAVE_TEMPLATES}
    return page(request, "web/rollouts/wizard.html", context, section="rollouts", status=status)


@require_GET
@scope_required(CREATE_SCOPES)
def rollout_preview(request):
    """htmx: how many devices the target matches, per hardware, and how many cannot take the release."""
    form = RolloutForm(request.GET)
    form.is_valid()  # partial input is normal here; only the target and release fields matter
    preview = target_preview(form)
    return page(request, "web/rollouts/_preview.html", {"preview": preview, "form": form})
