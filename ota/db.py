"""Database helpers shared by every room of ota."""

from __future__ import annotations

from django.db import connection


def bulk_set(rows: list, fields: list[str], *, batch_size: int = 2000) -> None:
    """Write `fields` of many rows of one model, each row with its own values, in one statement
    per batch.

    Django's bulk_update builds a CASE WHEN per field and row, which costs seconds of CPU for a
    wave of thousands; on PostgreSQL this is one UPDATE ... FROM (VALUES ...) instead. Every
    value is cast to its column's type in the VALUES list, so NULLs and JSON need no guessing.
    Other databases (SQLite, the zero-setup default) use bulk_update.
    """
    if not rows:
        return
    model = type(rows[0])
    if connection.vendor != "postgresql":
        model.objects.bulk_update(rows, fields, batch_size=min(batch_size, 200))
        return
    meta = model._meta
    pk = meta.pk
    columns = [pk, *(meta.get_field(name) for name in fields)]
    qn = connection.ops.quote_name
    row_sql = "(" + ", ".join(f"%s::{f.cast_db_type(connection)}" for f in columns) + ")"
    assignments = ", ".join(f"{qn(f.column)} = v.{qn(f.column)}" for f in columns[1:])
    names = ", ".join(qn(f.column) for f in columns)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        params: list = []
        for row in chunk:
            params.append(pk.get_db_prep_save(row.pk, connection))
            params.extend(f.get_db_prep_save(getattr(row, f.attname), connection) for f in columns[1:])
        sql = (
            f"UPDATE {qn(meta.db_table)} AS t SET {assignments} "
            f"FROM (VALUES {', '.join([row_sql] * len(chunk))}) AS v({names}) "
            f"WHERE t.{qn(pk.column)} = v.{qn(pk.column)}"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
