"""Devices and enrollment API. Thin: parse, call ota.fleet.enrollment or .revocation, shape the response."""

from __future__ import annotations

from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, status
from rest_framework.response import Response
from rest_framework.views import APIView

from ota.fleet.enrollment import device_enroll, enrollment_token_create, enrollment_token_revoke
from ota.fleet.parsing import LABEL_KEY_RE, parse_label_filter
from ota.fleet.revocation import device_revoke
from ota.fleet.selectors import devices_filter, devices_with_states
from ota.fleet.serializers import (
    DeviceDetailSerializer,
    DeviceSerializer,
    EnrollmentTokenCreateSerializer,
    EnrollmentTokenSerializer,
    EnrollRequestSerializer,
    KeyringPushedSerializer,
    KeyringPushSerializer,
    KeyringSerializer,
)
from ota.fleet.keyring import keyring_push_and_publish
from registry.keyrings import current_keyring
from ota.models import Device, EnrollmentToken
from registry.auth import actor_label
from registry.errors import ApiError
from registry.schema import ERROR

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def _valid(serializer_class, request):
    serializer = serializer_class(data=request.data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


class EnrollmentTokenListCreate(generics.ListAPIView):
    read_scope = "admin"
    write_scope = "admin"
    serializer_class = EnrollmentTokenSerializer
    queryset = EnrollmentToken.objects.order_by("-created_at", "-id")

    @extend_schema(
        request=EnrollmentTokenCreateSerializer,
        responses={201: OpenApiResponse(description="The token row plus `token`, the secret, shown once.")},
    )
    def post(self, request):
        data = _valid(EnrollmentTokenCreateSerializer, request)
        token, secret = enrollment_token_create(
            max_uses=data["max_uses"],
            expires_in=data.get("expires_in"),
            labels=data["labels"],
            name=data["name"],
            created_by=actor_label(request.user),
        )
        return Response({**EnrollmentTokenSerializer(token).data, "token": secret}, status=status.HTTP_201_CREATED)


class EnrollmentTokenRevoke(APIView):
    write_scope = "admin"

    @extend_schema(request=None, responses={200: EnrollmentTokenSerializer, 404: ERROR})
    def post(self, request, pk):
        get_object_or_404(EnrollmentToken, pk=pk)
        token = enrollment_token_revoke(token_id=pk, actor=actor_label(request.user))
        return Response(EnrollmentTokenSerializer(token).data)


class Enroll(APIView):
    """Device side: authenticated by the enrollment token, never by a user or device token."""

    authentication_classes: list = []
    permission_classes: list = []

    @extend_schema(
        request=EnrollRequestSerializer,
        responses={201: OpenApiResponse(description="Device id, MQTT credentials, device API token, pinned keys."),
                   400: ERROR, 401: ERROR, 403: ERROR, 503: ERROR},
    )
    def post(self, request):
        data = _valid(EnrollRequestSerializer, request)
        secret = data["token"] or request.headers.get("X-Enrollment-Token", "")
        if not secret:
            auth = request.headers.get("Authorization", "")
            if auth.lower().startswith("bearer "):
                secret = auth.split(None, 1)[1].strip()
        enrollment = device_enroll(
            token_secret=secret, hardware=data["hardware"], labels=data["labels"], name=data["name"]
        )
        return Response(enrollment.agent_settings(), status=status.HTTP_201_CREATED)


class DeviceList(generics.ListAPIView):
    serializer_class = DeviceSerializer

    @extend_schema(
        parameters=[
            OpenApiParameter("label", OpenApiTypes.STR, many=True, description="key=value (repeat to AND), or key",
                             pattern=LABEL_KEY_RE.pattern.removesuffix(r"\Z") + "(=.*)?$"),
            OpenApiParameter("hardware", OpenApiTypes.STR),
            OpenApiParameter("model", OpenApiTypes.STR, description="devices that report this model"),
            OpenApiParameter("version", OpenApiTypes.STR, description="with model: devices running this version"),
            OpenApiParameter("online", OpenApiTypes.BOOL),
            OpenApiParameter("state", OpenApiTypes.STR, enum=["active", "revoked"]),
        ],
        responses={200: DeviceSerializer(many=True), 400: ERROR},
    )
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    def get_queryset(self):
        params = self.request.query_params
        try:
            labels = [parse_label_filter(raw) for raw in params.getlist("label")]
        except ValueError as exc:
            raise ApiError(str(exc), code="invalid_filter") from None
        model, version = params.get("model", ""), params.get("version", "")
        if version and not model:
            raise ApiError("the version filter needs a model filter too (model=NAME&version=V)", code="invalid_filter")
        online = None
        if params.get("online") is not None:
            value = params["online"].lower()
            if value not in _TRUE | _FALSE:
                raise ApiError(f"online must be true or false, got {params['online']!r}", code="invalid_filter")
            online = value in _TRUE
        state = params.get("state", "")
        if state and state not in Device.State.values:
            raise ApiError(f"state must be one of {', '.join(Device.State.values)}", code="invalid_filter")
        return devices_filter(
            devices_with_states(), labels=labels, hardware=params.get("hardware", ""), state=state, online=online,
            model=model, version=version,
        ).order_by("id")


class DeviceDetail(APIView):
    @extend_schema(responses={200: DeviceDetailSerializer, 404: ERROR})
    def get(self, request, pk):
        device = get_object_or_404(devices_with_states(), pk=pk)
        return Response(DeviceDetailSerializer(device).data)


class DeviceRevoke(APIView):
    write_scope = "admin"

    @extend_schema(request=None, responses={200: DeviceDetailSerializer, 404: ERROR, 503: ERROR})
    def post(self, request, pk):
        get_object_or_404(Device, pk=pk)
        device_revoke(device_id=pk, actor=actor_label(request.user))
        return Response(DeviceDetailSerializer(get_object_or_404(devices_with_states(), pk=pk)).data)


class KeyringView(APIView):
    """GET: the current root-signed keyring (404 `no_keyring` before the first). POST (admin): a
    keyring the offline root key signed (`fleetctl keyring push`): checked as devices check it,
    stored, audited and retained for the devices on the broker."""

    @extend_schema(responses={200: KeyringSerializer, 404: ERROR})
    def get(self, request):
        row = current_keyring()
        if row is None:
            raise ApiError("no keyring has been pushed", code="no_keyring", status_code=404)
        return Response(KeyringSerializer(row).data)

    @extend_schema(request=KeyringPushSerializer, responses={201: KeyringPushedSerializer, 409: ERROR, 503: ERROR})
    def post(self, request):
        data = _valid(KeyringPushSerializer, request)
        row, published = keyring_push_and_publish(envelope=data["envelope"], actor=actor_label(request.user))
        return Response({**KeyringSerializer(row).data, "published": published}, status=status.HTTP_201_CREATED)
