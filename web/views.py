"""Web admin views. Thin: they read through web.queries, change state only through registry
(releases, aliases, tokens) / ota.rollouts / ota.fleet (the same functions the API calls), and
check roles on the server with web.access.scope_required."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db.models import Count, Prefetch
from django.http import Http404, HttpResponse, HttpResponseBadRequest, HttpResponseNotAllowed
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from ota.fleet import revocation
from ota.fleet.enrollment import enrollment_token_create, enrollment_token_revoke
from ota.fleet.selectors import devices_filter, devices_with_states
from ota.models import ActiveRelease, Device, DeviceEvent, EnrollmentToken, Rollout
from ota.rollouts.actions import rollout_act
from ota.rollouts.catalogue import ACTION_SCOPES, CREATE_SCOPES, action_named, actions_available, may_run
from ota.rollouts.create import rollout_create
from registry import aliases as registry_aliases
from registry import keys as registry_keys
from registry import releases as registry_releases
from registry import tokens as registry_tokens
from registry import views as registry_views
from registry.audit import SYSTEM, audit_entries_for
from registry.auth import actor_label, scopes_of
from registry.errors import ApiError
from registry.models import Alias, AliasMove, ApiToken, AuditEntry, Model, ModelVersion
from web import queries
from web.access import Can, scope_required
from web.forms import AliasMoveForm, ApiTokenForm, DeviceFilterForm, EnrollmentTokenForm, RolloutForm

DEVICE_PAGE_SIZE = 50


def role_of(scopes) -> str:
    if "admin" in scopes:
        return "admin"
    if "operator" in scopes:
        return "operator"
    return "viewer" if "read" in scopes else "no role"


def page(request, template, context=None, *, section="", status=200):
    can = Can(request.user)
    context = {**(context or {}), "can": can, "role": role_of(can.scopes), "section": section}
    return render(request, template, context, status=status)


def is_htmx(request) -> bool:
    return request.headers.get("HX-Request") == "true"


def chart(chart_type: str, labels, datasets, **extra) -> dict:
    return {"type": chart_type, "data": {"labels": list(labels), "datasets": datasets}, **extra}


class LoginView(auth_views.LoginView):
    template_name = "web/login.html"
    redirect_authenticated_user = True


logout_view = require_POST(auth_views.LogoutView.as_view(next_page="web:login"))


# --- overview --------------------------------------------------------------------------------


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


# --- devices ---------------------------------------------------------------------------------


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
        "audit": audit_entries_for(device)[:20],
    }
    return page(request, "web/devices/detail.html", context, section="devices")


# --- registry --------------------------------------------------------------------------------


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


# --- admin: credentials and keys ------------------------------------------------------------


@scope_required("admin")
def access(request):
    """API tokens, enrollment tokens and the public signing keys. A new secret is shown once, in
    this response only (never in a redirect's flash message, which would keep it in the session)."""
    api_form = ApiTokenForm(prefix="api")
    enroll_form = EnrollmentTokenForm(prefix="enroll")
    new_secret = None
    status = 200
    if request.method == "POST":
        actor = actor_label(request.user)
        kind = request.POST.get("kind")
        if kind == "api":
            api_form = ApiTokenForm(request.POST, prefix="api")
            if api_form.is_valid():
                try:
                    token, secret = registry_tokens.token_create(**api_form.cleaned_data, actor=actor)
                except ApiError as exc:
                    api_form.add_error("name", str(exc.detail))
                else:
                    new_secret = {"what": f"API token '{token.name}' ({token.scope})", "secret": secret}
                    api_form = ApiTokenForm(prefix="api")
        elif kind == "enroll":
            enroll_form = EnrollmentTokenForm(request.POST, prefix="enroll")
            if enroll_form.is_valid():
                d = enroll_form.cleaned_data
                token, secret = enrollment_token_create(
                    max_uses=d["max_uses"], expires_in=d["expires_in"], labels=d["labels"], name=d["name"],
                    created_by=actor,
                )
                new_secret = {"what": f"enrollment token {token.prefix}… ({token.max_uses} uses)", "secret": secret}
                enroll_form = EnrollmentTokenForm(prefix="enroll")
        elif kind == "revoke-api":
            tokens = ApiToken.objects.filter(pk=request.POST.get("token_id") or 0)
            count = registry_tokens.tokens_revoke(tokens=tokens, actor=actor)
            if count:
                messages.success(request, "API token revoked.")
            else:
                messages.error(request, "No such active token.")
            return redirect("web:access")
        elif kind == "revoke-enroll":
            try:
                enrollment_token_revoke(token_id=int(request.POST.get("token_id") or 0), actor=actor)
            except (EnrollmentToken.DoesNotExist, ValueError):
                messages.error(request, "No such enrollment token.")
            else:
                messages.success(request, "Enrollment token revoked.")
            return redirect("web:access")
        else:
            return HttpResponseBadRequest("Unknown form.")
        if new_secret is None:
            status = 400
    try:
        keys = registry_keys.public_keys()
        keys_error = ""
    except ApiError as exc:
        keys, keys_error = [], str(exc.detail)
    context = {
        "api_form": api_form,
        "enroll_form": enroll_form,
        "new_secret": new_secret,
        "api_tokens": ApiToken.objects.order_by("revoked_at", "-created_at")[:200],
        "enrollment_tokens": EnrollmentToken.objects.order_by("-created_at")[:200],
        "keys": keys,
        "keys_error": keys_error,
    }
    response = page(request, "web/access.html", context, section="access", status=status)
    if new_secret:
        response["Cache-Control"] = "no-store"
    return response


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


# --- audit -----------------------------------------------------------------------------------


@require_GET
@scope_required("read")
def audit_log(request):
    entries = AuditEntry.objects.order_by("-created_at", "-id")
    actor = request.GET.get("actor", "")
    if actor:
        entries = entries.filter(actor=actor)
    page_obj = Paginator(entries, 100).get_page(request.GET.get("page"))
    return page(request, "web/audit.html", {"page_obj": page_obj, "actor": actor}, section="audit")




# --- rollouts --------------------------------------------------------------------------------


@require_GET
@scope_required("read")
def rollout_list(request):
    rollouts = list(Rollout.objects.select_related("release", "model").order_by("-created_at", "-id")[:200])
    counts = queries.rollout_counts(r.pk for r in rollouts)
    for rollout in rollouts:
        rollout.progress = queries.summarise(counts.get(rollout.pk, {}))
    return page(request, "web/rollouts/list.html", {"rollouts": rollouts}, section="rollouts")


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
        review = queries.rollout_dry_run(form)
    except ValidationError as exc:
        form.add_action_errors(exc.message_dict)
        return wizard_page(request, form, status=400)
    return page(request, "web/rollouts/review.html", {"form": form, "review": review}, section="rollouts")


def wizard_page(request, form, status=200):
    from web.forms import WAVE_TEMPLATES

    context = {"form": form, "templates": WAVE_TEMPLATES}
    return page(request, "web/rollouts/wizard.html", context, section="rollouts", status=status)


@require_GET
@scope_required(CREATE_SCOPES)
def rollout_preview(request):
    """htmx: how many devices the target matches, per hardware, and how many cannot take the release."""
    form = RolloutForm(request.GET)
    form.is_valid()  # partial input is normal here; only the target and release fields matter
    preview = queries.target_preview(form)
    return page(request, "web/rollouts/_preview.html", {"preview": preview, "form": form})


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
        done = f"{result} failed devices queued again." if entry.name == "retry" else f"{entry.label}: done."
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
    return {"rollout": rollout, "live": live, "buttons": buttons}
