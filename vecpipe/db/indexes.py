"""Vector indexes, online: create, build (the backfill path), rebuild, drop, and their statistics.

Every build is CONCURRENTLY, so writers and searches go on while it runs, in a session with the
configured maintenance_work_mem and max_parallel_maintenance_workers and no statement timeout.
A concurrent build that fails (cancelled, out of disk, killed) leaves an INVALID index behind,
which CREATE INDEX IF NOT EXISTS would then skip silently; ``build`` and ``rebuild`` find such
leftovers and drop them first. One index operation runs per schema at a time (a session advisory
lock, taken without waiting inside a statement: a concurrent build waits for every transaction
that started before it, a lock wait in a statement included, and that would deadlock).
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from vecpipe.config import Config, DatabaseConfig
from vecpipe.db.plan import format_bytes, vector_index_bytes
from vecpipe.db.pool import connect, session_database
from vecpipe.db.schema import lock_key, opclass
from vecpipe.db.tuning import read_settings, setting_flags
from vecpipe.errors import IndexOperationError

__all__ = [
    "BuildResult",
    "IndexStats",
    "TableStats",
    "build",
    "create",
    "create_locked",
    "drop",
    "ensure_index",
    "index_definition",
    "index_name",
    "index_session",
    "index_state",
    "rebuild",
    "schema_index_validity",
    "stats",
    "target_name",
    "tenant_index_name",
]

Progress = Callable[[str], None]

# An index is flagged as bloated when it is this much larger than `vecpipe plan` expects.
BLOAT_FACTOR = 1.5
DEAD_TUPLES_RATIO = 0.2
_VECTOR_INDEX = re.compile(r"^chunks_embedding_")
_LOCK_WAIT_S = 600.0


@dataclass(frozen=True)
class BuildResult:
    """What a build did: ``exists`` (nothing to do), ``created``, or ``rebuilt``."""

    name: str
    action: str
    seconds: float = 0.0


@dataclass(frozen=True)
class IndexStats:
    """One index of the chunks table, with what ``vecpipe index stats`` says about it."""

    name: str
    method: str
    valid: bool
    size_bytes: int
    ratio_to_table: float
    scans: int
    tuples_read: int
    last_scan: str | None
    predicate: str | None
    options: dict[str, str]
    rows: int
    expected_bytes: int | None
    flags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TableStats:
    """The chunks table: sizes, live and dead tuples, maintenance, and its indexes."""

    schema: str
    live_tuples: int
    dead_tuples: int
    dead_ratio: float
    heap_bytes: int
    table_bytes: int
    indexes_bytes: int
    total_bytes: int
    last_vacuum: datetime | None
    last_autovacuum: datetime | None
    last_analyze: datetime | None
    last_autoanalyze: datetime | None
    column: str
    indexes: list[IndexStats]
    flags: list[str] = field(default_factory=list)


def index_name(cfg: Config) -> str:
    """The vector index's name: method and metric, so that a changed setting makes a new one."""
    v = cfg.vector
    return f"chunks_embedding_{v.index}_{v.metric}"


def index_definition(cfg: Config, *, concurrently: bool, name: str | None = None) -> sql.Composed:
    """CREATE INDEX for the configured method, metric and parameters."""
    v = cfg.vector
    if v.index == "hnsw":
        params = sql.SQL("m = {}, ef_construction = {}").format(
            sql.Literal(v.hnsw_m), sql.Literal(v.hnsw_ef_construction))
    else:
        params = sql.SQL("lists = {}").format(sql.Literal(v.ivfflat_lists))
    return sql.SQL(
        "CREATE INDEX {conc} IF NOT EXISTS {name} ON {schema}.chunks "
        "USING {method} (embedding {opclass}) WITH ({params})"
    ).format(
        conc=sql.SQL("CONCURRENTLY" if concurrently else ""),
        name=sql.Identifier(name or index_name(cfg)),
        schema=sql.Identifier(cfg.database.schema),
        method=sql.SQL(v.index),
        opclass=opclass(v),
        params=params,
    )


