"""JSON errors everywhere: API clients (CI scripts) never see an HTML page."""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.exceptions import (
    PermissionDenied,
    RequestDataTooBig,
    SuspiciousOperation,
)
from django.core.exceptions import (
    ValidationError as DjangoValidationError,
)
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler

logger = logging.getLogger(__name__)


class ApiError(exceptions.APIException):
    """A business-rule refusal with a stable machine-readable `code`."""

    status_code = status.HTTP_400_BAD_REQUEST

    def __init__(self, message: str, *, code: str, status_code: int = 400, **extra):
        super().__init__(detail=message, code=code)
        self.status_code = status_code
        self.extra = extra


class Conflict(ApiError):
    def __init__(self, message: str, *, code: str = "conflict", **extra):
        super().__init__(message, code=code, status_code=status.HTTP_409_CONFLICT, **extra)


def not_found(message: str, code: str = "not_found") -> ApiError:
    return ApiError(message, code=code, status_code=404)


def _flatten(detail) -> str:
    if isinstance(detail, dict):
        return "; ".join(f"{k}: {_flatten(v)}" for k, v in detail.items())
    if isinstance(detail, list):
        return " ".join(_flatten(v) for v in detail)
    return str(detail)


def json_exception_handler(exc, context):
    if isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(exc.message_dict if hasattr(exc, "error_dict") else exc.messages)
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound(str(exc) or "Not found.")
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied(str(exc) or "Permission denied.")
    elif isinstance(exc, RequestDataTooBig):
        # Django refuses non-file bodies over DATA_UPLOAD_MAX_MEMORY_SIZE; without this it is a 500.
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        exc = ApiError(
            f"Request body is larger than the {limit}-byte limit for non-file data; "
            "send artifacts as the multipart 'file' field.",
            code="request_too_large",
            status_code=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            limit=limit,
        )
    elif isinstance(exc, SuspiciousOperation):
        exc = ApiError(str(exc) or "Malformed request.", code="bad_request")
    response = exception_handler(exc, context)
    if response is None:
        logger.exception("unhandled API error", exc_info=exc)
        return Response(
            {"error": {"code": "server_error", "message": "Internal server error; see the server log."}},
            status=500,
        )
    if isinstance(exc, exceptions.ValidationError):
        body = {"error": {"code": "invalid", "message": _flatten(exc.detail), "fields": exc.detail}}
    else:
        codes = exc.get_codes() if hasattr(exc, "get_codes") else "error"
        body = {"error": {"code": codes if isinstance(codes, str) else "error", "message": _flatten(exc.detail)}}
        body["error"].update(getattr(exc, "extra", {}))
    response.data = body
    return response
