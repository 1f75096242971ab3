"""Deletes: bounded by publish time, serialized against merges per tenant, audited once.

Four promises (the README's "Deleting a document or a tenant" says them to users):

- **Bounded in time.** A delete without a version removes what was published before it (its
  ``vecpipe.published_at``), whatever order messages arrive in: a delete delivered late never
  removes a version published after it, and one delivered twice changes nothing the second time.
  A delete with a version removes that version and older ones.
- **Holds under races.** A tenant deletion takes its tenant's lock exclusively, every merge and
  document delete takes the locks of its batch's tenants shared, all in key order, so a writer
  merging a document of the tenant on another partition either commits before the deletion
  (which then removes its rows) or waits and then sees the deletion (and keeps its rows out).
  Tenants share TENANT_LOCKS locks, so a batch never needs more than that many.
- **Any size.** A tenant is deleted STEP rows at a time, each step reported to ``progress``
  (which renews the writer's deadline): no statement runs long, however large the tenant.
- **Never blocked by its audit.** The audit row is written in a savepoint, its text cleaned of
  what jsonb cannot hold (U+0000); if it still fails, a minimal row is written, and if that fails
  too the deletion stands without it (both logged). A missing or forbidden audit table is fatal:
  the deletion rolls back with it. A redelivered delete writes no second row (request_key).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
import psycopg.errors
from psycopg import sql

from vecpipe.db.schema import lock_key
from vecpipe.logs import get_logger
from vecpipe.retry import is_fatal, is_transient

__all__ = ["DeleteRequest", "Eraser", "Probe", "erased", "lock_tenants", "tenant_lock"]


@dataclass(frozen=True)
class DeleteRequest:
    """A document (``doc_id``) or tenant deletion, with its message's provenance for the audit."""

    tenant_id: str
    doc_id: str | None
    version: int | None
    published_at: datetime
    source: dict[str, Any] = field(default_factory=dict)
    # The highest version of this document whose chunks came before the delete in its batch and
    # were dropped unmerged: the tombstone records it, as if they had been merged first.
    supersedes: int = 0

    @property
    def request_key(self) -> str:
        """The same delete, however often it is delivered or replayed, has the same key."""
        src = self.source
        ident = [self.tenant_id, self.doc_id, self.version, self.published_at.isoformat(),
                 src.get("requested_at"), src.get("reason")]
        return hashlib.sha256(json.dumps(ident, default=str).encode()).hexdigest()


# Tenants share this many locks (by a hash of their id): a batch of many tenants takes at most
# this many advisory locks, well inside the server's lock table (max_locks_per_transaction x
# max_connections), and a tenant deletion holds up only the merges of its bucket's tenants.
TENANT_LOCKS = 256


def tenant_lock(schema: str, tenant_id: str) -> int:
    """The advisory-lock key that serializes ``tenant_id``'s deletion against its merges."""
    bucket = int.from_bytes(hashlib.sha256(tenant_id.encode()).digest()[:4], "big")
    return lock_key("tenant", f"{schema}/{bucket % TENANT_LOCKS}")


# A writer waits for a tenant lock in steps of this long: between steps it shows progress and
# renews its deadline, so a long tenant deletion holds the writer up without failing it (one
# blocking wait would end at statement_timeout, and be retried until the batch gave up).
LOCK_STEP_MS = 5_000

_LOCK = """
SELECT CASE WHEN x THEN pg_advisory_xact_lock(k) ELSE pg_advisory_xact_lock_shared(k) END
FROM unnest(%s::bigint[], %s::boolean[]) AS u(k, x) ORDER BY k
"""


def lock_tenants(conn: psycopg.Connection[Any], schema: str, shared: Iterable[str],
                 exclusive: Iterable[str], waiting: Callable[[], None] = lambda: None) -> None:
    """Take the transaction's tenant locks, in key order (so that two writers never wait for
    each other in a cycle): exclusive for tenants being deleted, shared for the others.

    Called inside a transaction. Each try waits at most LOCK_STEP_MS, in a savepoint; a try
    that times out releases what it took, calls ``waiting`` and tries again.
    """
    wanted: dict[int, bool] = {}
    for t in shared:
        wanted.setdefault(tenant_lock(schema, t), False)
    for t in exclusive:
        wanted[tenant_lock(schema, t)] = True
    if not wanted:
        return
    keys = sorted(wanted)
    modes = [wanted[k] for k in keys]
    row = conn.execute("SELECT current_setting('lock_timeout')").fetchone()
    previous = row[0] if row else "0"
    while True:
        try:
            with conn.transaction():
                conn.execute("SELECT set_config('lock_timeout', %s, true)",
                             (f"{LOCK_STEP_MS}ms",))
                # Volatile functions in the select list run after the sort: key order.
                conn.execute(_LOCK, (keys, modes))
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (previous,))
            return
        except psycopg.errors.LockNotAvailable:
            waiting()


