"""Registry REST API v1. Thin: parse, call the registry's functions (registry.versions,
registry.artifacts, registry.releases, ...), shape the response."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, status
from rest_framework.response import Response
from rest_framework.views import APIView

from registry import keys
from registry.aliases import alias_set, aliases_list, parse_instant
from registry.artifacts import artifact_storage, artifact_upload, upload_discard
from registry.auth import actor_label
from registry.downloads import artifact_response, release_envelope_response
from registry.errors import ApiError, not_found
from registry.hardware import hardware_create
from registry.lookups import artifact_get, model_get, version_get
from registry.models import ApiToken, HardwareTarget, Model, ModelVersion, ReleaseKey
from registry.parsers import FormParser, MultiPartParser
from registry.releases import (
    version_delete_draft,
    version_deprecate,
    version_manifest_payload,
    version_release,
    version_revoke,
)
from registry.schema import ERROR
from registry.serializers import (
    AliasSerializer,
    AliasSetSerializer,
    ApiTokenSerializer,
    ArtifactSerializer,
    ArtifactUploadSerializer,
    EnvelopeSerializer,
    HardwareCreateSerializer,
    HardwareSerializer,
    ManifestPayloadSerializer,
    ModelCreateSerializer,
    ModelSerializer,
    PublicKeySerializer,
    ReasonSerializer,
    ReleaseKeyCreateSerializer,
    ReleaseFormSerializer,
    ReleaseKeySerializer,
    ReleaseSerializer,
    VersionCreateSerializer,
    VersionSerializer,
)
from registry.versions import model_create, version_create


class HardwareListCreate(generics.ListAPIView):
    write_scope = "ci"
    serializer_class = HardwareSerializer
    queryset = HardwareTarget.objects.order_by("id")

    @extend_schema(request=HardwareCreateSerializer, responses={201: HardwareSerializer, 409: ERROR})
    def post(self, request):
        data = _valid(HardwareCreateSerializer, request)
        hardware = hardware_create(**data, actor=actor_label(request.user))
        return Response(HardwareSerializer(hardware).data, status=status.HTTP_201_CREATED)


class ModelListCreate(generics.ListAPIView):
    write_scope = "ci"
    serializer_class = ModelSerializer
    queryset = Model.objects.order_by("name")

    @extend_schema(request=ModelCreateSerializer, responses={201: ModelSerializer, 409: ERROR})
    def post(self, request):
        data = _valid(ModelCreateSerializer, request)
        model = model_create(**data, actor=actor_label(request.user))
        return Response(ModelSerializer(model).data, status=status.HTTP_201_CREATED)


class ModelDetail(APIView):
    @extend_schema(responses={200: ModelSerializer, 404: ERROR})
    def get(self, request, name):
        return Response(ModelSerializer(model_get(name=name)).data)


class VersionListCreate(generics.ListAPIView):
    write_scope = "ci"
    serializer_class = VersionSerializer

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return ModelVersion.objects.none()
        model = model_get(name=self.kwargs["name"])
        return (
            model.versions.select_related("model")
            .prefetch_related("artifacts__version__model", "aliases")
            .order_by("-counter")
        )

    @extend_schema(
        request=VersionCreateSerializer, responses={201: VersionSerializer, 400: ERROR, 409: ERROR}
    )
    def post(self, request, name):
        model = model_get(name=name)
        data = _valid(VersionCreateSerializer, request)
        version = version_create(model=model, actor=actor_label(request.user), **data)
        return Response(
            VersionSerializer(version, context={"request": request}).data, status=status.HTTP_201_CREATED
        )


class VersionDetail(APIView):
    """GET a version. DELETE a draft (a refused push can then be pushed again under the same
    version); a released version is never deleted: 409, deprecate or revoke it instead."""

    write_scope = "ci"

    @extend_schema(responses={200: VersionSerializer, 404: ERROR})
    def get(self, request, name, version):
        found = version_get(model_name=name, version=version)
        return Response(VersionSerializer(found, context={"request": request}).data)

    @extend_schema(responses={204: None, 403: ERROR, 404: ERROR, 409: ERROR})
    def delete(self, request, name, version):
        found = version_get(model_name=name, version=version)
        version_delete_draft(version=found, actor=actor_label(request.user))
        return Response(status=status.HTTP_204_NO_CONTENT)


class ArtifactListUpload(APIView):
    write_scope = "ci"
    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(responses={200: ArtifactSerializer(many=True), 404: ERROR})
    def get(self, request, name, version):
        found = version_get(model_name=name, version=version)
        return Response(
            ArtifactSerializer(found.artifacts.all(), many=True, context={"request": request}).data
        )

    @extend_schema(
        request={"multipart/form-data": ArtifactUploadSerializer},
        responses={201: ArtifactSerializer, 400: ERROR, 409: ERROR, 413: ERROR},
        description="Streams the file to disk while hashing it; refusals leave nothing stored.",
    )
    def post(self, request, name, version):
        found = version_get(model_name=name, version=version)
        # request.data parses (and spools) the body; request.FILES shares the same parse.
        data, files = request.data, request.FILES
        extra = [f for f in files if f != "file"]
        for field in extra:
            upload_discard(files[field])
        artifact = artifact_upload(
            version=found,
            hardware_id=data.get("hardware"),
            format=data.get("format"),
            upload=files.get("file"),
            expected_sha256=data.get("sha256") or None,
            actor=actor_label(request.user),
            stopped_over_bytes=getattr(request._request, "upload_over_cap", None),
        )
        return Response(
            ArtifactSerializer(artifact, context={"request": request}).data, status=status.HTTP_201_CREATED
        )


class VersionRelease(APIView):
    write_scope = "ci"

    @extend_schema(
        request={
            "application/json": ReleaseSerializer,
            "multipart/form-data": ReleaseFormSerializer,
            "application/x-www-form-urlencoded": ReleaseFormSerializer,
        },
        responses={200: EnvelopeSerializer, 400: ERROR, 409: ERROR, 503: ERROR},
        description="Signs the release manifest with the release key and returns the DSSE envelope. "
        "With RELEASE_SIGNING=offline, send the payload from manifest-payload and signatures by "
        "registered release keys instead (400 signature_required, signature_invalid, unknown_key, "
        "signature_threshold, payload_mismatch).",
    )
    def post(self, request, name, version):
        found = version_get(model_name=name, version=version)
        data = _valid(ReleaseSerializer, request)
        envelope = version_release(
            version=found,
            actor=actor_label(request.user),
            approver=data.get("approver") or None,
            payload=data.get("payload") or None,
            signatures=[dict(entry) for entry in data.get("signatures") or []],
        )
        found.refresh_from_db()
        return Response(envelope, headers={"X-Manifest-Sha256": found.manifest_sha256})


class VersionManifestPayload(APIView):
    read_scope = "ci"

    @extend_schema(
        parameters=[OpenApiParameter("approver", str, required=False, description="approver to name in the manifest")],
        responses={200: ManifestPayloadSerializer, 404: ERROR, 409: ERROR},
        description="The exact manifest bytes (base64) and payloadType a release of this draft signs now, "
        "for signing offline (`fleetctl push --sign-with`).",
    )
    def get(self, request, name, version):
        found = version_get(model_name=name, version=version)
        approver = request.query_params.get("approver") or None
        if approver is not None and len(approver) > 150:
            raise ApiError("approver must be at most 150 characters.", code="invalid_approver")
        return Response(version_manifest_payload(version=found, actor=actor_label(request.user), approver=approver))


class VersionManifest(APIView):
    read_scope = ("read", "device")

    @extend_schema(responses={200: EnvelopeSerializer, 403: ERROR, 404: ERROR})
    def get(self, request, name, version):
        found = version_get(model_name=name, version=version)
        require_directed(request, found)
        if found.envelope is None:
            raise not_found(f"{found} is a draft; it has no signed manifest until released.", "not_released")
        return Response(found.envelope, headers={"X-Manifest-Sha256": found.manifest_sha256})


class VersionReleaseEnvelope(APIView):
    """The signed release envelope as canonical bytes (agent.protocol.release_bytes): what a lean
    directive's release_ref names by sha256 and length; devices fetch it once and cache it."""

    read_scope = ("read", "device")

    @extend_schema(responses={200: EnvelopeSerializer, 403: ERROR, 404: ERROR, 410: ERROR})
    def get(self, request, name, version):
        found = version_get(model_name=name, version=version)
        if found.state == ModelVersion.State.REVOKED:
            raise ApiError(f"{found} has been revoked; its release may no longer be installed.",
                           code="version_revoked", status_code=410)
        require_directed(request, found)
        if found.envelope is None:
            raise not_found(f"{found} is a draft; it has no signed manifest until released.", "not_released")
        return release_envelope_response(request, version=found)


