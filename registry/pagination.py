"""The API's pagination (REST_FRAMEWORK's DEFAULT_PAGINATION_CLASS): DRF's limit/offset, with
both bounds checked. `?limit=` takes 1 to registry.limits.MAX_PAGE_LIMIT, `?offset=` 0 to
MAX_PAGE_OFFSET (one past a bigint fails the database query); anything else, `?limit=abc` and
`?offset=null` included (DRF would quietly answer the default page), is a 400 `invalid_limit`
or `invalid_offset` naming the parameter. The schema documents the same bounds."""

from __future__ import annotations

import re

from rest_framework import pagination

from registry.limits import MAX_PAGE_LIMIT, MAX_PAGE_OFFSET

_DIGITS = re.compile(r"[0-9]{1,12}")


def _bounded(raw: str, *, name: str, lo: int, hi: int) -> int:
    value = int(raw) if _DIGITS.fullmatch(raw) else None
    if value is None or not lo <= value <= hi:
        # Imported here: registry.errors imports DRF's views, which read the API settings.
        from registry.errors import ApiError

        raise ApiError(f"{name} must be a whole number from {lo} to {hi}, got {raw[:40]!r}.",
                       code=f"invalid_{name}", field=name)
    return value


class LimitOffsetPagination(pagination.LimitOffsetPagination):
    max_limit = MAX_PAGE_LIMIT

    def get_limit(self, request):
        raw = request.query_params.get(self.limit_query_param)
        if raw is None:
            return self.default_limit
        return _bounded(raw, name=self.limit_query_param, lo=1, hi=MAX_PAGE_LIMIT)

    def get_offset(self, request):
        raw = request.query_params.get(self.offset_query_param)
        if raw is None:
            return 0
        return _bounded(raw, name=self.offset_query_param, lo=0, hi=MAX_PAGE_OFFSET)

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        bounds = {self.limit_query_param: (1, MAX_PAGE_LIMIT), self.offset_query_param: (0, MAX_PAGE_OFFSET)}
        for parameter in parameters:
            if parameter["name"] in bounds:
                lo, hi = bounds[parameter["name"]]
                parameter["schema"] = {**parameter.get("schema", {}), "minimum": lo, "maximum": hi}
        return parameters
