"""Forms for the web admin. They validate and shape input; the actions they feed live in
registry.actions and ota.actions."""

from __future__ import annotations

from django import forms

from registry.models import HardwareTarget
from web.queries import parse_labels


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


class AliasMoveForm(forms.Form):
    alias = forms.SlugField(max_length=64, help_text="An existing alias (e.g. production) or a new name.")
    version = forms.ChoiceField(help_text="Only released versions can carry an alias.")

    def __init__(self, *args, model, **kwargs):
        super().__init__(*args, **kwargs)
        from registry.models import ModelVersion

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
