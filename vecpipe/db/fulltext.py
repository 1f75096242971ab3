"""The full-text column of chunks: filling the rows written before it, and its GIN index.

The writer fills ``content_tsv`` with every row it merges. Rows written before migration 0009
are filled here in small batches, each its own short transaction (SKIP LOCKED, so two pods and a
writer never wait for each other), and the GIN index is built CONCURRENTLY once rows exist: the
column is added, filled and indexed while ingestion and search go on.
"""

from __future__ import annotations

from collections.abc import Callable

from psycopg import sql

from vecpipe.config import Config
from vecpipe.db.indexes import index_session, index_state
from vecpipe.db.pool import connect
from vecpipe.db.schema import lock_key

__all__ = ["TEXT_INDEX", "ensure_text_index", "fill_text"]

TEXT_INDEX = "chunks_content_tsv_idx"
_BATCH = 5000


def fill_text(cfg: Config, *, batch: int = _BATCH,
              progress: Callable[[int], None] | None = None) -> int:
    """Fill ``content_tsv`` where it is NULL; the number of rows filled."""
    db = cfg.database
    statement = sql.SQL(
        "UPDATE {t} SET content_tsv = to_tsvector({config}::regconfig, content)"
        " WHERE ctid = ANY (ARRAY(SELECT ctid FROM {t} WHERE content_tsv IS NULL"
        " LIMIT %(n)s FOR UPDATE SKIP LOCKED))").format(
        t=sql.Identifier(db.schema, "chunks"), config=sql.Literal(db.text_search_config))
    filled = 0
    with connect(db, vector_types=False, autocommit=True) as conn:
        while True:
            with conn.transaction():
                done = conn.execute(statement, {"n": batch}).rowcount
            if done <= 0:
                return filled
            filled += done
            if progress is not None:
                progress(filled)


def ensure_text_index(cfg: Config) -> bool:
    """Create the GIN index of ``content_tsv`` if it is missing; True when it was built.

    On an empty table, inside a transaction under the migration lock (instant); on a table with
    rows, CONCURRENTLY in a session of its own (the direct URL behind a pooler).
    """
    db = cfg.database
    target = sql.Identifier(db.schema, TEXT_INDEX)
    with connect(db, vector_types=False) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("migrate", db.schema),))
        state = index_state(conn, db.schema, TEXT_INDEX)
        if state == "valid":
            return False
        empty = conn.execute(sql.SQL("SELECT NOT EXISTS (SELECT FROM {})").format(
            sql.Identifier(db.schema, "chunks"))).fetchone() == (True,)
        if empty and state is None:
            conn.execute(sql.SQL("CREATE INDEX {} ON {} USING gin (content_tsv)").format(
                sql.Identifier(TEXT_INDEX), sql.Identifier(db.schema, "chunks")))
            conn.commit()
            return True
        conn.rollback()
    with index_session(cfg) as session:
        if index_state(session, db.schema, TEXT_INDEX) == "invalid":
            session.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(target))
        session.execute(sql.SQL(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} USING gin (content_tsv)").format(
            sql.Identifier(TEXT_INDEX), sql.Identifier(db.schema, "chunks")))
    return True
