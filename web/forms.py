"""Forms for the web admin. They validate and shape input; the actions they feed live in
registry (aliases, tokens) and ota.rollouts."""

from __future__ import annotations

import re

from django import forms
from django.core.exceptions import ValidationError

from ota.fleet.parsing import parse_label_filter, parse_label_pairs
from ota.rollouts.definition import MAX_COUNT, MAX_RATE_PER_MINUTE, MAX_WAIT_SECONDS, wave_plan_parse
from registry.limits import MAX_ENROLLMENT_USES, parse_duration
from registry.models import HardwareTarget, ModelVersion


def parse_labels(text: str) -> list[tuple[str, str | None]]:
    """'site=berlin, camera' -> [('site', 'berlin'), ('camera', None)]. Raises ValueError with
    the offending piece so the form can show it next to the field."""
    return [parse_label_filter(piece) for piece in text.split(",") if piece.strip()]


class DeviceFilterForm(forms.Form):
    q = forms.CharField(required=False, label="Search", widget=forms.TextInput(attrs={"placeholder": "id or name"}))
    labels = forms.CharField(
        required=False, widget=forms.TextInput(attrs={"placeholder": "site=berlin, line=2"})
    )
    hardware = forms.ChoiceField(required=False)
    state = forms.ChoiceField(required=False, choices=[("", "any"), ("active", "active"), ("revoked", "revoked")])
    version = forms.CharField(
        required=False, widget=forms.TextInput(attrs={"placeholder": "model@1.2.0 or 1.2.0"})
    )
    online = forms.ChoiceField(required=False, choices=[("", "any"), ("yes", "online"), ("no", "offline")])

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["hardware"].choices = [("", "any")] + [
            (h, h) for h in HardwareTarget.objects.order_by("id").values_list("id", flat=True)
        ]

    def clean_labels(self):
        try:
            return parse_labels(self.cleaned_data["labels"])
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None

    def filters(self) -> dict:
        """The cleaned fields as ota.fleet.selectors.devices_filter takes them."""
        data = self.cleaned_data
        model, _, version = data["version"].strip().rpartition("@")
        return {
            "q": data["q"], "labels": data["labels"], "hardware": data["hardware"], "state": data["state"],
            "online": {"yes": True, "no": False}.get(data["online"]), "model": model, "version": version,
        }


class AliasMoveForm(forms.Form):
    alias = forms.SlugField(max_length=64, help_text="An existing alias (e.g. production) or a new name.")
    version = forms.ChoiceField(help_text="Only released versions can carry an alias.")

    def __init__(self, *args, model, **kwargs):
        super().__init__(*args, **kwargs)
        released = model.versions.filter(
            state__in=[ModelVersion.State.RELEASED, ModelVersion.State.DEPRECATED]
        ).order_by("-counter")
        self.fields["version"].choices = [("", "choose…")] + [
            (v.version, f"{v.version} ({v.state})") for v in released
        ]
        aliases = list(model.aliases.values_list("name", flat=True))
        if aliases:
            self.fields["alias"].widget.attrs["list"] = "alias-names"
            self.alias_names = aliases


# --- rollout wizard --------------------------------------------------------------------------

WAVE_TEMPLATES = [
    ("canary 2 → 10% → 50% → 100%", "Canary of 2, then 10 %, 50 %, 100 %"),
    ("canary 2 → 25% → 100%", "Canary of 2, then 25 %, 100 %"),
    ("canary 5 → 20% → 40% → 60% → 80% → 100%", "Canary of 5, then steps of 20 %"),
    ("canary 1 → 100%", "One canary, then everyone"),
    ("100%", "Everyone at once (no canary)"),
]
ABORT_POLICIES = [
    ("pause", "Pause and wait for an operator"),
    ("abort", "Abort: send nothing more"),
    ("revert", "Abort and revert updated devices to their previous release"),
]
def split_ids(text: str) -> list[str]:
    return [d for d in re.split(r"[\s,]+", text or "") if d]