def _clean(value: Any) -> Any:
    """``value`` with U+0000, which jsonb cannot hold, replaced by U+FFFD in every string."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, Mapping):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


# A document delete. Without a version, the document is deleted only if its stored version was
# published before the delete; deleted_before moves in any case. With one, versions up to it go.
_DELETE_DOCUMENT = """
INSERT INTO {schema}.documents AS d
    (tenant_id, doc_id, version, chunk_count, deleted, deleted_before, deleted_version,
     published_at)
VALUES (%(t)s, %(d)s, greatest(%(v)s::bigint, %(s)s::bigint), 0, true,
        CASE WHEN %(v)s::bigint IS NULL THEN %(at)s::timestamptz END,
        greatest(%(v)s::bigint, CASE WHEN %(v)s::bigint IS NOT NULL THEN %(s)s::bigint END),
        NULL)
ON CONFLICT (tenant_id, doc_id) DO UPDATE
SET deleted = CASE WHEN %(v)s::bigint IS NULL
                   THEN d.deleted OR d.published_at IS NULL OR d.published_at <= %(at)s
                   ELSE true END,
    version = greatest(d.version, EXCLUDED.version),
    deleted_before = greatest(d.deleted_before, EXCLUDED.deleted_before),
    deleted_version = greatest(d.deleted_version, EXCLUDED.deleted_version),
    updated_at = now()
WHERE %(v)s::bigint IS NULL OR d.version <= %(v)s::bigint
RETURNING deleted
"""

# A tenant deletion: its documents whose stored version was published before it are deleted.
# A tenant may have millions of rows, so its documents and chunks go in steps of STEP rows, in
# key order from where the last step ended: every statement stays far inside statement_timeout,
# and each step renews the writer's deadline and shows the batch's progress.
STEP = 10_000

_DELETE_TENANT = """
INSERT INTO {schema}.tenant_deletions AS t (tenant_id, deleted_before) VALUES (%(t)s, %(at)s)
ON CONFLICT (tenant_id) DO UPDATE
SET deleted_before = greatest(t.deleted_before, EXCLUDED.deleted_before)
"""

_DELETE_TENANT_DOCUMENTS = """
WITH step AS (
    SELECT doc_id FROM {schema}.documents
    WHERE tenant_id = %(t)s AND doc_id > %(after)s
    ORDER BY doc_id LIMIT %(n)s
), done AS (
    UPDATE {schema}.documents d
    SET deleted = d.deleted OR d.published_at IS NULL OR d.published_at <= %(at)s,
        deleted_before = greatest(d.deleted_before, %(at)s), updated_at = now()
    FROM step WHERE d.tenant_id = %(t)s AND d.doc_id = step.doc_id
      AND (d.deleted_before IS NULL OR d.deleted_before < %(at)s)
)
SELECT (SELECT count(*) FROM step), (SELECT doc_id FROM step ORDER BY doc_id DESC LIMIT 1)
"""

_DELETE_TENANT_CHUNKS = """
WITH step AS (
    SELECT c.doc_id, c.chunk_index FROM {schema}.chunks c
    WHERE c.tenant_id = %(t)s AND (c.doc_id, c.chunk_index) > (%(after)s, %(index)s)
    ORDER BY c.doc_id, c.chunk_index LIMIT %(n)s
), gone AS (
    DELETE FROM {schema}.chunks c
    USING step, {schema}.documents d
    WHERE c.tenant_id = %(t)s AND c.doc_id = step.doc_id AND c.chunk_index = step.chunk_index
      AND d.tenant_id = %(t)s AND d.doc_id = c.doc_id
      AND (d.published_at IS NULL OR d.published_at <= %(at)s)
    RETURNING 1
)
SELECT (SELECT count(*) FROM step), (SELECT count(*) FROM gone), last.doc_id, last.chunk_index
FROM (SELECT doc_id, chunk_index FROM step ORDER BY doc_id DESC, chunk_index DESC LIMIT 1) last
"""

_AUDIT = """
INSERT INTO {schema}.audit_log
    (action, tenant_id, doc_id, doc_version, rows_deleted, applied, source, request_key)
