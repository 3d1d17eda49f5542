"""Rollout API views: thin wrappers over ota.rollouts (create, actions, selectors)."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, status
from rest_framework.response import Response
from rest_framework.views import APIView

from ota.models import ArtifactDelta, Rollout, RolloutDevice
from ota.rollouts.actions import rollout_act
from ota.rollouts.catalogue import BY_NAME, CREATE_SCOPES
from ota.rollouts.create import rollout_create
from ota.rollouts.deltas import delta_as_download
from ota.rollouts.serializers import (
    AuditEntrySerializer,
    RolloutCreateSerializer,
    RolloutDetailSerializer,
    RolloutDeviceSerializer,
    RolloutReasonSerializer,
    RolloutSerializer,
)
from registry.auth import actor_label
from registry.errors import ApiError
from registry.artifacts import artifact_storage
from registry.downloads import artifact_response
from registry.models import AuditEntry, ModelVersion
from registry.schema import ERROR


class RolloutListCreate(generics.ListCreateAPIView):
    """GET: rollouts, newest first (?state=running&model=NAME). POST: create a rollout (ci or operator)."""

    required_scopes = {"POST": CREATE_SCOPES}
    serializer_class = RolloutSerializer

    def get_queryset(self):
        qs = Rollout.objects.select_related("model", "release")
        params = self.request.query_params
        if params.get("state"):
            qs = qs.filter(state__in=params["state"].split(","))
        if params.get("model"):
            qs = qs.filter(model__name=params["model"])
        return qs

    def get_serializer_class(self):
        return RolloutCreateSerializer if self.request.method == "POST" else RolloutSerializer

    @extend_schema(request=RolloutCreateSerializer, responses={201: RolloutDetailSerializer, 400: ERROR, 409: ERROR})
    def post(self, request, *args, **kwargs):
        return self.create(request, *args, **kwargs)

    def create(self, request, *args, **kwargs):
        body = RolloutCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        rollout = rollout_create(**body.validated_data, actor=actor_label(request.user))
        return Response(RolloutDetailSerializer(rollout).data, status=status.HTTP_201_CREATED)


def _get(pk: int) -> Rollout:
    rollout = Rollout.objects.select_related("model", "release").filter(pk=pk).first()
    if rollout is None:
        raise ApiError(f"No rollout with id {pk}.", code="not_found", status_code=404)
    return rollout


class RolloutDetail(APIView):
    """State, definition, incompatible devices and, per wave, counts by device state."""

    @extend_schema(responses={200: RolloutDetailSerializer, 404: ERROR})
    def get(self, request, pk: int):
        return Response(RolloutDetailSerializer(_get(pk)).data)


class RolloutDevices(generics.ListAPIView):
    """Per-device progress in one rollout (?state=failed&wave=0), paginated."""

    serializer_class = RolloutDeviceSerializer

    def get_queryset(self):
        _get(self.kwargs["pk"])
        qs = RolloutDevice.objects.filter(rollout_id=self.kwargs["pk"]).select_related("wave", "previous_version")
        params = self.request.query_params
        if params.get("state"):
            qs = qs.filter(state__in=params["state"].split(","))
        if params.get("wave", "").isdigit():
            qs = qs.filter(wave__index=int(params["wave"]))
        return qs.order_by("rank")


class RolloutAction(APIView):
    """POST /rollouts/{id}/{action} for each action of ota.rollouts.catalogue (body: optional
    reason). Scopes and allowed states are the catalogue's."""

    action_name = ""

    @property
    def required_scopes(self):
        return {"POST": BY_NAME[self.action_name].scopes}

    @extend_schema(request=RolloutReasonSerializer, responses={200: RolloutDetailSerializer, 403: ERROR, 404: ERROR, 409: ERROR})
    def post(self, request, pk: int):
        body = RolloutReasonSerializer(data=request.data or {})
        body.is_valid(raise_exception=True)
        result = rollout_act(
            action=self.action_name, rollout_id=_get(pk).pk, actor=actor_label(request.user),
            reason=body.validated_data["reason"],
        )
        data = RolloutDetailSerializer(_get(pk)).data
        if self.action_name == "retry":
            data["retried"] = result
        return Response(data)


class AuditList(generics.ListAPIView):
    """The audit log, newest first (?object_type=rollout&object_id=7&action=rollout.start&actor=...)."""

    serializer_class = AuditEntrySerializer

    def get_queryset(self):
        qs = AuditEntry.objects.all()
        for param in ("object_type", "object_id", "action", "actor"):
            value = self.request.query_params.get(param)
            if value:
                qs = qs.filter(**{param: value})
        return qs



class DeltaDownload(APIView):
    """A delta artifact (ota.rollouts.deltas), for the devices directed to install its target."""

    read_scope = ("read", "device")

    @extend_schema(
        parameters=[OpenApiParameter("Range", OpenApiTypes.STR, OpenApiParameter.HEADER, required=False)],
        responses={
            (200, "application/octet-stream"): OpenApiTypes.BINARY,
            (206, "application/octet-stream"): OpenApiTypes.BINARY,
            302: OpenApiResponse(description="Redirect to a presigned object-store URL (S3 storage)."),
            403: ERROR,
            404: ERROR,
            416: OpenApiResponse(description="Range not satisfiable."),
        },
    )
    def get(self, request, pk: int):
        delta = (ArtifactDelta.objects.select_related("base", "target", "target__version")
                 .filter(pk=pk, state=ArtifactDelta.State.READY).first())
        if delta is None:
            raise ApiError(f"No ready delta {pk}.", code="not_found", status_code=404)
        if delta.target.version.state == ModelVersion.State.REVOKED:
            raise ApiError(f"{delta.target.version} has been revoked.", code="version_revoked",
                           status_code=410)
        may_download = getattr(request.user, "may_download", None)
        if may_download is not None and not may_download(version_id=delta.target.version_id,
                                                         hardware_id=delta.target.hardware_id):
            raise ApiError(f"{request.user.label} was not directed to install {delta.target.version}.",
                           code="not_directed", status_code=403)
        return artifact_response(request, artifact=delta_as_download(delta), storage=artifact_storage())
