"""Request validation and response shapes of the registry API (v1). Business rules live in the
registry's functions (registry.versions, registry.artifacts, ...); these only check types and
shape JSON."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.fields import empty
from rest_framework.utils import html

from registry.downloads import artifact_download_path
from registry.models import ApiToken, Artifact, HardwareTarget, Model, ModelVersion, identifier
from registry.parsers import CheckedJSONField

# --- requests --------------------------------------------------------------------------------


class HardwareCreateSerializer(serializers.Serializer):
    id = serializers.CharField(max_length=64, validators=[identifier])
    description = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    # The column is a signed 64-bit integer: a larger number must be a 400, not a database error.
    max_artifact_bytes = serializers.IntegerField(min_value=1, max_value=2**63 - 1)


class ModelCreateSerializer(serializers.Serializer):
    name = serializers.SlugField(max_length=64)
    description = serializers.CharField(required=False, allow_blank=True, default="")
    tags = serializers.ListField(child=serializers.CharField(max_length=64), required=False, default=list)


class _FormText(str):
    """A form field's raw text, for a field that takes a JSON object (see JsonInForms)."""


class JsonInForms:
    """For fields that take a JSON object (a DictField, a nested serializer): in a multipart or
    urlencoded form the object arrives as one field holding JSON text (`curl -F
    'provenance={"git_sha": "..."}'`, and what OpenAPI clients send). DRF would look only for
    dotted keys (provenance.git_sha=...) and drop the field without a word; here the text is parsed
    with the JSON body's limits (CheckedJSONField: depth, control characters), so the form and the
    JSON body take the same fields. Text that is not JSON is a 400 naming the field; an empty field
    counts as not given. Dotted keys still work."""

    def get_value(self, dictionary):
        if html.is_html_input(dictionary) and self.field_name in dictionary:
            text = dictionary[self.field_name]
            return _FormText(text) if text != "" else empty
        return super().get_value(dictionary)

    def run_validation(self, data=empty):
        if isinstance(data, _FormText):
            parser = CheckedJSONField(binary=True)
            parser.field_name = self.field_name
            data = parser.to_internal_value(str(data))
        return super().run_validation(data)


class JsonDictField(JsonInForms, serializers.DictField):
    pass


class JsonListField(JsonInForms, serializers.ListField):
    pass


class ProvenanceSerializer(JsonInForms, serializers.Serializer):
    git_sha = serializers.CharField(max_length=64, required=False, allow_blank=True, default="")
    ci_run_url = serializers.URLField(max_length=500, required=False, allow_blank=True, default="")
    training_run_id = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")


class VersionCreateSerializer(serializers.Serializer):
    version = serializers.CharField(max_length=64, validators=[identifier])
    metadata = JsonDictField(required=False, default=dict)
    metrics = JsonDictField(required=False, default=dict)
    provenance = ProvenanceSerializer(required=False)
    health = CheckedJSONField(
        required=False,
        allow_null=True,
        default=None,
        help_text='{"inputs": {NAME: {"dtype", "shape", "data"}}, "outputs": {...}, "atol", "rtol", '
        '"latency_budget_ms", "shadow": {"metric", "min_agreement", "max_mae", "output", "min_samples", '
        '"required"}}; every key optional, outputs need inputs. Or {"precheck": "none"} alone: '
        "no precheck (devices and release), the trial decides alone.",
    )
    rollback_floor = serializers.IntegerField(min_value=0, required=False, default=0)


class ArtifactUploadSerializer(serializers.Serializer):
    """Multipart form (documented for the schema; the action checks each field itself)."""

    hardware = serializers.CharField(help_text="Hardware target id.")
    format = serializers.ChoiceField(choices=Artifact.Format.choices)
    file = serializers.FileField()
    sha256 = serializers.CharField(required=False, help_text="Expected SHA-256 (hex); refused on mismatch.")


class SignatureSerializer(serializers.Serializer):
    keyid = serializers.CharField(max_length=128, help_text="Hex SHA-256 of the raw Ed25519 public key.")
    sig = serializers.CharField(max_length=256, help_text="Base64 Ed25519 signature over DSSE PAE(payloadType, payload).")


class ReleaseFormSerializer(serializers.Serializer):
    """The release body as a form: offline signatures (a list of objects) are sent as JSON."""

    approver = serializers.CharField(max_length=150, required=False, allow_blank=True)


class ReleaseSerializer(serializers.Serializer):
    approver = serializers.CharField(max_length=150, required=False, allow_blank=True)
    payload = serializers.CharField(
        required=False, allow_blank=True, trim_whitespace=False,
        help_text="RELEASE_SIGNING=offline: the base64 payload from GET .../manifest-payload that was signed.",
    )
    signatures = JsonListField(
        child=SignatureSerializer(), required=False, max_length=16,
        help_text="RELEASE_SIGNING=offline: signatures by registered release keys over the payload.",
    )