def index_state(conn: psycopg.Connection[Any], schema: str, name: str) -> str | None:
    """'valid', 'invalid' (a failed concurrent build left it), or None: no such index."""
    row = conn.execute(
        "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(%s)",
        (sql.Identifier(schema, name).as_string(conn),),
    ).fetchone()
    if row is None:
        return None
    return "valid" if row[0] else "invalid"


def schema_index_validity(conn: psycopg.Connection[Any], schema: str) -> dict[str, bool]:
    """Every index on the tables of ``schema``: True when valid and ready (usable by queries)."""
    rows = conn.execute(
        "SELECT c.relname, i.indisvalid AND i.indisready FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s",
        (schema,),
    ).fetchall()
    return {name: bool(ok) for name, ok in rows}


def create_locked(conn: psycopg.Connection[Any], cfg: Config) -> None:
    """CREATE INDEX inside the migration's transaction, under its lock.

    Two plain CREATE INDEX IF NOT EXISTS statements do not block each other (both take a SHARE
    lock), so two pods would race for the name; the advisory lock serialises them. An INVALID
    index of the same name (a failed concurrent build) would make IF NOT EXISTS skip silently,
    leaving searches without an index: it is dropped and built again.
    """
    db = cfg.database
    conn.execute(sql.SQL("SET LOCAL maintenance_work_mem = {}").format(
        sql.Literal(db.maintenance_work_mem)))
    conn.execute(sql.SQL("SET LOCAL max_parallel_maintenance_workers = {}").format(
        sql.Literal(db.max_parallel_maintenance_workers)))
    name = index_name(cfg)
    if index_state(conn, db.schema, name) == "invalid":
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(db.schema, name)))
    conn.execute(index_definition(cfg, concurrently=False))


def tenant_index_name(base: str, tenant: str) -> str:
    """The name of a tenant's partial vector index: the shared index's name and a tenant hash.

    Tenant ids are free text; a hash keeps the name a short, safe identifier.
    """
    return f"{base}_t{hashlib.sha256(tenant.encode()).hexdigest()[:12]}"


def target_name(cfg: Config, tenant: str | None = None, name: str | None = None) -> str:
    """The index an operation is about: ``name``, a tenant's partial index, or the shared one."""
    if name:
        if not _VECTOR_INDEX.match(name):
            raise IndexOperationError(
                f"{name!r} is not a vecpipe vector index (their names start with "
                "chunks_embedding_); see 'vecpipe index stats'."
            )
        return name
    if cfg.vector.index == "none":
        raise IndexOperationError(
            "vector.index (VECPIPE_VECTOR_INDEX) is none; set it to hnsw or ivfflat, or give "
            "--method."
        )
    base = index_name(cfg)
    return tenant_index_name(base, tenant) if tenant else base


def _index_database(cfg: Config) -> DatabaseConfig:
    """Where index work connects: CREATE INDEX CONCURRENTLY runs outside a transaction, under a
    session lock, and its progress is read by backend pid, so it needs a session of its own."""
    return session_database(cfg.database, "Building an index CONCURRENTLY")


