"""OpenAPI description of the bearer-token scheme (imported from RegistryConfig.ready), and the
postprocessing hook that documents the error responses every API operation shares."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiResponse


class BearerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "registry.auth.BearerTokenAuthentication"
    name = "bearerToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "`Authorization: Bearer <token>`; create one with `manage.py tokens create`. "
            "Scopes: read, ci, operator, admin (devices: device).",
        }


# The body of every refusal, as registry.errors.json_exception_handler and config.urls' handlers
# write it; `fields` only for validation errors, other keys (e.g. `limit`) as the error needs.
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "Stable machine-readable reason."},
                "message": {"type": "string"},
                "fields": {"type": "object", "description": "Per-field messages of a validation error."},
            },
        }
    },
}
ERROR_REF = {"$ref": "#/components/schemas/Error"}


def error_response(description: str = "Refused; `error.code` says why.") -> OpenApiResponse:
    """A refusal a view declares itself (409, 410, 503, ...), with the shared JSON error body."""
    return OpenApiResponse(response=ERROR_REF, description=description)


ERROR = error_response()

# Why each shared status can happen, for the operations it applies to (see document_errors).
COMMON_ERRORS = {
    "400": "Malformed request: a parameter, header or body field out of range, of the wrong type, or "
    "holding control characters.",
    "401": "No valid credentials: the token is missing, unknown, expired or revoked.",
    "403": "The credentials lack the scope this operation needs.",
    "404": "An object named in the path does not exist.",
    "413": "The request body is larger than the server accepts.",
    "415": "The request body's Content-Type is not one this operation reads.",
}


def document_errors(result, generator, request, public):
    """drf-spectacular postprocessing hook (SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"]): the one
    place that declares the refusals every operation shares, so no view repeats them and none is
    left undocumented. Any operation may answer 400; one behind authentication also 401 and 403;
    one with a path parameter 404; one with a body 413 and 415. A status the view declares itself
    is left as the view says (e.g. the download's body-less 416)."""
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    for path_item in result.get("paths", {}).values():
        for method, operation in path_item.items():
            if method not in {"get", "put", "post", "patch", "delete"}:
                continue
            responses = operation.setdefault("responses", {})
            applies = {"400"}
            if operation.get("security"):
                applies |= {"401", "403"}
            if any(p.get("in") == "path" for p in operation.get("parameters", [])):
                applies.add("404")
            if "requestBody" in operation:
                applies |= {"413", "415"}
            for status in sorted(applies):
                body = {"application/json": {"schema": ERROR_REF}}
                responses.setdefault(status, {"description": COMMON_ERRORS[status], "content": body})
    return result