class _VersionStateChange(APIView):
    """POST moves a version to another state through `change`, an action taking version, actor, reason."""

    write_scope = "admin"
    change = None

    @extend_schema(request=ReasonSerializer, responses={200: VersionSerializer, 409: ERROR})
    def post(self, request, name, version):
        found = version_get(model_name=name, version=version)
        data = _valid(ReasonSerializer, request)
        updated = self.change(version=found, actor=actor_label(request.user), reason=data["reason"])
        return Response(VersionSerializer(updated, context={"request": request}).data)


class VersionDeprecate(_VersionStateChange):
    change = staticmethod(version_deprecate)


class VersionRevoke(_VersionStateChange):
    change = staticmethod(version_revoke)


def require_directed(request, found: ModelVersion, hardware: str | None = None) -> None:
    """403 not_directed unless the caller may read this release (and this hardware's artifact).
    A principal that narrows its downloads says so (device tokens: only what a directive named)."""
    may_download = getattr(request.user, "may_download", None)
    if may_download is not None and not may_download(version_id=found.pk, hardware_id=hardware):
        what = f"{found} for hardware '{hardware}'" if hardware is not None else f"{found} (its manifest)"
        raise ApiError(f"{request.user.label} was not directed to install {what}.", code="not_directed", status_code=403)