class RolloutForm(forms.Form):
    name = forms.CharField(max_length=200, required=False, help_text="Optional; shown in lists and the audit log.")
    release = forms.TypedChoiceField(coerce=int, label="Released version", help_text="Only released (signed) versions.")
    target_labels = forms.CharField(
        required=False,
        label="Labels",
        widget=forms.TextInput(attrs={"placeholder": "site=berlin, line=2"}),
        help_text="Devices carrying all these labels (key=value, comma separated).",
    )
    target_hardware = forms.MultipleChoiceField(
        required=False, label="Hardware", widget=forms.CheckboxSelectMultiple,
        help_text="Only devices of these hardware ids (none ticked: any hardware).",
    )
    target_devices = forms.CharField(
        required=False,
        label="Device list",
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "dev-0001 dev-0002"}),
        help_text="Explicit device ids, added to what labels/hardware select.",
    )
    target = forms.CharField(required=False, widget=forms.HiddenInput)  # carries errors about the target as a whole
    template = forms.ChoiceField(choices=WAVE_TEMPLATES, required=False, label="Wave plan template")
    waves = forms.CharField(
        label="Wave plan",
        initial=WAVE_TEMPLATES[0][0],
        help_text="Steps separated by →: 'canary 2', 'canary: dev-1, dev-2', +25 (more devices), 10% (cumulative).",
    )
    success_percent = forms.FloatField(
        min_value=0, max_value=100, initial=100, label="Success gate: healthy %",
        help_text="A wave passes when this share of its devices is healthy after activation.",
    )
    failure_min_reports = forms.IntegerField(
        min_value=1, max_value=MAX_COUNT, initial=1, label="Failure gate: after reports", help_text="Judge failures once this many devices reported.",
    )
    failure_percent = forms.FloatField(
        min_value=0, max_value=100, initial=10, label="Failure gate: failed %", help_text="Trip when this share of reports failed.",
    )
    failure_count = forms.IntegerField(
        min_value=1, max_value=MAX_COUNT, required=False, label="Failure gate: failures", help_text="Or trip at this many failures (blank: no count limit).",
    )
    soak_seconds = forms.IntegerField(
        min_value=0, max_value=MAX_WAIT_SECONDS, initial=600, label="Soak (s)", help_text="How long the success gate must hold before the next wave.",
    )
    rate_per_minute = forms.IntegerField(
        min_value=1, max_value=MAX_RATE_PER_MINUTE, required=False, initial=500, label="Rate cap (devices/min)", help_text="Blank: no cap.",
    )
    # The maxima are the definition's (ota.rollouts.definition), which checks them again for every entry.
    download_seconds = forms.IntegerField(min_value=1, max_value=MAX_WAIT_SECONDS, initial=1800, label="Download timeout (s)")
    activate_seconds = forms.IntegerField(min_value=1, max_value=MAX_WAIT_SECONDS, initial=600, label="Activate timeout (s)")
    trial_seconds = forms.IntegerField(min_value=1, max_value=MAX_WAIT_SECONDS, initial=900, label="Trial timeout (s)")
    abort_policy = forms.ChoiceField(
        choices=ABORT_POLICIES, initial="pause", label="When the failure gate trips",
    )
    requires_approval = forms.BooleanField(required=False, label="Require a second operator's approval before start")
    # Maintenance windows and the start time: text as the API takes it, checked by
    # ota.rollouts.definition (the agent's own window parser) like every other entry.
    windows = forms.CharField(
        required=False, label="Maintenance windows",
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "Mon-Fri 02:00-04:00 Europe/Berlin"}),
        help_text="One per line: [DAYS] HH:MM-HH:MM [ZONE] (no zone: each device's local time). Devices download "
        "at once and activate only while a window is open. Blank: activate at once.",
    )
    label_windows = forms.CharField(
        required=False, label="Windows by label",
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "site=tokyo: daily 01:00-03:00 Asia/Tokyo"}),
        help_text="One per line, LABELS: WINDOW; devices with those labels (the first matching line's labels) get "
        "these windows instead.",
    )
    start_at = forms.CharField(
        required=False, label="Start at",
        widget=forms.TextInput(attrs={"placeholder": "2026-12-24T02:00:00Z"}),
        help_text="Optional, RFC 3339 with its offset: Start then schedules the rollout, and it begins at this time.",
    )

    TARGET_FIELDS = ("target_labels", "target_hardware", "target_devices")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        releases = ModelVersion.objects.filter(state=ModelVersion.State.RELEASED).select_related("model").order_by(
            "model__name", "-counter"
        )
        self.releases = {v.pk: v for v in releases}
        self.fields["release"].choices = [("", "choose a release…")] + [
            (v.pk, f"{v.model.name} @ {v.version}") for v in releases
        ]
        self.fields["target_hardware"].choices = [
            (h, h) for h in HardwareTarget.objects.order_by("id").values_list("id", flat=True)
        ]

    def clean_target_labels(self):
        try:
            pairs = parse_labels(self.cleaned_data["target_labels"])
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None
        bare = [k for k, v in pairs if v is None]
        if bare:
            raise forms.ValidationError(f"Give a value for {', '.join(bare)} (key=value).")
        return dict(pairs)

    def clean_target_devices(self):
        return split_ids(self.cleaned_data["target_devices"])

    def clean_windows(self):
        return [line.strip() for line in self.cleaned_data["windows"].splitlines() if line.strip()]

    def clean_label_windows(self):
        groups: dict[str, dict] = {}
        for number, line in enumerate(self.cleaned_data["label_windows"].splitlines(), start=1):
            if not line.strip():
                continue
            labels, colon, window = line.partition(":")
            try:
                pairs = parse_labels(labels) if colon else []
            except ValueError as exc:
                raise forms.ValidationError(f"Line {number}: {exc}") from None
            if not pairs or any(v is None for _, v in pairs) or not window.strip():
                raise forms.ValidationError(f"Line {number}: write LABELS: WINDOW, e.g. site=tokyo: daily 01:00-03:00 Asia/Tokyo")
            group = groups.setdefault(labels.strip(), {"labels": dict(pairs), "windows": []})
            group["windows"].append(window.strip())
        return list(groups.values())

    def clean_start_at(self):
        return self.cleaned_data["start_at"].strip() or None

    def clean_waves(self):
        try:
            return wave_plan_parse(self.cleaned_data["waves"])
        except ValidationError as exc:
            raise forms.ValidationError([m[0].upper() + m[1:] for m in exc.messages]) from None

    def clean(self):
        data = super().clean()
        if all(f in data for f in self.TARGET_FIELDS) and not (
            data["target_labels"] or data["target_hardware"] or data["target_devices"]
        ):
            self.add_error("target", "Choose the target: labels, hardware and/or a device list.")
        return data

    # --- shapes ota.rollouts.create.rollout_create takes ---

    @property
    def release_obj(self):
        return self.releases.get(self.cleaned_data.get("release"))

    def target_spec(self) -> dict:
        d = self.cleaned_data
        return {"labels": d["target_labels"], "hardware": list(d["target_hardware"]), "devices": d["target_devices"]}

    def gates_spec(self) -> dict:
        d = self.cleaned_data
        failure = {"min_reports": d["failure_min_reports"], "max_failed_percent": d["failure_percent"]}
        if d.get("failure_count"):
            failure["max_failures"] = d["failure_count"]
        return {
            "success": {"min_healthy_percent": d["success_percent"]},
            "failure": failure,
            "soak_seconds": d["soak_seconds"],
            "rate_per_minute": d.get("rate_per_minute"),
            "timeouts": {
                "download_seconds": d["download_seconds"],
                "activate_seconds": d["activate_seconds"],
                "trial_seconds": d["trial_seconds"],
            },
        }

    def create_kwargs(self) -> dict:
        release = self.release_obj
        return {
            "model": release.model.name,
            "version": release.version,
            "target": self.target_spec(),
            "waves": self.cleaned_data["waves"],
            "gates": self.gates_spec(),
            "abort_policy": self.cleaned_data["abort_policy"],
            "requires_approval": self.cleaned_data["requires_approval"],
            "name": self.cleaned_data["name"],
            **self.schedule_spec(),
        }

    def schedule_spec(self) -> dict:
        d = self.cleaned_data
        return {"windows": d["windows"], "label_windows": d["label_windows"], "start_at": d["start_at"]}

    # ota.rollouts reports problems keyed by the API's field paths; show each next to our field.
    ERROR_FIELDS = (
        ("model", "release"),
        ("version", "release"),
        ("target.labels", "target_labels"),
        ("target.hardware", "target_hardware"),
        ("target.devices", "target_devices"),
        ("target", "target"),
        ("waves", "waves"),
        ("gates.success", "success_percent"),
        ("gates.failure.min_reports", "failure_min_reports"),
        ("gates.failure.max_failed_percent", "failure_percent"),
        ("gates.failure.max_failures", "failure_count"),
        ("gates.soak_seconds", "soak_seconds"),
        ("gates.rate_per_minute", "rate_per_minute"),
        ("gates.timeouts.download_seconds", "download_seconds"),
        ("gates.timeouts.activate_seconds", "activate_seconds"),
        ("gates.timeouts.trial_seconds", "trial_seconds"),
        ("abort_policy", "abort_policy"),
        ("windows", "windows"),
        ("label_windows", "label_windows"),
        ("start_at", "start_at"),
    )

    def add_action_errors(self, errors: dict[str, list[str]]) -> None:
        for key, messages in errors.items():
            field = next((f for prefix, f in self.ERROR_FIELDS if key == prefix or key.startswith(prefix)), None)
            for message in messages:
                text = message
                wave = re.match(r"waves\[(\d+)\]", key)
                if wave:
                    text = f"Wave {int(wave.group(1)) + 1}: {message}"
                if field:
                    self.add_error(field, text)
                else:
                    self.add_error(None, f"{key}: {text}")


