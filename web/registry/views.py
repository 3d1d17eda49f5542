"""The registry pages: models, a model's versions and aliases, a version. Releasing, deprecating,
revoking and moving an alias go through registry (releases, aliases), as the API does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlencode

from django.contrib import messages
from django.db.models import Count, Prefetch
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from ota.models import Device, Rollout
from registry import aliases as registry_aliases
from registry import releases as registry_releases
from registry import views as registry_views
from registry.audit import audit_entries_for
from registry.auth import actor_label, scopes_of
from registry.errors import ApiError
from registry.models import Alias, AliasMove, Model, ModelVersion
from registry.validity import expires_soon, release_refusal
from web.forms import AliasMoveForm
from web.pages import page
from web.registry import queries
from web.roles import scope_required


@require_GET
@scope_required("read")
def model_list(request):
    models = Model.objects.annotate(version_count=Count("versions")).prefetch_related(
        Prefetch("aliases", queryset=Alias.objects.select_related("version"))
    )
    return page(request, "web/registry/models.html", {"models": models}, section="registry")


@require_GET
@scope_required("read")
def model_detail(request, name):
    return model_page(request, name)


def model_page(request, name, *, alias_form=None, status=200):
    model = get_object_or_404(Model, name=name)
    versions = model.versions.annotate(artifact_count=Count("artifacts")).order_by("-counter")
    aliases = model.aliases.select_related("version").order_by("name")
    moves = (
        AliasMove.objects.filter(alias__model=model)
        .select_related("alias", "from_version", "to_version")
        .order_by("-moved_at", "-id")[:50]
    )
    context = {"model": model, "versions": versions, "aliases": aliases, "moves": moves}
    context["alias_form"] = alias_form or AliasMoveForm(model=model)
    return page(request, "web/registry/model.html", context, section="registry", status=status)


@dataclass(frozen=True)
class VersionChange:
    """A button on the version page that moves the version to another state through registry.releases."""

    name: str
    label: str
    css: str
    states: tuple[str, ...]  # the states it is offered in (registry.releases refuses the others anyway)
    change: Callable
    scope: str | tuple[str, ...]
    confirm: str
    done: str


# The scope is the API endpoint's own (registry.views: write_scope, admin), read from there so
# the buttons, the server-side check here and the API never disagree.
VERSION_CHANGES = {
    "deprecate": VersionChange(
        name="deprecate", label="Deprecate", css="warn", states=(ModelVersion.State.RELEASED,),
        change=registry_releases.version_deprecate, scope=registry_views.VersionDeprecate.write_scope,
        confirm="Deprecate {release}? No new rollout can use it. Aliases pointing at it stay, its artifacts "
        "stay downloadable and the {running} device(s) running it keep it. This cannot be undone.",
        done="Deprecated {release}.",
    ),
    "revoke": VersionChange(
        name="revoke", label="Revoke", css="danger",
        states=(ModelVersion.State.DRAFT, ModelVersion.State.RELEASED, ModelVersion.State.DEPRECATED),
        change=registry_releases.version_revoke, scope=registry_views.VersionRevoke.write_scope,
        confirm="Revoke {release}? Its artifacts can no longer be downloaded (410) and no rollout or alias "
        "move can use it; the {running} device(s) running it keep it until another release reaches them.{open} "
        "This cannot be undone.",
        done="Revoked {release}: its artifacts can no longer be downloaded.",
    ),
}


@require_GET
@scope_required("read")
def version_detail(request, name, version):
    mv = get_object_or_404(ModelVersion.objects.select_related("model"), model__name=name, version=version)
    artifacts = mv.artifacts.select_related("hardware").order_by("hardware_id")
    signatures = (mv.envelope or {}).get("signatures", [])
    rollouts = queries.version_rollouts(mv)
    running = queries.version_running_on(mv)
    open_rollouts = [r for r in rollouts if r.state in Rollout.OPEN_STATES]
    scopes = scopes_of(request.user)
    figures = {
        "release": str(mv),
        "running": running,
        "open": (
            f" Open rollout(s) of it ({', '.join(f'#{r.pk}' for r in open_rollouts)}) are not stopped: "
            "their devices will fail to download it."
            if open_rollouts else ""
        ),
    }
    buttons = [
        {"action": c.name, "label": c.label, "css": c.css, "confirm": c.confirm.format(**figures),
         "url": reverse(f"web:version_{c.name}", args=[name, version])}
        for c in VERSION_CHANGES.values()
        if mv.state in c.states and set((c.scope,) if isinstance(c.scope, str) else c.scope) & scopes
    ]
    context = {
        "mv": mv,
        "artifacts": artifacts,
        "signatures": signatures,
        "health": queries.health_summary(mv.health),
        "metadata": queries.json_rows(mv.metadata),
        "metrics": queries.json_rows(mv.metrics),
        "rollouts": rollouts,
        "failed_rollouts": [r for r in rollouts if r.failure],
        "device_failures": sum(r.groups["failed"] for r in rollouts),
        "running": running,
        "running_query": urlencode({"version": f"{name}@{version}", "state": Device.State.ACTIVE}),
        "buttons": buttons,
        "audit": audit_entries_for(mv)[:20],
        # The rule rollout create/start/revert apply (registry.validity), shown before it bites.
        "refusal": release_refusal(mv) if mv.envelope else None,
        "expires_soon": expires_soon(mv),
    }
    return page(request, "web/registry/version.html", context, section="registry")


@require_GET
@scope_required("read")
def version_health(request, name, version):
    """The version's full health contract as JSON, for download (the page shows a summary)."""
    mv = get_object_or_404(ModelVersion, model__name=name, version=version)
    if not mv.health:
        raise Http404(f"{name}@{version} has no health contract.")
    response = HttpResponse(queries.health_contract_json(mv.health), content_type="application/json")
    response["Content-Disposition"] = f'attachment; filename="{name}-{version}-health.json"'
    return response


