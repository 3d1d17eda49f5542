"""Database helpers shared by every room of ota."""

from __future__ import annotations

from django.db import connection


def bulk_set(rows: list, fields: list[str], *, batch_size: int = 2000) -> None:
    """Write `fields` of many rows of one model in one statement per batch.

    Django's bulk_update builds a CASE WHEN per field and row, which costs seconds for a wave of
    thousands; on PostgreSQL this is one UPDATE ... FROM (VALUES ...) instead.
    """
    if not rows:
        return
    model = type(rows[0])
    if connection.vendor != "postgresql":
        model.objects.bulk_update(rows, fields, batch_size=batch_size)
        return
    meta = model._meta
    cols = [meta.get_field(name) for name in fields]
    pk = meta.pk
    qn = connection.ops.quote_name
    assignments = ", ".join(f"{qn(f.column)} = v.{qn(f.column)}::{f.db_type(connection)}" for f in cols)
    names = ", ".join(qn(c) for c in [pk.column, *[f.column for f in cols]])
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = 1 + len(cols)
        values = ", ".join(["(" + ", ".join(["%s"] * width) + ")"] * len(chunk))
        params = []
        for row in chunk:
            params.append(pk.get_db_prep_save(row.pk, connection))
            params.extend(f.get_db_prep_save(getattr(row, f.attname), connection) for f in cols)
        sql = (
            f"UPDATE {qn(meta.db_table)} AS t SET {assignments} FROM (VALUES {values}) AS v({names}) "
            f"WHERE t.{qn(pk.column)} = v.{qn(pk.column)}::{pk.db_type(connection) if pk.get_internal_type() != 'BigAutoField' else 'bigint'}"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