class ManifestPayloadSerializer(serializers.Serializer):
    payloadType = serializers.CharField()  # noqa: N815 - the DSSE field name
    payload = serializers.CharField(help_text="Base64 of the exact manifest bytes to sign.")
    sha256 = serializers.CharField()
    threshold = serializers.IntegerField(help_text="Distinct registered release keys that must sign.")


class ReleaseKeyCreateSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=["release"], default="release")
    public_key_pem = serializers.CharField(max_length=4096, trim_whitespace=False)


class ReleaseKeySerializer(serializers.Serializer):
    keyid = serializers.CharField()
    role = serializers.CharField()
    public_key_pem = serializers.CharField()
    created_at = serializers.DateTimeField()
    created_by = serializers.CharField(allow_blank=True)
    revoked_at = serializers.DateTimeField(allow_null=True)
    revoked_by = serializers.CharField(allow_blank=True)


class ReasonSerializer(serializers.Serializer):
    reason = serializers.CharField(required=False, allow_blank=True, default="")


class AliasSetSerializer(serializers.Serializer):
    version = serializers.CharField(max_length=64)


# --- responses -------------------------------------------------------------------------------


class HardwareSerializer(serializers.ModelSerializer):
    class Meta:
        model = HardwareTarget
        fields = ["id", "description", "max_artifact_bytes", "created_at"]


class ArtifactSerializer(serializers.ModelSerializer):
    hardware = serializers.CharField(source="hardware_id")
    download_url = serializers.SerializerMethodField()

    class Meta:
        model = Artifact
        fields = ["hardware", "format", "file_name", "length", "sha256", "created_at", "download_url"]

    def get_download_url(self, artifact: Artifact) -> str:
        path = artifact_download_path(artifact=artifact)
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request else path


class VersionSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name")
    provenance = serializers.SerializerMethodField()
    aliases = serializers.SlugRelatedField(many=True, read_only=True, slug_field="name")
    artifacts = ArtifactSerializer(many=True, read_only=True)

    class Meta:
        model = ModelVersion
        fields = [
            "model",
            "version",
            "counter",
            "rollback_floor",
            "state",
            "metadata",
            "metrics",
            "health",
            "provenance",
            "created_at",
            "created_by",
            "released_at",
            "released_by",
            "expires_at",
            "manifest_sha256",
            "aliases",
            "artifacts",
        ]

    @extend_schema_field(
        {
            "type": "object",
            "properties": {
                k: {"type": "string"} for k in ("git_sha", "ci_run_url", "training_run_id", "approver")
            },
        }
    )
    def get_provenance(self, version: ModelVersion) -> dict:
        return {
            "git_sha": version.git_sha,
            "ci_run_url": version.ci_run_url,
            "training_run_id": version.training_run_id,
            "approver": version.approver,
        }


class ModelSerializer(serializers.ModelSerializer):
    aliases = serializers.SerializerMethodField()
    latest_version = serializers.SerializerMethodField()

    class Meta:
        model = Model
        fields = ["name", "description", "tags", "created_at", "aliases", "latest_version"]

    @extend_schema_field({"type": "object", "additionalProperties": {"type": "string"}})
    def get_aliases(self, model: Model) -> dict:
        return {alias.name: alias.version.version for alias in model.aliases.select_related("version")}

    @extend_schema_field({"type": "string", "nullable": True})
    def get_latest_version(self, model: Model) -> str | None:
        latest = model.versions.order_by("-counter").first()
        return latest.version if latest else None


class AliasMoveSerializer(serializers.Serializer):
    from_version = serializers.CharField(allow_null=True)
    to_version = serializers.CharField()
    moved_by = serializers.CharField()
    moved_at = serializers.DateTimeField()


class AliasSerializer(serializers.Serializer):
    name = serializers.CharField()
    version = serializers.CharField()
    updated_at = serializers.DateTimeField()
    updated_by = serializers.CharField()
    history = AliasMoveSerializer(many=True)


class EnvelopeSignatureSerializer(serializers.Serializer):
    keyid = serializers.CharField()
    sig = serializers.CharField(help_text="base64 Ed25519 signature over DSSE PAE")


class EnvelopeSerializer(serializers.Serializer):
    """A DSSE envelope (https://github.com/secure-systems-lab/dsse)."""

    payloadType = serializers.CharField()
    payload = serializers.CharField(help_text="base64 of the release manifest JSON")
    signatures = EnvelopeSignatureSerializer(many=True)


class PublicKeySerializer(serializers.Serializer):
    keyid = serializers.CharField()
    role = serializers.ChoiceField(choices=["release", "rollout"])
    public_key_pem = serializers.CharField()


class ApiTokenSerializer(serializers.ModelSerializer):
    """A token's metadata, never its secret (only its hash is stored)."""

    expired = serializers.SerializerMethodField()

    class Meta:
        model = ApiToken
        fields = ["id", "name", "scope", "prefix", "created_at", "created_by", "expires_at", "expired",
                  "last_used_at", "revoked_at"]

    def get_expired(self, token) -> bool:
        return token.is_expired()