VALUES (%(action)s, %(t)s, %(d)s, %(v)s, %(removed)s, %(applied)s, %(source)s, %(key)s)
ON CONFLICT (request_key) DO NOTHING
"""


class Eraser:
    """Applies deletes inside the writer's transaction (see the module docstring)."""

    def __init__(self, schema: str, log: Any = None) -> None:
        self.schema = schema
        self._schema = sql.Identifier(schema)
        self.log = log if log is not None else get_logger(component="erase")

    def _q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(schema=self._schema)

    def apply(self, conn: psycopg.Connection[Any], deletes: Sequence[DeleteRequest],
              worker_id: str, progress: Callable[[], None] = lambda: None) -> int:
        """Apply ``deletes`` in order of tenant and document; return the chunk rows removed.
        ``progress`` is called after every bounded step."""
        removed = 0
        for req in sorted(deletes, key=lambda r: (r.tenant_id, r.doc_id or "")):
            removed += (self._tenant(conn, req, worker_id, progress) if req.doc_id is None
                        else self._document(conn, req, worker_id))
            progress()
        return removed

    def _document(self, conn: psycopg.Connection[Any], req: DeleteRequest,
                  worker_id: str) -> int:
        params = {"t": req.tenant_id, "d": req.doc_id, "v": req.version,
                  "s": req.supersedes, "at": req.published_at}
        row = conn.execute(self._q(_DELETE_DOCUMENT), params).fetchone()
        applied = row is not None and bool(row[0])
        removed = 0
        if applied:
            cur = conn.execute(self._q(
                "DELETE FROM {schema}.chunks WHERE tenant_id = %s AND doc_id = %s"),
                (req.tenant_id, req.doc_id))
            removed = max(cur.rowcount, 0)
        self._audit(conn, "delete_document", req, removed, applied, worker_id)
        return removed

    def _tenant(self, conn: psycopg.Connection[Any], req: DeleteRequest, worker_id: str,
                progress: Callable[[], None]) -> int:
        params: dict[str, Any] = {"t": req.tenant_id, "at": req.published_at, "n": STEP}
        conn.execute(self._q(_DELETE_TENANT), params)
        after = ""
        while True:
            row = conn.execute(self._q(_DELETE_TENANT_DOCUMENTS),
                               {**params, "after": after}).fetchone()
            progress()
            if row is None or row[1] is None:
                break
            after = row[1]
            if row[0] < STEP:
                break
        removed, after, index = 0, "", -1
        while True:
            row = conn.execute(self._q(_DELETE_TENANT_CHUNKS),
                               {**params, "after": after, "index": index}).fetchone()
            progress()
            if row is None:
                break
            seen, gone, after, index = row
            removed += gone
            if seen < STEP:
                break
        self._audit(conn, "delete_tenant", req, removed, True, worker_id)
        return removed

    def _audit(self, conn: psycopg.Connection[Any], action: str, req: DeleteRequest,
               removed: int, applied: bool, worker_id: str) -> None:
        source = _clean({**req.source, "worker": worker_id,
                         "published_at": req.published_at.isoformat()})
        params = {"action": action, "t": req.tenant_id, "d": req.doc_id, "v": req.version,
                  "removed": removed, "applied": applied, "key": req.request_key}
        minimal = {k: source.get(k) for k in ("topic", "partition", "offset", "worker")}
        for attempt in (source, minimal):
            try:
                with conn.transaction():
                    conn.execute(self._q(_AUDIT), {**params, "source": json.dumps(attempt)})
                return
            except psycopg.Error as exc:
                # A lost connection is retried with the whole batch; a missing table or
                # column, a permission, is the deployment's fault, not this record's.
                if is_transient(exc) or is_fatal(exc):
                    raise
                reason = str(exc).strip().splitlines()[0][:300]
                self.log.warning("audit_row_refused", action=action, tenant_id=req.tenant_id,
                                 doc_id=req.doc_id, worker_id=worker_id, error=reason,
                                 minimal=attempt is minimal)
                minimal["audit_error"] = reason
        # Both failed: the deletion stands without its audit row, rather than not at all.
        self.log.error("audit_row_lost", action=action, tenant_id=req.tenant_id,
                       doc_id=req.doc_id, worker_id=worker_id, rows_deleted=removed)


# What a deletion covers: a record published before its tenant's deletion, before its
# document's deletion, or (a versioned delete) of a version the tombstone reaches.
_ERASED = """
SELECT r.i FROM unnest(%(t)s::text[], %(d)s::text[], %(v)s::bigint[], %(p)s::timestamptz[])
     WITH ORDINALITY AS r(t, d, v, p, i)
LEFT JOIN {schema}.tenant_deletions td ON td.tenant_id = r.t
LEFT JOIN {schema}.documents doc ON doc.tenant_id = r.t AND doc.doc_id = r.d
WHERE r.p <= td.deleted_before OR r.p <= doc.deleted_before OR r.v <= doc.deleted_version
   -- A tombstone: older versions are gone, and its own version too unless the delete was
   -- bounded in time (then the version published again after it is the document again).
   OR (doc.deleted AND (r.v < doc.version
                        OR (r.v = doc.version AND doc.deleted_before IS NULL)))
"""

# (tenant, document or None, version or None, published at) of one record.
Probe = tuple[str, str | None, int | None, datetime]


def erased(conn: psycopg.Connection[Any], schema: str, probes: Sequence[Probe]) -> set[int]:
    """The positions in ``probes`` of the records a deletion recorded in ``schema`` covers:
    the dead-letter tools leave those records out, so that erased text is not spread again."""
    if not probes:
        return set()
    t, d, v, p = zip(*probes, strict=True)
    rows = conn.execute(sql.SQL(_ERASED).format(schema=sql.Identifier(schema)),
                        {"t": list(t), "d": list(d), "v": list(v), "p": list(p)}).fetchall()
    return {int(r[0]) - 1 for r in rows}
