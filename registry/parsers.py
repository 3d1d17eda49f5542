"""The API's body parsers (REST_FRAMEWORK's DEFAULT_PARSER_CLASSES): DRF's, with the limits every
body is held to. A refusal is the house JSON error (registry/errors.py):

- larger than DATA_UPLOAD_MAX_MEMORY_SIZE (non-file data): 413 `request_too_large`. DRF hands
  JSON and form parsers request.body, where Django enforces it; the JSON parser also reads at
  most that much of whatever stream it is given, so the limit does not hang on DRF's internals;
- JSON nested deeper than registry.limits.MAX_JSON_DEPTH: 400 `too_deep` (not a RecursionError);
- a control character in any string or key, at any depth, or in a form field: 400
  `invalid_characters` naming the field (registry.guards).

CheckedJSONField holds a JSON field sent as text in a form (DRF parses it itself) to the same.
"""

from __future__ import annotations

import json

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from rest_framework import parsers, serializers
from rest_framework.exceptions import ParseError

from registry.guards import InvalidInput, multi_pairs, fields_check, json_check, json_depth_check


def _refuse(exc: InvalidInput):
    # Imported here: registry.errors imports DRF's views, whose APIView reads this setting.
    from registry.errors import ApiError

    return ApiError(exc.message, code=exc.code, status_code=exc.status, field=exc.field)


def _read_capped(stream) -> bytes:
    """The body, or RequestDataTooBig (errors.py answers 413) once it passes the limit."""
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    if limit is None:
        return stream.read()
    body = stream.read(limit + 1)
    if len(body) > limit:
        raise RequestDataTooBig("Request body exceeded settings.DATA_UPLOAD_MAX_MEMORY_SIZE.")
    return body


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


class JSONParser(parsers.JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            text = _read_capped(stream).decode(encoding)
        except UnicodeDecodeError as exc:
            raise ParseError(f"JSON parse error - the body is not {encoding} text: {exc}") from None
        try:
            json_depth_check(text)
            data = json.loads(text, parse_constant=_no_constant)
            json_check(data)
        except InvalidInput as exc:
            raise _refuse(exc) from None
        except (ValueError, RecursionError) as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
        return data


class FormParser(parsers.FormParser):
    def parse(self, stream, media_type=None, parser_context=None):
        data = super().parse(stream, media_type, parser_context)
        try:
            fields_check(multi_pairs(data), where="form field")
        except InvalidInput as exc:
            raise _refuse(exc) from None
        return data


class MultiPartParser(parsers.MultiPartParser):
    """Django's multipart parser already holds non-file fields to DATA_UPLOAD_MAX_MEMORY_SIZE."""

    def parse(self, stream, media_type=None, parser_context=None):
        parsed = super().parse(stream, media_type, parser_context)
        try:
            fields_check(multi_pairs(parsed.data), where="form field")
            fields_check(((name, upload.name or "") for name, upload in multi_pairs(parsed.files)), where="file field")
        except InvalidInput as exc:
            raise _refuse(exc) from None
        return parsed


class CheckedJSONField(serializers.JSONField):
    """DRF's JSONField, held to the JSON body's limits when its value arrives as text (a form or
    multipart field, which DRF parses with json.loads itself): depth and control characters."""

    def to_internal_value(self, data):
        if isinstance(data, str) and (self.binary or getattr(data, "is_json_string", False)):
            try:
                json_depth_check(data)
                value = json.loads(data, parse_constant=_no_constant)
                json_check(value, path=self.field_name or "")
            except InvalidInput as exc:
                raise _refuse(exc) from None
            except (ValueError, RecursionError):
                self.fail("invalid")
            return value
        return super().to_internal_value(data)
