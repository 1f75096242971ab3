"""The production topology: a transaction pooler in front of the server and a streaming replica
for searches (real PgBouncer 1.18 and a real hot standby made with pg_basebackup)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.integration.test_writer import row
from vecpipe.config import with_section
from vecpipe.db.indexes import build
from vecpipe.db.pool import make_pool, search_database
from vecpipe.db.replica import replica_lag, wait_replayed
from vecpipe.db.search import Searcher
from vecpipe.db.store import Store
from vecpipe.errors import ConfigError

pytestmark = pytest.mark.integration


@pytest.fixture
def on_replica(migrated: Any, replica_url: str) -> Any:
    """``migrated`` with searches on the streaming replica (database.search_url)."""
    return with_section(migrated, "database", search_url=replica_url)


def test_a_version_is_searchable_on_the_replica_once_its_commit_is_replayed(
        on_replica: Any) -> None:
    """Read-your-writes on a replica: the writer commits on the primary, the version shows on
    the replica (documents.version, and search) once the replica has replayed that commit."""
    cfg = on_replica
    wait_replayed(cfg.database, timeout_s=60)  # the migration itself, on a fresh replica
    pool = make_pool(cfg.database)
    search_pool = make_pool(search_database(cfg.database))
    try:
        Store(cfg, pool).apply([row("doc", 0, version=3, text="replicated text")], [])
        waited = wait_replayed(cfg.database, timeout_s=60)
        assert waited >= 0
        lag = replica_lag(cfg.database)
        assert lag.is_replica and lag.bytes_behind >= 0
        table = sql.Identifier(cfg.database.schema, "documents")
        with search_pool.connection() as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
            assert conn.execute(sql.SQL("SELECT version FROM {} WHERE doc_id = 'doc'").format(
                table)).fetchone() == (3,)
        searcher = Searcher(cfg, search_pool)
        vector = row("doc", 0, version=3, text="replicated text").embedding
        assert vector is not None
        hits = searcher.query(vector, 1, "default").hits
        assert [(h.doc_id, h.content) for h in hits] == [("doc", "replicated text")]
    finally:
        pool.close()
        search_pool.close()


def test_row_level_security_holds_on_the_replica(on_replica: Any) -> None:
    """The policies are in the catalog the replica replays: as the application role, a
    transaction sees its own tenant's rows there and nothing without a tenant."""
    cfg = on_replica
    pool = make_pool(cfg.database)
    try:
        Store(cfg, pool).apply([row("a", 0, tenant="alpha"), row("b", 0, tenant="beta")], [])
    finally:
        pool.close()
    wait_replayed(cfg.database, timeout_s=60)
    chunks = sql.Identifier(cfg.database.schema, "chunks")
    with psycopg.connect(cfg.database.search_url) as conn:
        def visible(tenant: str | None) -> set[str]:
            with conn.transaction():
                conn.execute(sql.SQL("SET LOCAL ROLE {}").format(
                    sql.Identifier(cfg.database.app_role)))
                if tenant is not None:
                    conn.execute("SELECT set_config('vecpipe.tenant', %s, true)", (tenant,))
                return {r[0] for r in conn.execute(
                    sql.SQL("SELECT tenant_id FROM {}").format(chunks))}

        assert visible("alpha") == {"alpha"}
        assert visible("beta") == {"beta"}
        assert visible(None) == set()
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction), conn.transaction():
            conn.execute(sql.SQL("DELETE FROM {}").format(chunks))


@pytest.mark.pgbouncer
def test_an_index_build_behind_a_pooler_uses_the_direct_url_or_names_it(
        migrated: Any, route: str) -> None:
    """CREATE INDEX CONCURRENTLY needs a session: behind a pooler it connects to
    database.direct_url, and without one it stops with a sentence naming that setting."""
    built = build(migrated, tenant="alpha")
    assert built.name.startswith("chunks_embedding_")
    if route == "pgbouncer":
        cfg = replace(migrated, database=replace(migrated.database, direct_url=""))
        with pytest.raises(ConfigError, match=r"database\.direct_url"):
            build(cfg, tenant="beta")
