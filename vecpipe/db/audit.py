"""The operators' trails: deletions (audit_log), replays (replay_audit), model lineage.

A replay records itself before it sends anything (:class:`ReplayAuditLog`): a replay that
cannot write its row does not run, and one killed mid-way leaves its row running.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from vecpipe.config import Config
from vecpipe.db.pool import connect
from vecpipe.errors import ReplayError, TransientError, Unreachable
from vecpipe.retry import call_with_retry

__all__ = ["AuditEntry", "ReplayAuditLog", "audit_trail", "lineage", "replay_trail"]

AuditEntry = dict[str, Any]


def _where(conditions: tuple[tuple[str, str, str, Any], ...],
           params: dict[str, Any]) -> sql.Composable:
    """``column op %(key)s`` for each condition whose value is given, joined by AND."""
    where: list[sql.Composable] = [sql.SQL("true")]
    for column, op, key, value in conditions:
        if value is not None:
            where.append(sql.SQL("{} {} {}").format(
                sql.Identifier(column), sql.SQL(op), sql.Placeholder(key)))
            params[key] = value
    return sql.SQL(" AND ").join(where)


def _rows(cfg: Config, query: sql.Composed, params: dict[str, Any]) -> list[AuditEntry]:
    with connect(cfg.database, vector_types=False, autocommit=True) as conn:
        cur = conn.execute(query, params)
        names = [c.name for c in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def audit_trail(cfg: Config, *, tenant: str | None = None, since: datetime | None = None,
                until: datetime | None = None, action: str | None = None,
                limit: int = 1000) -> list[AuditEntry]:
    """Deletions recorded in audit_log, oldest first, with the message that asked for each."""
    params: dict[str, Any] = {"limit": limit}
    where = _where((("tenant_id", "=", "tenant", tenant), ("at", ">=", "since", since),
                    ("at", "<", "until", until), ("action", "=", "action", action)), params)
    query = sql.SQL(
        "SELECT id, at, action, tenant_id, doc_id, doc_version, rows_deleted, applied, source"
        " FROM {}.audit_log WHERE {} ORDER BY at, id LIMIT %(limit)s"
    ).format(sql.Identifier(cfg.database.schema), where)
    return _rows(cfg, query, params)


def replay_trail(cfg: Config, *, since: datetime | None = None, until: datetime | None = None,
                 limit: int = 1000) -> list[AuditEntry]:
    """Replays recorded in replay_audit (started in [since, until)), newest first."""
    params: dict[str, Any] = {"limit": limit}
    where = _where((("started_at", ">=", "since", since),
                    ("started_at", "<", "until", until)), params)
    query = sql.SQL(
        "SELECT id, started_at, updated_at, finished_at, status, actor, worker, dlq_topic,"
        " consumer_group, dry_run, filters, ended, counts, error"
        " FROM {}.replay_audit WHERE {} ORDER BY started_at DESC, id DESC LIMIT %(limit)s"
    ).format(sql.Identifier(cfg.database.schema), where)
    try:
        return _rows(cfg, query, params)
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        raise ReplayError(f"{_no_table(cfg)}.") from None


def lineage(cfg: Config, *, tenant: str | None = None) -> list[AuditEntry]:
    """Which model (name, revision, backend) embedded how many chunks of each tenant, and when."""
    where = sql.SQL("WHERE tenant_id = %(tenant)s") if tenant else sql.SQL("")
    query = sql.SQL(
        "SELECT tenant_id, model_name, model_revision, model_backend, count(*) AS chunks,"
        " min(embedded_at) AS first_embedded, max(embedded_at) AS last_embedded"
        " FROM {}.chunks {} GROUP BY 1, 2, 3, 4 ORDER BY 1, 6"
    ).format(sql.Identifier(cfg.database.schema), where)
    return _rows(cfg, query, {"tenant": tenant})


# -- the replay audit ---------------------------------------------------------------------------

def _no_table(cfg: Config) -> str:
    return (f"the schema {cfg.database.schema!r} (database.schema, VECPIPE_DB_SCHEMA) has no "
            "replay_audit table; run 'vecpipe migrate' first")


def _reason(exc: BaseException) -> str:
    """The first line of a database error, without its trailing period."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")