# --- admin: credentials ----------------------------------------------------------------------


def optional_duration(text: str):
    """An expiry field: blank is None (never), else registry.limits.parse_duration's timedelta."""
    text = text.strip()
    if not text:
        return None
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise forms.ValidationError(str(exc)) from None


class ApiTokenForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="Who uses it, e.g. github-actions.")
    scope = forms.ChoiceField(
        choices=[("read", "read"), ("ci", "ci"), ("operator", "operator"), ("admin", "admin")], initial="ci"
    )
    expires_in = forms.CharField(
        required=False, initial="90d", label="Expires in", help_text="e.g. 30d, 12w; blank: never."
    )

    def clean_expires_in(self):
        return optional_duration(self.cleaned_data["expires_in"])


class EnrollmentTokenForm(forms.Form):
    name = forms.CharField(max_length=100, required=False, help_text="e.g. berlin line 2 install day")
    max_uses = forms.IntegerField(min_value=1, max_value=MAX_ENROLLMENT_USES, initial=1, label="Max uses")
    expires_in = forms.CharField(
        required=False, initial="1d", label="Expires in", help_text="e.g. 12h, 1d, 2w; blank: never."
    )
    labels = forms.CharField(
        required=False, help_text="Labels every device enrolled with it gets: site=berlin, line=2"
    )

    def clean_expires_in(self):
        return optional_duration(self.cleaned_data["expires_in"])

    def clean_labels(self):
        try:
            return parse_label_pairs([p.strip() for p in self.cleaned_data["labels"].split(",") if p.strip()])
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None