class ArtifactDownload(APIView):
    read_scope = ("read", "device")

    @extend_schema(
        parameters=[OpenApiParameter("Range", OpenApiTypes.STR, OpenApiParameter.HEADER, required=False)],
        responses={
            (200, "application/octet-stream"): OpenApiTypes.BINARY,
            (206, "application/octet-stream"): OpenApiTypes.BINARY,
            302: OpenApiResponse(description="Redirect to a presigned object-store URL (S3 storage)."),
            403: ERROR,
            410: ERROR,
            416: OpenApiResponse(description="Range not satisfiable."),
        },
    )
    def get(self, request, name, version, hardware):
        found = version_get(model_name=name, version=version)
        if found.state == ModelVersion.State.REVOKED:
            raise ApiError(
                f"{found} has been revoked; its artifacts may no longer be downloaded.",
                code="version_revoked",
                status_code=410,
            )
        require_directed(request, found, hardware)
        artifact = artifact_get(version=found, hardware_id=hardware)
        return artifact_response(request, artifact=artifact, storage=artifact_storage())


class AliasList(APIView):
    @extend_schema(
        parameters=[
            OpenApiParameter(
                "at",
                OpenApiTypes.DATETIME,
                description="Show each alias as it stood at this instant (ISO 8601), between 1970-01-01 "
                "and 3000-01-01 UTC (registry.limits).",
                # The years wholly inside that range, whatever the UTC offset.
                pattern="^(197[1-9]|19[89][0-9]|2[0-8][0-9]{2}|29[0-8][0-9]|299[0-8])-",
            )
        ],
        responses={200: AliasSerializer(many=True), 400: ERROR},
    )
    def get(self, request, name):
        model = model_get(name=name)
        at = request.query_params.get("at")
        rows = aliases_list(model=model, at=parse_instant(at) if at is not None else None)
        return Response(AliasSerializer(rows, many=True).data)


class AliasDetail(APIView):
    required_scopes = {"PUT": ("ci", "operator")}

    @extend_schema(responses={200: AliasSerializer, 404: ERROR})
    def get(self, request, name, alias):
        model = model_get(name=name)
        rows = [row for row in aliases_list(model=model) if row["name"] == alias]
        if not rows:
            raise not_found(f"Model '{name}' has no alias '{alias}'.", "alias_not_found")
        return Response(AliasSerializer(rows[0]).data)

    @extend_schema(request=AliasSetSerializer, responses={200: AliasSerializer, 404: ERROR, 409: ERROR})
    def put(self, request, name, alias):
        model = model_get(name=name)
        data = _valid(AliasSetSerializer, request)
        alias_set(model=model, name=alias, version_name=data["version"], actor=actor_label(request.user))
        row = next(row for row in aliases_list(model=model) if row["name"] == alias)
        return Response(AliasSerializer(row).data)


class KeyList(APIView):
    """GET: the public keys devices pin. POST (admin): register a release public key."""

    @extend_schema(responses={200: PublicKeySerializer(many=True), 503: ERROR})
    def get(self, request):
        return Response([info.as_dict() for info in keys.public_keys()])

    @extend_schema(request=ReleaseKeyCreateSerializer, responses={201: ReleaseKeySerializer, 409: ERROR})
    def post(self, request):
        data = _valid(ReleaseKeyCreateSerializer, request)
        row = keys.release_key_register(
            public_key_pem_text=data["public_key_pem"], role=data["role"], actor=actor_label(request.user)
        )
        return Response(ReleaseKeySerializer(row).data, status=status.HTTP_201_CREATED)


class RegisteredKeyList(generics.ListAPIView):
    """Registered release public keys, revoked ones included (admins)."""

    read_scope = "admin"
    serializer_class = ReleaseKeySerializer
    queryset = ReleaseKey.objects.order_by("created_at", "id")


class RegisteredKeyRevoke(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("keyid", str, OpenApiParameter.PATH, pattern="^[0-9a-f]{64}$",
                                     description="hex SHA-256 of the raw Ed25519 public key")],
        request=ReasonSerializer,
        responses={200: ReleaseKeySerializer, 404: ERROR, 409: ERROR},
    )
    def post(self, request, keyid):
        data = _valid(ReasonSerializer, request)
        row = keys.release_key_revoke(keyid=keyid, actor=actor_label(request.user), reason=data["reason"])
        return Response(ReleaseKeySerializer(row).data)


class ApiTokenList(generics.ListAPIView):
    """API tokens with their expiry and last use (admins), e.g. for a job that warns before a CI
    token expires. Read-only on purpose: tokens are made and revoked with `manage.py tokens` or on
    the web UI's Access page, so a leaked admin token cannot mint itself successors."""

    read_scope = "admin"
    serializer_class = ApiTokenSerializer
    queryset = ApiToken.objects.order_by("-created_at", "-id")


def _valid(serializer_class, request) -> dict:
    serializer = serializer_class(data=request.data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data