_STARTED = """
INSERT INTO {schema}.replay_audit (actor, worker, dlq_topic, consumer_group, dry_run, filters)
VALUES (%(actor)s, %(worker)s, %(topic)s, %(group)s, %(dry_run)s, %(filters)s)
RETURNING id
"""

_PROGRESS = """
UPDATE {schema}.replay_audit SET counts = %(counts)s, updated_at = now()
WHERE id = %(id)s AND status = 'running'
"""

_FINISHED = """
UPDATE {schema}.replay_audit
SET status = %(status)s, ended = %(ended)s, counts = %(counts)s, error = %(error)s,
    finished_at = now(), updated_at = now()
WHERE id = %(id)s
"""


class ReplayAuditLog:
    """One replay's row in replay_audit: inserted (running) before the replay sends anything,
    updated with its counts as it goes, completed (done or failed) when it ends.

    Each write takes a connection of its own, so that a replay of hours does not depend on one
    session staying up. Every method raises :class:`ReplayError` with a sentence when it cannot
    write; the replay decides what that means (see ``workers.replay``).
    """

    def __init__(self, cfg: Config, *, actor: str, filters: dict[str, Any]) -> None:
        self.cfg = cfg
        self.actor = actor
        self.filters = filters
        self.row_id: int | None = None
        self._schema = sql.Identifier(cfg.database.schema)

    def _execute(self, text: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
        with connect(self.cfg.database, vector_types=False, autocommit=True) as conn:
            cur = conn.execute(sql.SQL(text).format(schema=self._schema), params)
            return cur.fetchone() if cur.description else None

    def started(self, topic: str, group: str, dry_run: bool) -> None:
        """Insert the row, status running; a :class:`ReplayError` means it was not written
        (and the replay must not run)."""
        refused = "so the replay did not run (it sends nothing before it has recorded itself)."
        params = {"actor": self.actor, "worker": self.cfg.ops.worker_id, "topic": topic,
                  "group": group, "dry_run": dry_run, "filters": Jsonb(self.filters)}
        try:
            row = self._execute(_STARTED, params)
        except Unreachable as exc:
            raise ReplayError(f"{str(exc).rstrip('.')}; {refused}") from None
        except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
            raise ReplayError(f"{_no_table(self.cfg)}; {refused}") from None
        except psycopg.Error as exc:
            raise ReplayError(
                f"cannot record the replay in {self.cfg.database.schema}.replay_audit "
                f"({_reason(exc)}); {refused}") from None
        assert row is not None  # INSERT ... RETURNING
        self.row_id = int(row[0])

    def progress(self, counts: dict[str, Any]) -> None:
        """Store the counts so far (once, no retry: the next report or the end will do)."""
        if self.row_id is None:
            return
        try:
            self._execute(_PROGRESS, {"id": self.row_id, "counts": Jsonb(counts)})
        except (Unreachable, psycopg.Error) as exc:
            raise ReplayError(f"could not store the progress of replay #{self.row_id} in "
                              f"replay_audit: {_reason(exc)}.") from None

    def finished(self, counts: dict[str, Any], ended: str | None, error: str | None) -> None:
        """Complete the row: done, or failed with ``error``; transient failures are retried
        (database.*, retry.*) before a :class:`ReplayError` says the row stays running."""
        if self.row_id is None:
            return
        params = {"id": self.row_id, "status": "failed" if error else "done", "ended": ended,
                  "counts": Jsonb(counts), "error": error}

        def write() -> None:
            try:
                self._execute(_FINISHED, params)
            except Unreachable as exc:
                raise TransientError(str(exc)) from None

        try:
            call_with_retry(self.cfg.retry, write)
        except (TransientError, psycopg.Error) as exc:
            raise ReplayError(
                f"could not complete replay #{self.row_id} in replay_audit ({_reason(exc)}): "
                "it stays 'running' there with the counts of its last progress report, and the "
                "replay_audit_incomplete log line holds the final ones.") from None
