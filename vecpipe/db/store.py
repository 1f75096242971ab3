"""The chunks store: idempotent merges, deletes (``vecpipe.db.erase``), and vector look-ups.

One batch is one transaction: the batch's per-tenant locks, then its deletes, then COPY (FORMAT
BINARY) into a temporary staging table, record the newest version of each document, merge the
chunks with INSERT ... ON CONFLICT, and remove the chunks a shorter new version no longer has.
Every statement takes rows in key order,
so concurrent writers on overlapping keys queue behind each other instead of deadlocking; and
because the merge is idempotent, a batch retried after a deadlock, serialization failure or lost
connection leaves the database as if it had run once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from pgvector import HalfVector, Vector
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from vecpipe.config import Config
from vecpipe.db.erase import DeleteRequest, Eraser, lock_tenants
from vecpipe.db.pool import deadline, local_timeout
from vecpipe.db.schema import (
    CHANGES,
    KEY,
    MERGED,
    STAGING,
    copy_types,
    staging_name,
    staging_table,
)
from vecpipe.messages import ChunkGap

__all__ = ["MergeStats", "Row", "Store", "collapse"]

# Staging is TEMPORARY (``vecpipe.db.schema.staging_table``): it is private to the server
# connection (concurrent writers never see each other's rows), is not WAL-logged (it only lives
# for the transaction, so it needs no crash safety), and is emptied on commit. ON COMMIT DELETE
# ROWS keeps its definition per connection, so a batch pays for a COPY, not for a CREATE.

# 1. The newest version of each document: a version lower than the stored one changes nothing;
#    a deleted document is revived only by a newer version, and never by a chunk published
#    before a deletion without a version (of the document or of its tenant).
_DOCUMENTS = """
INSERT INTO {schema}.documents AS d
    (tenant_id, doc_id, version, chunk_count, deleted, published_at)
SELECT DISTINCT ON (s.tenant_id, s.doc_id) s.tenant_id, s.doc_id, s.doc_version, s.chunk_count,
       false, s.published_at
FROM {staging} s
LEFT JOIN {schema}.tenant_deletions t ON t.tenant_id = s.tenant_id
LEFT JOIN {schema}.documents o ON o.tenant_id = s.tenant_id AND o.doc_id = s.doc_id
WHERE (t.deleted_before IS NULL OR s.published_at > t.deleted_before)
  AND (o.deleted_before IS NULL OR s.published_at > o.deleted_before)
ORDER BY s.tenant_id, s.doc_id, s.doc_version DESC, s.published_at DESC
ON CONFLICT (tenant_id, doc_id) DO UPDATE
SET version = EXCLUDED.version, chunk_count = EXCLUDED.chunk_count, deleted = false,
    published_at = EXCLUDED.published_at, updated_at = now()
WHERE d.version < EXCLUDED.version
   -- Deleted without a version: the same version published again after the delete (the rows
   -- published before it were filtered out above) brings the document back.
   OR (d.deleted AND d.deleted_before IS NOT NULL AND d.version = EXCLUDED.version
       AND (d.deleted_version IS NULL OR d.deleted_version < EXCLUDED.version))
   -- The same version published again: a delete published between the two must not remove
   -- what the second publication restated, so the stored version's time moves up to it.
   OR (NOT d.deleted AND d.version = EXCLUDED.version
       AND (d.published_at IS NULL OR d.published_at < EXCLUDED.published_at))
"""

# 2. Merge the chunks of each document's newest version. A row is rewritten only when its
#    content or its model changed (the columns ``schema.CHANGES`` lists): re-ingesting
#    unchanged content updates nothing. The full-text column follows the content.
_MERGE = """
INSERT INTO {schema}.chunks AS c ({merged}, content_tsv)
SELECT {staged}, to_tsvector({config}::regconfig, s.content)
FROM {staging} s
JOIN {schema}.documents d ON d.tenant_id = s.tenant_id AND d.doc_id = s.doc_id
WHERE NOT s.gap AND s.doc_version = d.version AND NOT d.deleted AND s.chunk_index < d.chunk_count
  AND (d.deleted_before IS NULL OR s.published_at > d.deleted_before)
ORDER BY s.tenant_id, s.doc_id, s.chunk_index
ON CONFLICT (tenant_id, doc_id, chunk_index) DO UPDATE
SET {updates}, content_tsv = EXCLUDED.content_tsv, written_at = now()
WHERE c.doc_version <= EXCLUDED.doc_version
  AND ({stored_changes}) IS DISTINCT FROM ({new_changes})
