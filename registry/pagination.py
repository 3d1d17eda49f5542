"""The API's pagination (REST_FRAMEWORK's DEFAULT_PAGINATION_CLASS): DRF's limit/offset, with the
page size capped and an offset past registry.limits.MAX_PAGE_OFFSET refused (400 invalid_offset)
instead of reaching the database, where one past a bigint fails the query."""

from __future__ import annotations

from rest_framework import pagination

from registry.limits import MAX_PAGE_LIMIT, MAX_PAGE_OFFSET


class LimitOffsetPagination(pagination.LimitOffsetPagination):
    max_limit = MAX_PAGE_LIMIT

    def get_offset(self, request):
        offset = super().get_offset(request)
        if offset > MAX_PAGE_OFFSET:
            # Imported here: registry.errors imports DRF's views, which read the API settings.
            from registry.errors import ApiError

            raise ApiError(f"offset must be at most {MAX_PAGE_OFFSET}, got {offset}.", code="invalid_offset",
                           field="offset")
        return offset
