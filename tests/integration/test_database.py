"""The database side on real PostgreSQL + pgvector: migrations, row-level security, vector index
management, capacity planning against measured sizes, and the audit trail."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
import pytest
from pgvector import Vector
from psycopg import sql

from tests.helpers import connect, run_cli
from vecpipe.config import with_section
from vecpipe.db import indexes
from vecpipe.db.erase import DeleteRequest
from vecpipe.db.indexes import index_name, index_state
from vecpipe.db.migrate import load_migrations, migrate, render, variables
from vecpipe.db.pool import make_pool
from vecpipe.db.search import Searcher
from vecpipe.db.store import Row, Store
from vecpipe.errors import IndexOperationError, MigrationError
from vecpipe.messages import content_hash

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)
LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", dtype=np.uint8)


def unit_vectors(n: int, dim: int = 384, seed: int = 0) -> np.ndarray[Any, Any]:
    """``n`` random unit vectors (float32)."""
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    out: np.ndarray[Any, Any] = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    return out


def make_rows(vectors: np.ndarray[Any, Any], tenants: list[str], *, text_bytes: int = 60,
              seed: int = 1, shuffle: bool = False) -> list[Row]:
    """Rows for ``vectors``: text of ``text_bytes`` random letters (pglz cannot compress it),
    8-byte tenants, 24-byte document ids, 40-byte URIs; in random key order with ``shuffle``."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(vectors)) if shuffle else np.arange(len(vectors))
    rows = []
    for i in order.tolist():
        text = f"{i:08d} " + bytes(rng.choice(LETTERS, text_bytes - 9)).decode()
        rows.append(Row(
            tenant_id=tenants[i], doc_id=f"documents/{i:014d}", chunk_index=0, doc_version=1,
            chunk_count=1, content_hash=content_hash(text), content=text, char_start=0,
            char_end=len(text), source_uri=f"https://example.com/{i:020d}",
            metadata={"lang": "en", "n": i % 50}, embedding=vectors[i],
            model_name="all-MiniLM-L6-v2",
            model_revision="c9745ed1d9f207416be6d2e6f8de32d1f16199bf",
            model_backend="torch-fp32", embedded_at=NOW, published_at=NOW))
    return rows


def load(cfg: Any, rows: list[Row], batch: int = 2000) -> None:
    """Write ``rows`` through the writer's merge (Store.apply), in batches."""
    pool = make_pool(cfg.database)
    try:
        store = Store(cfg, pool)
        for start in range(0, len(rows), batch):
            store.apply(rows[start:start + batch], [])
    finally:
        pool.close()


def as_app_role(cfg: Any, tenant: str | None, query: str) -> list[Any]:
    """Run ``query`` as the application role with vecpipe.tenant set (or not), as searches do."""
    with connect(cfg.database) as conn:
        conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(cfg.database.app_role)))
        if tenant is not None:
            conn.execute("SELECT set_config('vecpipe.tenant', %s, true)", (tenant,))
        rows = conn.execute(query).fetchall()
        conn.rollback()
        return rows


# -- migrations ---------------------------------------------------------------------------------