@contextmanager
def index_session(cfg: Config) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit session for index work: settings, no timeout, the schema's index lock.

    A session of its own: behind a transaction pooler, the direct URL (database.direct_url).
    """
    db = _index_database(cfg)
    with connect(db, vector_types=False, autocommit=True) as conn:
        conn.execute("SET statement_timeout = 0")
        conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(
            sql.Literal(db.maintenance_work_mem)))
        conn.execute(sql.SQL("SET max_parallel_maintenance_workers = {}").format(
            sql.Literal(db.max_parallel_maintenance_workers)))
        if conn.execute("SELECT to_regclass(%s)", (
                sql.Identifier(db.schema, "chunks").as_string(conn),)).fetchone() == (None,):
            raise IndexOperationError(
                f"The schema {db.schema!r} (VECPIPE_DB_SCHEMA) has no chunks table; run "
                "'vecpipe migrate --no-index' first."
            )
        key = f"vecpipe.index.{db.schema}"
        deadline = time.monotonic() + _LOCK_WAIT_S
        while conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))",
                           (key,)).fetchone() != (True,):
            if time.monotonic() > deadline:
                raise IndexOperationError(
                    f"Another index operation on schema {db.schema!r} has held its lock for "
                    f"{_LOCK_WAIT_S:.0f} s; see pg_stat_progress_create_index, then try again."
                )
            time.sleep(1.0)
        try:
            yield conn
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))


@contextmanager
def _watch(cfg: Config, pid: int, label: str, progress: Progress | None,
           interval: float) -> Iterator[None]:
    """Report pg_stat_progress_create_index for backend ``pid`` every ``interval`` seconds."""
    if progress is None or interval <= 0:
        yield
        return
    done = threading.Event()
    started = time.monotonic()

    def poll() -> None:
        with connect(_index_database(cfg), vector_types=False, autocommit=True) as conn:
            while not done.wait(interval):
                row = conn.execute(
                    "SELECT phase, blocks_done, blocks_total, tuples_done, tuples_total,"
                    " lockers_done, lockers_total FROM pg_stat_progress_create_index"
                    " WHERE pid = %s", (pid,)).fetchone()
                if row is not None:
                    progress(_progress_line(label, row, time.monotonic() - started))

    thread = threading.Thread(target=poll, name="index-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(interval + 5)


def _progress_line(label: str, row: tuple[Any, ...], elapsed: float) -> str:
    phase, bdone, btotal, tdone, ttotal, ldone, ltotal = row
    parts = [f"{label}: {phase}"]
    if ttotal:
        parts.append(f"tuples {tdone:,}/{ttotal:,} ({100 * tdone / ttotal:.0f}%)")
    elif btotal:
        parts.append(f"blocks {bdone:,}/{btotal:,} ({100 * bdone / btotal:.0f}%)")
    if ltotal:
        parts.append(f"waiting for {ltotal - ldone} of {ltotal} older transactions")
    parts.append(f"{elapsed:.0f} s")
    return ", ".join(parts)


def _definition(cfg: Config, name: str, tenant: str | None) -> sql.Composed:
    stmt = index_definition(cfg, concurrently=True, name=name)
    if tenant:
        stmt = stmt + sql.SQL(" WHERE tenant_id = {}").format(sql.Literal(tenant))
    return stmt


def _create(conn: psycopg.Connection[Any], cfg: Config, name: str, tenant: str | None,
            progress: Progress | None, interval: float) -> float:
    started = time.monotonic()
    with _watch(cfg, conn.info.backend_pid, f"CREATE INDEX {name}", progress, interval):
        conn.execute(_definition(cfg, name, tenant))
    if tenant:
        conn.execute(sql.SQL("COMMENT ON INDEX {} IS {}").format(
            sql.Identifier(cfg.database.schema, name),
            sql.Literal(f"vecpipe: vector index of tenant {tenant}")))
    # A backfill leaves the planner's statistics behind; the search strategy reads them.
    conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(cfg.database.schema, "chunks")))
    if index_state(conn, cfg.database.schema, name) != "valid":
        raise IndexOperationError(
            f"The index {name} was built but is not valid; run 'vecpipe index build' again.")
    return time.monotonic() - started


def _drop(conn: psycopg.Connection[Any], schema: str, name: str) -> None:
    conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
        sql.Identifier(schema, name)))


def create(cfg: Config, *, tenant: str | None = None, progress: Progress | None = None,
           interval: float = 10.0) -> BuildResult:
    """CREATE INDEX CONCURRENTLY for the configured method (a tenant's partial index with
    ``tenant``); refuses when the index exists, valid or not."""
    name = target_name(cfg, tenant)
    with index_session(cfg) as conn:
        state = index_state(conn, cfg.database.schema, name)
        if state == "valid":
            raise IndexOperationError(
                f"The index {name} already exists; 'vecpipe index rebuild' rebuilds it, and to "
                "change its parameters drop it first."
            )
        if state == "invalid":
            raise IndexOperationError(
                f"The index {name} exists but is INVALID (a concurrent build failed); "
                "'vecpipe index build' drops and rebuilds it."
            )
        seconds = _create(conn, cfg, name, tenant, progress, interval)
    return BuildResult(name, "created", seconds)


def build(cfg: Config, *, tenant: str | None = None, progress: Progress | None = None,
          interval: float = 10.0) -> BuildResult:
    """Make sure the index exists and is valid: the backfill path after ``migrate --no-index``.

    Nothing to do when it is there and valid; an INVALID leftover is dropped and built again.
    """
    name = target_name(cfg, tenant)
    with index_session(cfg) as conn:
        state = index_state(conn, cfg.database.schema, name)
        if state == "valid":
            return BuildResult(name, "exists")
        if state == "invalid":
            _drop(conn, cfg.database.schema, name)
        seconds = _create(conn, cfg, name, tenant, progress, interval)
    return BuildResult(name, "rebuilt" if state == "invalid" else "created", seconds)


def rebuild(cfg: Config, *, tenant: str | None = None, name: str | None = None,
            progress: Progress | None = None, interval: float = 10.0) -> BuildResult:
    """REINDEX INDEX CONCURRENTLY: a fresh, compact graph while searches go on.

    A failed REINDEX CONCURRENTLY leaves ``<name>_ccnew`` (or ``_ccold``) behind; those are
    dropped first.
    """
    name = target_name(cfg, tenant, name)
    schema = cfg.database.schema
    with index_session(cfg) as conn:
        leftovers = [r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE i.indrelid = to_regclass(%s) AND NOT i.indisvalid"
            " AND c.relname ~ ('^' || %s || '_cc(new|old)[0-9]*$')",
            (sql.Identifier(schema, "chunks").as_string(conn), re.escape(name)))]
        for left in leftovers:
            _drop(conn, schema, left)
        state = index_state(conn, schema, name)
        if state is None:
            raise IndexOperationError(
                f"There is no index {name} to rebuild; 'vecpipe index build' creates it.")
        started = time.monotonic()
        if state == "invalid":
            _drop(conn, schema, name)
            seconds = _create(conn, cfg, name, tenant, progress, interval)
            return BuildResult(name, "rebuilt", seconds)
        with _watch(cfg, conn.info.backend_pid, f"REINDEX {name}", progress, interval):
            conn.execute(sql.SQL("REINDEX INDEX CONCURRENTLY {}").format(
                sql.Identifier(schema, name)))
    return BuildResult(name, "rebuilt", time.monotonic() - started)


def drop(cfg: Config, *, tenant: str | None = None, name: str | None = None) -> bool:
    """DROP INDEX CONCURRENTLY; False when there was no such index."""
    name = target_name(cfg, tenant, name)
    with index_session(cfg) as conn:
        if index_state(conn, cfg.database.schema, name) is None:
            return False
        _drop(conn, cfg.database.schema, name)
    return True


# -- statistics ----------------------------------------------------------------------------------

_TABLE = """
SELECT coalesce(s.n_live_tup, 0), coalesce(s.n_dead_tup, 0), pg_relation_size(c.oid),
       pg_table_size(c.oid), pg_indexes_size(c.oid), pg_total_relation_size(c.oid),
       s.last_vacuum, s.last_autovacuum, s.last_analyze, s.last_autoanalyze,
       (SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
        WHERE a.attrelid = c.oid AND a.attname = 'embedding'), c.reltuples,
       coalesce(c.reloptions, '{}')
FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE c.oid = to_regclass(%s)
"""

_INDEXES = """
SELECT c.relname, am.amname, i.indisvalid, pg_relation_size(c.oid),
       coalesce(s.idx_scan, 0), coalesce(s.idx_tup_read, 0), to_jsonb(s) ->> 'last_idx_scan',
       pg_get_expr(i.indpred, i.indrelid), coalesce(c.reloptions, '{}'), c.reltuples
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_am am ON am.oid = c.relam
LEFT JOIN pg_stat_user_indexes s ON s.indexrelid = c.oid
WHERE i.indrelid = to_regclass(%s)
ORDER BY c.relname
"""


def stats(cfg: Config) -> TableStats:
    """Sizes, scans, dead tuples and maintenance of chunks and its indexes, with flags."""
    schema = cfg.database.schema
    with connect(cfg.database, vector_types=False, autocommit=True) as conn:
        table = sql.Identifier(schema, "chunks").as_string(conn)
        row = conn.execute(_TABLE, (table,)).fetchone()
        if row is None:
            raise IndexOperationError(
                f"The schema {schema!r} (VECPIPE_DB_SCHEMA) has no chunks table; run "
                "'vecpipe migrate' first."
            )
        (live, dead, heap, tbytes, ibytes, total, vac, avac, an, aan, column, reltuples,
         reloptions) = row
        index_rows = conn.execute(_INDEXES, (table,)).fetchall()
        settings = read_settings(conn)
    ctype, dim = _column(column)
    table_rows = int(reltuples) if reltuples and reltuples > 0 else int(live)
    indexes = [_index_stats(r, tbytes, ctype, dim, table_rows) for r in index_rows]
    dead_ratio = dead / (live + dead) if live + dead else 0.0
    flags = setting_flags(settings, dict(o.split("=", 1) for o in reloptions))
    if dead_ratio > DEAD_TUPLES_RATIO:
        flags.append(f"{dead_ratio:.0%} of the tuples are dead: autovacuum is behind; run "
                     "VACUUM (ANALYZE) on the chunks table")
    if an is None and aan is None and live + dead > 0:
        flags.append("never analyzed: the planner's row estimates, which choose the search "
                     "strategy, are guesses; run ANALYZE")
    return TableStats(schema, int(live), int(dead), dead_ratio, int(heap), int(tbytes),
                      int(ibytes), int(total), vac, avac, an, aan, column or "", indexes, flags)


def _column(formatted: str | None) -> tuple[str, int]:
    m = re.match(r"^(vector|halfvec)\((\d+)\)$", formatted or "")
    return (m.group(1), int(m.group(2))) if m else ("vector", 0)


def _index_stats(r: tuple[Any, ...], table_bytes: int, ctype: str, dim: int,
                 table_rows: int) -> IndexStats:
    name, method, valid, size, scans, read, last, pred, reloptions, reltuples = r
    options = dict(o.split("=", 1) for o in reloptions)
    rows = int(reltuples) if reltuples and reltuples > 0 else table_rows
    expected: int | None = None
    flags: list[str] = []
    if method in ("hnsw", "ivfflat") and dim:
        expected = vector_index_bytes(rows, dim, ctype, method, int(options.get("m", 16)),
                                      int(options.get("lists", 100)))
        if size > BLOAT_FACTOR * expected and size - expected > 64 * 8192:
            flags.append(f"bloated: {size / expected:.1f}x the {format_bytes(expected)} "
                         "'vecpipe plan' expects for its rows; 'vecpipe index rebuild' compacts it")
        if scans == 0:
            flags.append("no search has used it since the statistics were reset")
    if not valid:
        flags.append("INVALID (a concurrent build failed): searches do not use it; "
                     "'vecpipe index build' or 'rebuild' replaces it")
    return IndexStats(name, method, bool(valid), int(size),
                      size / table_bytes if table_bytes else 0.0, int(scans), int(read), last,
                      pred, options, rows, expected, flags)


def ensure_index(cfg: Config, *, concurrently: bool) -> str:
    """Create the configured vector index if it is missing (or invalid); return its name."""
    if concurrently:
        return build(cfg).name
    with connect(cfg.database, vector_types=False) as conn:
        conn.execute("SET LOCAL statement_timeout = 0")
        conn.execute("SELECT pg_advisory_xact_lock(%s)",
                     (lock_key("migrate", cfg.database.schema),))
        create_locked(conn, cfg)
        conn.commit()
    return index_name(cfg)
