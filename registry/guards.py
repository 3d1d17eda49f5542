"""The request guard: control characters are refused before any view runs, with a 400 naming
the field, so no entry (API, web UI, admin) hands PostgreSQL a NUL (which it cannot store, not
even in jsonb, and answers with an error) or keeps invisible characters in a name.

One middleware checks what every request has: the URL path and the query parameters; for the
web UI and the admin also the form fields. API bodies (JSON, form, multipart) are checked by the
API's parsers (registry/parsers.py, with the same functions here), after authentication: a
multipart body is an artifact upload, which must not be spooled for a caller not yet known.

The characters refused, and why tab, line feed and carriage return are not, are in
registry.limits (bad_character). JSONFormField holds the admin's JSON fields to the depth limit.
"""

from __future__ import annotations

import re

from django import forms
from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.db import models
from django.forms.fields import InvalidJSONInput
from django.http import HttpResponse, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.utils.html import escape

from registry.limits import MAX_JSON_DEPTH, bad_character, bad_character_message

API_PREFIX = "/api/"
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


class InvalidInput(Exception):
    """A refused request: `code` and `message` for the client, `field` naming what was refused."""

    def __init__(self, message: str, *, code: str, field: str, status: int = 400):
        super().__init__(message)
        self.message, self.code, self.field, self.status = message, code, field, status


def _quoted(text: str) -> str:
    """A name as it can be shown: the refused characters escaped (repr without the quotes)."""
    return repr(text)[1:-1]


def fields_check(items, *, where: str) -> None:
    """Query parameters or form fields ((name, value) pairs): InvalidInput naming the first
    parameter whose name or value holds a refused character."""
    for name, value in items:
        found = bad_character(name, name=True)
        if found:
            raise InvalidInput(
                bad_character_message(f"the name of {where} {_quoted(name)!r}", found),
                code="invalid_characters", field=_quoted(name),
            )
        found = bad_character(value) if isinstance(value, str) else None
        if found:
            raise InvalidInput(bad_character_message(f"{where} {name!r}", found), code="invalid_characters", field=name)


def path_check(path: str) -> None:
    found = bad_character(path, name=True)
    if found:
        raise InvalidInput(bad_character_message("the URL path", found), code="invalid_characters", field="path")


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def json_depth_check(text: str, *, max_depth: int = MAX_JSON_DEPTH) -> None:
    """InvalidInput when the JSON text nests arrays and objects deeper than `max_depth`. Counts
    the brackets outside strings (strings are cut out by a regular expression: linear, in C)
    before the parser, which recurses and on a body a few thousand levels deep raises
    RecursionError, sees the text."""
    depth = 0
    for bracket in _BRACKETS.findall(_JSON_STRING.sub("", text)):
        if bracket in "[{":
            depth += 1
            if depth > max_depth:
                raise InvalidInput(
                    f"The JSON body nests arrays and objects more than {max_depth} levels deep.",
                    code="too_deep", field="body",
                )
        else:
            depth -= 1


def json_check(data, *, path: str = "") -> None:
    """InvalidInput naming the first string (value or key) of a parsed JSON body that holds a
    refused character, by its path in the API's field notation (metadata.site, waves[0].name)."""
    if isinstance(data, str):
        found = bad_character(data)
        if found:
            raise InvalidInput(bad_character_message(path or "the body", found), code="invalid_characters",
                               field=path or "body")
    elif isinstance(data, dict):
        for key, value in data.items():
            found = bad_character(key, name=True)
            if found:
                where = f"a key of {path}" if path else "a top-level key"
                raise InvalidInput(bad_character_message(f"{where} ({_quoted(key)!r})", found),
                                   code="invalid_characters", field=path or "body")
            json_check(value, path=f"{path}.{key}" if path else key)
    elif isinstance(data, list):
        for index, value in enumerate(data):
            if isinstance(value, (str, dict, list)):
                json_check(value, path=f"{path}[{index}]")


def refusal(request, exc: InvalidInput) -> HttpResponse:
    """The answer to a refused request: the API's JSON error, or a plain page for people."""
    if request.path.startswith(API_PREFIX):
        error = {"code": exc.code, "message": exc.message, "field": exc.field}
        if exc.status == 413:
            error["limit"] = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return JsonResponse({"error": error}, status=exc.status)
    page = (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Bad request</title></head>"
        f"<body><h1>Bad request</h1><p>{escape(exc.message)}</p><p><a href=\"/\">Back to the overview</a></p>"
        "</body></html>"
    )
    return HttpResponse(page, status=exc.status, content_type="text/html; charset=utf-8")


def _form_data_check(request) -> None:
    try:
        post = request.POST  # parsed once; the view (and CSRF) read the same
    except RequestDataTooBig:
        raise InvalidInput(
            f"The form data is larger than the {settings.DATA_UPLOAD_MAX_MEMORY_SIZE}-byte limit.",
            code="request_too_large", field="body", status=413,
        ) from None
    except (MultiPartParserError, SuspiciousOperation) as exc:
        raise InvalidInput(f"The form data cannot be read: {exc}", code="bad_request", field="body") from None
    fields_check(multi_pairs(post), where="form field")
    files = request.FILES
    fields_check(((name, upload.name or "") for name, upload in multi_pairs(files)), where="file field")


def multi_pairs(multi):
    for name, values in multi.lists():
        for value in values:
            yield name, value


class RequestGuardMiddleware:
    """Refuses (400, before any view) a URL path, query parameter or web/admin form field with a
    control character; see the module docstring."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        try:
            path_check(request.path_info)
            fields_check(multi_pairs(request.GET), where="query parameter")
        except InvalidInput as exc:
            return refusal(request, exc)
        return self.get_response(request)

    def process_view(self, request, view_func, view_args, view_kwargs):
        if request.path.startswith(API_PREFIX) or request.method != "POST":
            return None
        if request.content_type not in FORM_TYPES:
            return None
        try:
            _form_data_check(request)
        except InvalidInput as exc:
            return refusal(request, exc)
        return None


class JSONFormField(forms.JSONField):
    """Django's form JSONField (the admin's, for model JSONFields) with the API body's depth limit:
    json.loads of a field nested a few thousand levels deep raises RecursionError, a 500 in the
    admin. Control characters are the middleware's (a form field)."""

    def to_python(self, value):
        if isinstance(value, str):
            try:
                json_depth_check(value)
            except InvalidInput as exc:
                raise forms.ValidationError(exc.message, code=exc.code) from None
        return super().to_python(value)

    def bound_data(self, data, initial):
        # Redisplaying the refused text parses it again: keep it as the text typed.
        if isinstance(data, str) and not self.disabled:
            try:
                json_depth_check(data)
            except InvalidInput:
                return InvalidJSONInput(data)
        return super().bound_data(data, initial)


# ModelAdmin.formfield_overrides for every admin with an editable JSONField.
ADMIN_FORMFIELD_OVERRIDES = {models.JSONField: {"form_class": JSONFormField}}