RETURNING (xmax = 0) AS inserted
"""


def _merge_statement(schema: sql.Identifier, staging: sql.Composed,
                     text_config: str) -> sql.Composed:
    def names(prefix: str, columns: Sequence[str]) -> sql.Composed:
        return sql.SQL(", ").join(sql.SQL(prefix) + sql.Identifier(c) for c in columns)

    updates = sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c))
                                 for c in MERGED if c not in KEY)
    return sql.SQL(_MERGE).format(
        schema=schema, staging=staging, merged=names("", MERGED), staged=names("s.", MERGED),
        updates=updates, config=sql.Literal(text_config),
        stored_changes=names("c.", CHANGES), new_changes=names("EXCLUDED.", CHANGES))


# 3. A chunk of the newest version that will not arrive (vecpipe.chunk.gap): an older version's
#    chunk with other content at its index goes too, so that search never serves a mix of two
#    versions of a document. The slot stays empty until the dead letter is replayed.
_GAPS = """
DELETE FROM {schema}.chunks c
USING {staging} s, {schema}.documents d
WHERE s.gap AND c.tenant_id = s.tenant_id AND c.doc_id = s.doc_id
  AND c.chunk_index = s.chunk_index
  AND d.tenant_id = s.tenant_id AND d.doc_id = s.doc_id AND s.doc_version = d.version
  AND NOT d.deleted AND (d.deleted_before IS NULL OR s.published_at > d.deleted_before)
  AND c.doc_version < s.doc_version AND c.content_hash <> s.content_hash
"""

# 4. A version with fewer chunks than the one before: the chunks past its end go.
_STALE = """
DELETE FROM {schema}.chunks c
USING (SELECT DISTINCT tenant_id, doc_id FROM {staging}) s, {schema}.documents d
WHERE c.tenant_id = s.tenant_id AND c.doc_id = s.doc_id
  AND d.tenant_id = s.tenant_id AND d.doc_id = s.doc_id
  AND NOT d.deleted AND c.chunk_index >= d.chunk_count AND c.doc_version <= d.version
"""


@dataclass(frozen=True)
class Row:
    """One embedding to merge, with where it came from (for collapsing duplicates)."""

    tenant_id: str
    doc_id: str
    chunk_index: int
    doc_version: int
    chunk_count: int
    content_hash: str
    content: str
    char_start: int
    char_end: int
    source_uri: str
    metadata: dict[str, Any]
    embedding: npt.NDArray[np.float32] | None
    model_name: str
    model_revision: str
    model_backend: str
    embedded_at: datetime
    published_at: datetime
    # A chunk gap (vecpipe.chunk.gap): no content and no vector; it only empties its slot.
    gap: bool = False
    offset: int = 0

    @classmethod
    def gap_of(cls, gap: ChunkGap, published_at: datetime, offset: int) -> Row:
        """The row that stages a chunk gap."""
        return cls(gap.tenant_id, gap.doc_id, gap.chunk_index, gap.version, gap.chunk_count,
                   gap.content_hash, "", 0, 0, "", {}, None, "", "", "", published_at,
                   published_at, gap=True, offset=offset)

    def as_gap(self) -> Row:
        """The gap this row leaves when the database refuses it."""
        return replace(self, content="", char_start=0, char_end=0, source_uri="", metadata={},
                       embedding=None, model_name="", model_revision="", model_backend="",
                       embedded_at=self.published_at, gap=True)

    @property
    def key(self) -> tuple[str, str, int]:
        """(tenant, document, chunk index): the primary key."""
        return (self.tenant_id, self.doc_id, self.chunk_index)


@dataclass
class MergeStats:
    """What one batch did to the database."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    stale_deleted: int = 0
    deleted: int = 0
    gap_deleted: int = 0

    ACTIONS = ("inserted", "updated", "unchanged", "stale_deleted", "deleted", "gap_deleted")

    def add(self, other: MergeStats) -> None:
        """Accumulate ``other`` into this one."""
        for name in self.ACTIONS:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def collapse(rows: Sequence[Row]) -> list[Row]:
    """Keep one row per key, the newest (highest version, then a chunk over a gap, then offset),
    sorted by key.

    Two rows for one key in a single INSERT ... ON CONFLICT would fail with "cannot affect row a
    second time"; sorting by key makes every writer lock rows in the same order.
    """
    best: dict[tuple[str, str, int], Row] = {}
    for row in rows:
        cur = best.get(row.key)
        if cur is None or ((row.doc_version, not row.gap, row.offset)
                           > (cur.doc_version, not cur.gap, cur.offset)):
            best[row.key] = row
    return [best[k] for k in sorted(best)]