def version_change(request, name, version, change: VersionChange):
    mv = get_object_or_404(ModelVersion.objects.select_related("model"), model__name=name, version=version)
    reason = request.POST.get("reason", "").strip()[:500]
    if not reason:
        messages.error(request, f"{change.label} needs a reason; nothing was changed.")
        return redirect("web:version", name=name, version=version)
    try:
        change.change(version=mv, actor=actor_label(request.user), reason=reason)
    except ApiError as exc:
        messages.error(request, f"{change.label} refused: {exc.detail}")
    else:
        messages.success(request, change.done.format(release=str(mv)))
    return redirect("web:version", name=name, version=version)


@require_POST
@scope_required(VERSION_CHANGES["deprecate"].scope)
def version_deprecate(request, name, version):
    return version_change(request, name, version, VERSION_CHANGES["deprecate"])


@require_POST
@scope_required(VERSION_CHANGES["revoke"].scope)
def version_revoke(request, name, version):
    return version_change(request, name, version, VERSION_CHANGES["revoke"])


@require_POST
@scope_required("ci")
def version_release(request, name, version):
    mv = get_object_or_404(ModelVersion, model__name=name, version=version)
    try:
        registry_releases.version_release(version=mv, actor=actor_label(request.user))
    except ApiError as exc:
        messages.error(request, f"Not released: {exc.detail}")
    else:
        messages.success(request, f"Released {name}@{version}: manifest signed, version frozen.")
    return redirect("web:version", name=name, version=version)


@require_POST
@scope_required("operator")
def alias_move(request, name):
    model = get_object_or_404(Model, name=name)
    form = AliasMoveForm(request.POST, model=model)
    if form.is_valid():
        try:
            alias = registry_aliases.alias_set(
                model=model,
                name=form.cleaned_data["alias"],
                version_name=form.cleaned_data["version"],
                actor=actor_label(request.user),
            )
        except ApiError as exc:
            form.add_error(None, str(exc.detail))
        else:
            messages.success(request, f"Alias {alias.name} now points at {alias.version.version}.")
            return redirect("web:model", name=name)
    return model_page(request, name, alias_form=form, status=400)
