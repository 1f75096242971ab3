"""PostgreSQL connections: a pool whose every connection has pgvector types and session limits."""

from __future__ import annotations

from typing import Any

import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg_pool import ConnectionPool

from vecpipe.config import DatabaseConfig, redact_url
from vecpipe.errors import Unreachable

__all__ = ["check_database", "connect", "make_pool"]


def _session_setup(conn: psycopg.Connection[Any], db: DatabaseConfig) -> None:
    conn.execute(
        sql.SQL("SET search_path TO {}, public").format(sql.Identifier(db.schema))
    )
    conn.execute(sql.SQL("SET statement_timeout = {}").format(
        sql.Literal(db.statement_timeout_ms)))


def connect(db: DatabaseConfig, *, vector_types: bool = True,
            autocommit: bool = False) -> psycopg.Connection[Any]:
    """One connection with the session settings (and pgvector types unless told otherwise)."""
    try:
        conn = psycopg.connect(db.url, connect_timeout=db.connect_timeout_s,
                               autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise Unreachable(
            f"Cannot connect to PostgreSQL at {redact_url(db.url)} (database.url, "
            f"VECPIPE_DATABASE_URL): {str(exc).strip().splitlines()[-1]}."
        ) from None
    _session_setup(conn, db)
    if vector_types:
        _register(conn, db)
    if not autocommit:
        conn.commit()
    return conn


def _register(conn: psycopg.Connection[Any], db: DatabaseConfig) -> None:
    try:
        register_vector(conn)
    except psycopg.ProgrammingError:
        raise Unreachable(
            f"The vector extension is not installed in {redact_url(db.url)}; run "
            "'vecpipe migrate' first."
        ) from None


def check_database(db: DatabaseConfig, *, migrated: bool = False) -> None:
    """Raise :class:`Unreachable` with a one-sentence reason unless the database answers.

    With ``migrated``, also require the vector extension and the chunks table.
    """
    with connect(db, vector_types=migrated, autocommit=True) as conn:
        if migrated and conn.execute("SELECT to_regclass('chunks')").fetchone() == (None,):
            raise Unreachable(
                f"The schema {db.schema!r} (database.schema, VECPIPE_DB_SCHEMA) has no chunks "
                "table; run 'vecpipe migrate' first."
            )


def make_pool(db: DatabaseConfig, *, name: str = "vecpipe") -> ConnectionPool[Any]:
    """A connection pool whose connections have pgvector types, search_path and timeouts."""

    def configure(conn: psycopg.Connection[Any]) -> None:
        _session_setup(conn, db)
        register_vector(conn)
        conn.commit()

    check_database(db, migrated=True)
    pool: ConnectionPool[Any] = ConnectionPool(
        db.url,
        min_size=db.pool_min,
        max_size=db.pool_max,
        kwargs={"connect_timeout": db.connect_timeout_s},
        configure=configure,
        name=name,
        open=False,
        # A connection that died with the server is found and replaced before it is handed out.
        check=ConnectionPool.check_connection,
    )
    pool.open(wait=True, timeout=db.connect_timeout_s * 3)
    return pool
