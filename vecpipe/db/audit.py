"""The deletion trail (audit_log) and the model lineage of stored chunks, read for operators."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import sql

from vecpipe.config import Config
from vecpipe.db.pool import connect

__all__ = ["AuditEntry", "audit_trail", "lineage"]

AuditEntry = dict[str, Any]


def audit_trail(cfg: Config, *, tenant: str | None = None, since: datetime | None = None,
                until: datetime | None = None, action: str | None = None,
                limit: int = 1000) -> list[AuditEntry]:
    """Deletions recorded in audit_log, oldest first, with the message that asked for each."""
    where: list[sql.Composable] = [sql.SQL("true")]
    params: dict[str, Any] = {"limit": limit}
    for column, op, key, value in (("tenant_id", "=", "tenant", tenant),
                                   ("at", ">=", "since", since), ("at", "<", "until", until),
                                   ("action", "=", "action", action)):
        if value is not None:
            where.append(sql.SQL("{} {} {}").format(
                sql.Identifier(column), sql.SQL(op), sql.Placeholder(key)))
            params[key] = value
    query = sql.SQL(
        "SELECT id, at, action, tenant_id, doc_id, doc_version, rows_deleted, applied, source"
        " FROM {}.audit_log WHERE {} ORDER BY at, id LIMIT %(limit)s"
    ).format(sql.Identifier(cfg.database.schema), sql.SQL(" AND ").join(where))
    with connect(cfg.database, vector_types=False, autocommit=True) as conn:
        cur = conn.execute(query, params)
        names = [c.name for c in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def lineage(cfg: Config, *, tenant: str | None = None) -> list[AuditEntry]:
    """Which model (name, revision, backend) embedded how many chunks of each tenant, and when."""
    where = sql.SQL("WHERE tenant_id = %(tenant)s") if tenant else sql.SQL("")
    query = sql.SQL(
        "SELECT tenant_id, model_name, model_revision, model_backend, count(*) AS chunks,"
        " min(embedded_at) AS first_embedded, max(embedded_at) AS last_embedded"
        " FROM {}.chunks {} GROUP BY 1, 2, 3, 4 ORDER BY 1, 6"
    ).format(sql.Identifier(cfg.database.schema), where)
    with connect(cfg.database, vector_types=False, autocommit=True) as conn:
        cur = conn.execute(query, {"tenant": tenant})
        names = [c.name for c in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