def test_concurrent_migrations_both_succeed_and_apply_each_file_once(cfg: Any) -> None:
    """Two migrate calls at once on a fresh schema both succeed; each file is applied once."""
    results: list[list[str]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run() -> None:
        try:
            barrier.wait()
            results.append(migrate(cfg))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    names = [f"{m.version:04d}_{m.name}" for m in load_migrations()]
    assert sorted(results[0] + results[1]) == sorted(names)
    with connect(cfg.database, autocommit=True) as conn:
        versions = [r[0] for r in conn.execute(
            "SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == [m.version for m in load_migrations()]
        assert index_state(conn, cfg.database.schema, index_name(cfg)) == "valid"
    assert migrate(cfg) == []


def test_edited_applied_migration_is_reported_with_its_file_name(
        migrated: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Editing an applied migration makes migrate fail with a MigrationError naming the file."""
    edited = [replace(m, text=m.text + "\n-- an innocent edit\n") if m.version == 2 else m
              for m in load_migrations()]
    monkeypatch.setattr("vecpipe.db.migrate.load_migrations", lambda: edited)
    with pytest.raises(MigrationError, match=r"0002_chunks\.sql was edited"):
        migrate(migrated)


def test_migration_files_are_safe_to_run_twice_by_hand(migrated: Any) -> None:
    """Every migration, rendered as psql would, runs again on a migrated schema without error."""
    idents, values = variables(migrated)
    with connect(migrated.database, vector_types=False) as conn:
        for mig in load_migrations():
            conn.execute(render(mig.text, idents, values).encode())
        conn.rollback()


# -- row-level security ---------------------------------------------------------------------------

@pytest.fixture
def three_tenants(migrated: Any) -> Any:
    """Tenants a, b and c with 40 rows each, written by the writer (as the table owner)."""
    vecs = unit_vectors(120, seed=3)
    load(migrated, make_rows(vecs, ["a", "b", "c"] * 40))
    return migrated


def test_app_role_sees_one_tenant_even_without_a_where_clause(three_tenants: Any) -> None:
    """SELECT * FROM chunks as the app role returns only the tenant set in vecpipe.tenant."""
    cfg = three_tenants
    rows = as_app_role(cfg, "a", "SELECT tenant_id FROM chunks")
    assert len(rows) == 40 and {r[0] for r in rows} == {"a"}
    assert {r[0] for r in as_app_role(cfg, "b", "SELECT * FROM chunks")} == {"b"}
    assert as_app_role(cfg, "b", "SELECT count(*) FROM chunks WHERE tenant_id = 'a'") == [(0,)]
    assert as_app_role(cfg, None, "SELECT count(*) FROM chunks") == [(0,)]
    assert as_app_role(cfg, "", "SELECT count(*) FROM chunks") == [(0,)]


def test_app_role_is_unprivileged_and_may_only_read_chunks_and_documents(
        three_tenants: Any) -> None:
    """The role is NOLOGIN, not superuser, no BYPASSRLS, cannot write, reads only chunks and
    (for GET /v1/documents) its tenant's documents, and never the keys."""
    cfg = three_tenants
    with connect(cfg.database, autocommit=True) as conn:
        role = conn.execute("SELECT rolsuper, rolbypassrls, rolcanlogin FROM pg_roles "
                            "WHERE rolname = %s", (cfg.database.app_role,)).fetchone()
    assert role == (False, False, False)
    for statement in ("DELETE FROM chunks", "UPDATE chunks SET content = ''",
                      "DELETE FROM documents", "SELECT * FROM audit_log",
                      "SELECT * FROM api_keys",
                      "SELECT * FROM cached_vectors('{}', 'm', 'r', 'b')"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            as_app_role(cfg, "a", statement)
    assert {r[0] for r in as_app_role(cfg, "a", "SELECT tenant_id FROM documents")} <= {"a"}
    assert as_app_role(cfg, None, "SELECT tenant_id FROM documents") == []


def test_search_as_tenant_never_returns_another_tenants_rows(three_tenants: Any) -> None:
    """Searching tenant a with tenant b's exact vectors, by every strategy, finds only a's rows."""
    cfg = three_tenants
    vecs = unit_vectors(120, seed=3)
    pool = make_pool(cfg.database)
    try:
        searcher = Searcher(cfg, pool)
        for i in range(1, 120, 3)[:8]:  # tenant b's rows
            for strategy in ("auto", "exact", "shared_index"):
                result = searcher.query(vecs[i], 10, tenant="a", strategy=strategy)
                assert len(result.hits) == 10
                assert {h.tenant_id for h in result.hits} == {"a"}
                assert (result.hits[0].distance or 0.0) > 0.01
        plan = searcher.explain(vecs[1], 5, tenant="a")
        assert "current_setting('vecpipe.tenant'" in plan
    finally:
        pool.close()


def test_vector_reuse_crosses_tenants_through_the_definer_function(three_tenants: Any) -> None:
    """cached_vectors finds a vector stored by another tenant and returns only hash and vector."""
    cfg = three_tenants
    rows = make_rows(unit_vectors(120, seed=3), ["a", "b", "c"] * 40)
    pool = make_pool(cfg.database)
    try:
        store = Store(cfg, pool)
        found = store.cached_vectors([rows[1].content_hash, rows[2].content_hash, "00" * 32],
                                     "all-MiniLM-L6-v2",
                                     "c9745ed1d9f207416be6d2e6f8de32d1f16199bf", "torch-fp32")
        assert set(found) == {rows[1].content_hash, rows[2].content_hash}
        assert rows[1].embedding is not None
        assert np.allclose(found[rows[1].content_hash], rows[1].embedding, atol=1e-6)
        assert store.cached_vectors([rows[1].content_hash], "other-model", "", "torch") == {}
        with pool.connection() as conn:
            columns = [c.name for c in conn.execute(sql.SQL(
                "SELECT * FROM {}.cached_vectors('{{}}', '', '', '')").format(
                sql.Identifier(cfg.database.schema))).description or []]
        assert columns == ["content_hash", "embedding"]
    finally:
        pool.close()


# -- index management -----------------------------------------------------------------------------

def _cancel_during_build(cfg: Any, action: Any) -> None:
    """Run ``action`` (a concurrent build) and cancel its backend once the build is under way."""
    cancelled = threading.Event()

    def cancel() -> None:
        with connect(cfg.database, autocommit=True) as admin:
            for _ in range(600):
                row = admin.execute(
                    "SELECT pid FROM pg_stat_progress_create_index p "
                    "JOIN pg_class c ON c.oid = p.relid WHERE c.relname = 'chunks' "
                    "AND p.phase LIKE 'building index%' AND p.datname = current_database()"
                ).fetchone()
                if row is not None:
                    admin.execute("SELECT pg_cancel_backend(%s)", (row[0],))
                    cancelled.set()
                    return
                time.sleep(0.02)

    t = threading.Thread(target=cancel)
    t.start()
    with pytest.raises(psycopg.errors.QueryCanceled):
        action()
    t.join()
    assert cancelled.is_set()


@pytest.fixture
def backfilled(cfg: Any) -> Any:
    """A schema migrated with --no-index and bulk-loaded with 6,000 rows: no vector index yet."""
    cfg = with_section(cfg, "vector", hnsw_ef_construction=32)
    migrate(cfg, with_index=False)
    load(cfg, make_rows(unit_vectors(6000, seed=4), ["t1", "t2", "t3"] * 2000))
    return cfg


def test_build_after_a_bulk_load_replaces_an_invalid_index(backfilled: Any) -> None:
    """A cancelled concurrent build leaves an INVALID index; create refuses, build replaces it."""
    cfg = backfilled
    name = index_name(cfg)
    with connect(cfg.database, autocommit=True) as conn:
        assert index_state(conn, cfg.database.schema, name) is None
    _cancel_during_build(cfg, lambda: indexes.create(cfg))
    with connect(cfg.database, autocommit=True) as conn:
        assert index_state(conn, cfg.database.schema, name) == "invalid"
    stats = indexes.stats(cfg)
    assert any("INVALID" in f for ix in stats.indexes if ix.name == name for f in ix.flags)
    with pytest.raises(IndexOperationError, match="INVALID"):
        indexes.create(cfg)
    lines: list[str] = []
    result = indexes.build(cfg, progress=lines.append, interval=0.2)
    assert (result.name, result.action) == (name, "rebuilt")
    assert lines and "CREATE INDEX" in lines[0]
    assert indexes.build(cfg).action == "exists"
    with connect(cfg.database, autocommit=True) as conn:
        assert index_state(conn, cfg.database.schema, name) == "valid"


def test_migrate_replaces_an_invalid_index_left_by_a_failed_build(backfilled: Any) -> None:
    """migrate does not skip an INVALID index of the configured name: it drops and rebuilds it."""
    cfg = backfilled
    _cancel_during_build(cfg, lambda: indexes.create(cfg))
    with connect(cfg.database, autocommit=True) as conn:
        assert index_state(conn, cfg.database.schema, index_name(cfg)) == "invalid"
    assert migrate(cfg) == []
    with connect(cfg.database, autocommit=True) as conn:
        assert index_state(conn, cfg.database.schema, index_name(cfg)) == "valid"


def test_rebuild_clears_a_failed_reindex_and_drop_removes(backfilled: Any) -> None:
    """A cancelled REINDEX CONCURRENTLY leaves _ccnew behind; rebuild drops it and reindexes."""
    cfg = backfilled
    indexes.build(cfg)
    name = index_name(cfg)
    _cancel_during_build(cfg, lambda: indexes.rebuild(cfg))
    with connect(cfg.database, autocommit=True) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE i.indrelid = 'chunks'::regclass AND NOT i.indisvalid")]
    assert names == [f"{name}_ccnew"]
    assert indexes.rebuild(cfg).action == "rebuilt"
    assert [ix.name for ix in indexes.stats(cfg).indexes if not ix.valid] == []
    assert indexes.drop(cfg) is True
    assert indexes.drop(cfg) is False
    assert all(ix.method == "btree" or ix.method == "gin" for ix in indexes.stats(cfg).indexes)


def test_index_cli_builds_reports_and_flags_bloat(backfilled: Any) -> None:
    """vecpipe index build/create --tenant/stats/drop; stats flags a bloated index, dead rows."""
    cfg = backfilled
    out = run_cli(cfg, "index", "build", "--method", "hnsw", "--m", "16",
                  "--ef-construction", "32", "--maintenance-work-mem", "256MB").stdout
    assert f"{index_name(cfg)} created" in out
    refused = run_cli(cfg, "index", "create", check=False)
    assert refused.returncode == 2 and "already exists" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    out = run_cli(cfg, "index", "create", "--tenant", "t2").stdout
    assert "created" in out
    report = json.loads(run_cli(cfg, "index", "stats", "--json").stdout)
    # The local server runs vecpipe's recommended settings and migration 0008 set the table's
    # autovacuum: nothing is flagged as far from the recommendation (vecpipe.db.tuning).
    assert not [f for f in report["flags"] if "recommended" in f], report["flags"]
    by_name = {ix["name"]: ix for ix in report["indexes"]}
    shared = by_name[index_name(cfg)]
    assert shared["valid"] and shared["options"] == {"m": "16", "ef_construction": "32"}
    assert 0.8 < shared["size_bytes"] / shared["expected_bytes"] < 1.2
    assert not any("bloated" in f for f in shared["flags"])
    partial = [ix for n, ix in by_name.items() if n.startswith(index_name(cfg) + "_t")]
    assert len(partial) == 1 and "'t2'" in partial[0]["predicate"]
    assert 0.8 < partial[0]["size_bytes"] / partial[0]["expected_bytes"] < 1.2
    assert "dropped" in run_cli(cfg, "index", "drop").stdout
    # New vectors for tenant t2 add a second graph element for each row of its index (the old
    # ones stay until VACUUM), and leave dead tuples.
    fresh = unit_vectors(6000, seed=6)
    with connect(cfg.database, autocommit=True) as conn:
        conn.execute("ALTER TABLE chunks SET (autovacuum_enabled = false)")
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany("UPDATE chunks SET embedding = %s WHERE doc_id = %s",
                            [(Vector(fresh[i]), f"documents/{i:014d}") for i in range(1, 6000, 3)])
        conn.execute("SELECT pg_stat_force_next_flush()")
    report = json.loads(run_cli(cfg, "index", "stats", "--json").stdout)
    partial = [ix for ix in report["indexes"] if ix["name"] == partial[0]["name"]]
    assert any("bloated" in f for f in partial[0]["flags"]), partial
    assert any("autovacuum is behind" in f for f in report["flags"])
    assert "bloated" in run_cli(cfg, "index", "stats").stdout
    assert "drop" in run_cli(cfg, "index", "drop", "--tenant", "t2").stdout
    gone = run_cli(cfg, "index", "drop", "--name", "chunks_pkey", check=False)
    assert gone.returncode == 2 and "not a vecpipe vector index" in gone.stderr


# -- capacity planning ----------------------------------------------------------------------------

@pytest.mark.parametrize("column_type", ["vector", "halfvec"])
def test_plan_matches_measured_sizes_within_20_percent(cfg: Any, column_type: str) -> None:
    """vecpipe plan's heap, TOAST, index and total sizes are within 20% of a real 20,000-row table
    with 800-byte texts, for HNSW and IVFFlat."""
    rows = 20_000
    cfg = with_section(cfg, "vector", column_type=column_type, hnsw_ef_construction=32)
    migrate(cfg, with_index=False)
    vecs = unit_vectors(rows, seed=5)
    load(cfg, make_rows(vecs, [f"tenant{i % 7:02d}" for i in range(rows)], text_bytes=800,
                        shuffle=True))
    for method in ("hnsw", "ivfflat"):
        indexes.build(with_section(cfg, "vector", index=method))
    with connect(cfg.database, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE chunks")
        measured = conn.execute(
            "SELECT pg_relation_size(c.oid), pg_relation_size(c.reltoastrelid),"
            " pg_table_size(c.oid), pg_indexes_size(c.oid), pg_total_relation_size(c.oid)"
            " FROM pg_class c WHERE c.oid = 'chunks'::regclass").fetchone()
        assert measured is not None
        heap, toast, table, all_indexes, total = measured
        sizes = dict(conn.execute(
            "SELECT c.relname, pg_relation_size(c.oid) FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = 'chunks'::regclass"
        ).fetchall())
        metadata_bytes = conn.execute(
            "SELECT round(avg(pg_column_size(metadata))) FROM chunks").fetchone()
        tsv = conn.execute("SELECT avg(pg_column_size(content_tsv)) / 800.0,"
                           " round(avg(length(content_tsv))) FROM chunks").fetchone()
    assert tsv is not None
    assert metadata_bytes is not None
    plans = {}
    for method in ("hnsw", "ivfflat"):
        out = run_cli(cfg, "plan", "--rows", str(rows), "--dim", "384", "--type", column_type,
                      "--index", method, "--lists", "100", "--text-bytes", "800",
                      "--metadata-bytes", str(int(metadata_bytes[0])),
                      "--tsv-ratio", f"{float(tsv[0]):.3f}", "--text-lexemes", str(int(tsv[1])),
                      "--json").stdout
        plans[method] = json.loads(out)
    hnsw, ivf = plans["hnsw"], plans["ivfflat"]

    def close(estimated: float, measured: float, what: str) -> None:
        assert abs(estimated - measured) <= 0.2 * measured, (
            f"{column_type} {what}: estimated {estimated:,.0f}, measured {measured:,.0f}")

    close(hnsw["heap_bytes"], heap, "heap")
    # vector: the text and the full-text column move out of line; halfvec: the text fits inline
    # and only the full-text column moves.
    assert hnsw["content_storage"] == ("in TOAST" if column_type == "vector" else "inline")
    close(hnsw["toast_bytes"], toast, "TOAST")
    close(hnsw["table_bytes"], table, "table")
    close(hnsw["vector_index_bytes"], sizes[f"chunks_embedding_hnsw_{cfg.vector.metric}"],
          "HNSW index")
    close(ivf["vector_index_bytes"], sizes[f"chunks_embedding_ivfflat_{cfg.vector.metric}"],
          "IVFFlat index")
    close(hnsw["primary_key_bytes"], sizes["chunks_pkey"], "primary key")
    # The full-text GIN's estimate is for prose (shared lexemes); each of these rows is one
    # unique random word, so it is left out of both sides.
    text_index = sizes["chunks_content_tsv_idx"]
    both = hnsw["indexes_bytes"] - hnsw["text_index_bytes"] + ivf["vector_index_bytes"]
    close(both, all_indexes - text_index, "all indexes")
    close(hnsw["table_bytes"] + both, total - text_index, "total")


# -- audit ----------------------------------------------------------------------------------------

def test_audit_lists_the_deletion_trail_per_tenant_and_time(three_tenants: Any) -> None:
    """vecpipe audit shows deletes with their source, filtered by tenant and time, and lineage."""
    cfg = three_tenants
    pool = make_pool(cfg.database)
    try:
        Store(cfg, pool).apply([], [
            DeleteRequest("a", "documents/00000000000000", None, NOW,
                          {"topic": "t.embeddings", "partition": 2, "offset": 17,
                           "reason": "gdpr-request-42"}),
            DeleteRequest("b", None, None, NOW, {"topic": "t.embeddings", "partition": 1,
                                                 "offset": 5}),
        ], worker_id="writer-1")
    finally:
        pool.close()
    trail = json.loads(run_cli(cfg, "audit", "--tenant", "a", "--json").stdout)
    assert [(e["action"], e["doc_id"], e["rows_deleted"]) for e in trail] == [
        ("delete_document", "documents/00000000000000", 1)]
    assert trail[0]["source"]["reason"] == "gdpr-request-42"
    assert trail[0]["source"]["worker"] == "writer-1"
    text = run_cli(cfg, "audit", "--since", "1h").stdout
    assert "delete_tenant" in text and "(whole tenant)" in text and "gdpr-request-42" in text
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert json.loads(run_cli(cfg, "audit", "--since", later, "--json").stdout) == []
    lineage = json.loads(run_cli(cfg, "audit", "--lineage", "--json").stdout)
    assert {(r["tenant_id"], r["model_name"], r["chunks"]) for r in lineage} == {
        ("a", "all-MiniLM-L6-v2", 39), ("c", "all-MiniLM-L6-v2", 40)}
    bad = run_cli(cfg, "audit", "--since", "last tuesday", check=False)
    assert bad.returncode == 2 and "ISO 8601 date" in bad.stderr


def test_migration_0009_applies_on_an_upgrade_in_a_session_of_its_own(cfg: Any) -> None:
    """An existing install upgrading to 0009 runs it without 0004 in the same session (the
    settings 0004 left behind are gone): it must name its roles itself."""
    migrate(cfg)
    with connect(cfg.database, autocommit=True) as conn:
        conn.execute(sql.SQL("DELETE FROM {}.schema_migrations WHERE version = 9").format(
            sql.Identifier(cfg.database.schema)))
    assert "0009_serve" in migrate(cfg)