class Store:
    """Database operations of the writer, the search and the ops tools, over one pool."""

    def __init__(self, cfg: Config, pool: ConnectionPool[Any]) -> None:
        self.cfg = cfg
        self.pool = pool
        self.schema = sql.Identifier(cfg.database.schema)
        self._vtype = cfg.vector.column_type
        self._wrap: type[Vector] | type[HalfVector] = (
            HalfVector if self._vtype == "halfvec" else Vector)
        self._staging = staging_name(cfg.vector)
        self._merge_sql = _merge_statement(self.schema, self._staging,
                                           cfg.database.text_search_config)
        self._eraser = Eraser(cfg.database.schema)
        self._copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            self._staging, sql.SQL(", ").join(map(sql.Identifier, STAGING)))

    def _q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(schema=self.schema, staging=self._staging)

    def apply(self, rows: Sequence[Row], deletes: Sequence[DeleteRequest],
              worker_id: str = "", progress: Callable[[], None] = lambda: None) -> MergeStats:
        """Apply deletes, then merge ``rows``, in one transaction. Idempotent.

        ``progress`` is called after each bounded step of the deletes; each step also renews
        the deadline, so a large tenant deletion is cut only if one step stalls.
        """
        stats = MergeStats()
        with (self.pool.connection() as conn,
              deadline(conn, self.cfg.database.call_timeout_s) as clock, conn.transaction()):
            local_timeout(conn, self.cfg.database.statement_timeout_ms)

            def step() -> None:
                clock.renew()
                progress()

            def waiting() -> None:
                step()
                self._eraser.log.info("waiting_for_tenant_deletion", worker_id=worker_id)

            # Document deletes take their tenant's lock shared, as merges do: a tenant deletion
            # on another writer then never holds a document row this one waits for.
            lock_tenants(conn, self.cfg.database.schema,
                         shared={r.tenant_id for r in rows} | {d.tenant_id for d in deletes},
                         exclusive={d.tenant_id for d in deletes if d.doc_id is None},
                         waiting=waiting)
            stats.deleted += self._eraser.apply(conn, deletes, worker_id, step)
            merged = collapse(rows)
            if merged:
                stats.add(self._merge(conn, merged))
        return stats

    def _merge(self, conn: psycopg.Connection[Any], rows: list[Row]) -> MergeStats:
        conn.execute(staging_table(self.cfg.vector))
        with conn.cursor() as cur:
            with cur.copy(self._copy_sql) as copy:
                copy.set_types(copy_types(self.cfg.vector))
                for r in rows:
                    copy.write_row((
                        r.tenant_id, r.doc_id, r.chunk_index, r.doc_version, r.chunk_count,
                        bytes.fromhex(r.content_hash), r.content, r.char_start, r.char_end,
                        r.source_uri, Jsonb(r.metadata),
                        None if r.embedding is None else self._wrap(r.embedding),
                        r.model_name, r.model_revision, r.model_backend, r.embedded_at,
                        r.published_at, r.gap,
                    ))
            cur.execute(self._q(_DOCUMENTS))
            cur.execute(self._merge_sql)
            flags = [row[0] for row in cur.fetchall()]
            gapped = 0
            if any(r.gap for r in rows):
                cur.execute(self._q(_GAPS))
                gapped = max(cur.rowcount, 0)
            cur.execute(self._q(_STALE))
            stale = cur.rowcount
        inserted = sum(1 for f in flags if f)
        chunks = sum(1 for r in rows if not r.gap)
        return MergeStats(inserted=inserted, updated=len(flags) - inserted,
                          unchanged=chunks - len(flags), stale_deleted=max(stale, 0),
                          gap_deleted=gapped)

    def cached_vectors(
        self, hashes: Sequence[str], model: str, revision: str, backend: str,
        timeout_s: float = 2.0,
    ) -> dict[str, npt.NDArray[np.float32]]:
        """Stored vectors for content hashes embedded by this exact model and backend.

        Reuse crosses tenants (equal text, equal vector), so it goes through the SECURITY DEFINER
        function of migration 0004, which returns hashes and vectors only: the embedder needs no
        read access to chunks, and never sees another tenant's text or documents. The lookup
        waits at most ``timeout_s`` for a connection: while the database is away the embedder
        must encode instead of waiting for an optional cache, behind a pooler too.
        """
        if not hashes:
            return {}
        # The whole lookup, not only the wait for a pooled connection, is bounded: behind a
        # transaction pooler the connection is always there and the wait for a server (down
        # for a restart) happens inside the query.
        with self.pool.connection(timeout=timeout_s) as conn, deadline(conn, timeout_s):
            rows = conn.execute(self._q(
                "SELECT content_hash, embedding FROM {schema}.cached_vectors(%s, %s, %s, %s)"),
                ([bytes.fromhex(h) for h in hashes], model, revision, backend),
            ).fetchall()
        return {bytes(h).hex(): _as_array(v) for h, v in rows}

    # Published-at of messages without a timestamp (should not happen with Kafka >= 0.10).
    @staticmethod
    def epoch() -> datetime:
        """The earliest time, for records without a timestamp."""
        return datetime(1970, 1, 1, tzinfo=UTC)


def _as_array(value: Any) -> npt.NDArray[np.float32]:
    if isinstance(value, Vector | HalfVector):
        return np.asarray(value.to_numpy(), dtype=np.float32)
    return np.asarray(value, dtype=np.float32)
