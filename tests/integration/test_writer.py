"""The writer on the real database and broker: idempotent, newest wins, deletes, concurrency."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
import pytest

from tests.helpers import BlackHoleProxy, connect, read_topic, run_stage
from vecpipe.config import with_section
from vecpipe.db import erase
from vecpipe.db.erase import DeleteRequest, erased
from vecpipe.db.pool import make_pool
from vecpipe.db.store import Row, Store
from vecpipe.kafka.admin import offsets_committed
from vecpipe.kafka.producer import DurableProducer
from vecpipe.messages import (
    DELETE,
    EMBEDDING,
    Chunk,
    ChunkGap,
    Delete,
    Embedding,
    content_hash,
    encode_delete,
    encode_embedding,
    schema_headers,
)
from vecpipe.retry import is_fatal, is_transient

pytestmark = pytest.mark.integration

# The merge tests run a second time through PgBouncer (conftest.py); the black-holed network
# and the offset commit order do not depend on the route to the database.
through_pgbouncer = pytest.mark.pgbouncer

RNG = np.random.default_rng(7)
NOW = datetime.now(UTC)


def unit(dim: int = 384, seed: int | None = None) -> np.ndarray[Any, np.dtype[np.float32]]:
    """A random unit vector."""
    rng = np.random.default_rng(seed) if seed is not None else RNG
    v = rng.standard_normal(dim).astype(np.float32)
    return (v / np.linalg.norm(v)).astype(np.float32)


def row(doc: str, idx: int, version: int = 1, count: int = 1, text: str | None = None,
        tenant: str = "default", offset: int = 0, published: datetime = NOW) -> Row:
    """A row to merge with a deterministic vector for its text."""
    text = text or f"{doc} chunk {idx} v{version}"
    return Row(
        tenant_id=tenant, doc_id=doc, chunk_index=idx, doc_version=version, chunk_count=count,
        content_hash=content_hash(text), content=text, char_start=0, char_end=len(text),
        source_uri="", metadata={"v": version}, embedding=unit(seed=abs(hash(text)) % 2**32),
        model_name="m", model_revision="r", model_backend="torch-fp32", embedded_at=NOW,
        published_at=published, offset=offset,
    )


def vector_of(r: Row) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The vector of a row that has one (every row but a chunk gap)."""
    assert r.embedding is not None
    return r.embedding


@pytest.fixture
def store(migrated: Any) -> Iterator[Store]:
    """A Store over a fresh, migrated schema."""
    pool = make_pool(migrated.database)
    try:
        yield Store(migrated, pool)
    finally:
        pool.close()


def rows_of(store: Store) -> dict[tuple[str, str, int], tuple[int, str]]:
    """(tenant, doc, index) -> (version, content) of every stored chunk."""
    with connect(store.cfg.database) as conn:
        return {(t, d, i): (v, c) for t, d, i, v, c in conn.execute(
            "SELECT tenant_id, doc_id, chunk_index, doc_version, content FROM chunks")}


def n_tup_upd(store: Store) -> int:
    """Rows updated in the chunks table so far, from the statistics collector."""
    with store.pool.connection() as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
        conn.commit()
        r = conn.execute("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'chunks' "
                         "AND schemaname = %s", (store.cfg.database.schema,)).fetchone()
    assert r is not None
    return int(r[0])


@through_pgbouncer
def test_reingesting_unchanged_content_updates_no_row(store: Store) -> None:
    """The same rows merged again change nothing: n_tup_upd in pg_stat_user_tables stays flat."""
    rows = [row("a", i, count=3) for i in range(3)] + [row("b", 0)]
    first = store.apply(rows, [])
    assert first.inserted == 4
    before = n_tup_upd(store)
    again = store.apply(rows, [])
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 4)
    assert n_tup_upd(store) == before


@through_pgbouncer
def test_duplicates_in_one_batch_collapse_to_the_newest(store: Store) -> None:
    """Several messages for one key in a batch merge as the newest, without a conflict error."""
    stats = store.apply([row("a", 0, version=1, offset=1), row("a", 0, version=3, offset=2),
                         row("a", 0, version=2, offset=3)], [])
    assert stats.inserted == 1
    assert rows_of(store)[("default", "a", 0)][0] == 3


@through_pgbouncer
def test_older_version_never_overwrites_a_newer_one(store: Store) -> None:
    """A late or replayed older version leaves the newer version in place."""
    store.apply([row("a", 0, version=5, text="new")], [])
    stats = store.apply([row("a", 0, version=4, text="old")], [])
    assert stats.inserted == stats.updated == 0
    assert rows_of(store)[("default", "a", 0)] == (5, "new")


@through_pgbouncer
def test_new_version_with_fewer_chunks_removes_the_stale_ones(store: Store) -> None:
    """Writing version 2 with 2 chunks deletes chunks 2..4 of version 1."""
    store.apply([row("a", i, version=1, count=5) for i in range(5)], [])
    stats = store.apply([row("a", i, version=2, count=2) for i in range(2)], [])
    assert stats.stale_deleted == 3
    assert sorted(k[2] for k in rows_of(store)) == [0, 1]


@through_pgbouncer
def test_document_delete_removes_rows_writes_audit_and_blocks_late_chunks(store: Store) -> None:
    """A document delete removes its chunks, is audited, and a late chunk of it stays out."""
    store.apply([row("a", i, count=2) for i in range(2)] + [row("b", 0)], [])
    req = DeleteRequest("default", "a", None, NOW, {"topic": "t", "partition": 0, "offset": 9})
    assert store.apply([], [req], worker_id="w1").deleted == 2
    store.apply([row("a", 0, count=2)], [])  # redelivered chunk of the deleted version
    assert set(rows_of(store)) == {("default", "b", 0)}
    with connect(store.cfg.database) as conn:
        audit = conn.execute("SELECT action, doc_id, rows_deleted, applied, source->>'worker', "
                             "source->>'offset' FROM audit_log").fetchall()
    assert audit == [("delete_document", "a", 2, True, "w1", "9")]
    later = NOW + timedelta(seconds=1)
    store.apply([row("a", 0, version=2, published=later)], [])  # a new version, published later
    assert ("default", "a", 0) in rows_of(store)


@through_pgbouncer
def test_delete_without_version_refuses_versions_published_before_it(store: Store) -> None:
    """A delete without a version removes what was published before it, even versions the
    writer never stored (a chunk replayed from the dead-letter topic after the delete)."""
    store.apply([row("a", 0, count=2)], [])  # version 1, chunk 1 is in the dead-letter topic
    store.apply([], [DeleteRequest("default", "a", None, NOW, {"offset": 9})])
    before = NOW - timedelta(seconds=5)
    store.apply([row("a", 1, count=2, published=before)], [])  # replayed, original timestamp
    store.apply([row("a", 0, version=3, published=before)], [])  # never stored, but older
    assert rows_of(store) == {}
    with connect(store.cfg.database) as conn:
        assert conn.execute("SELECT deleted FROM documents WHERE doc_id = 'a'").fetchone() == (
            True,)
    store.apply([row("a", 0, version=4, published=NOW + timedelta(seconds=5))], [])
    assert set(rows_of(store)) == {("default", "a", 0)}


@through_pgbouncer
def test_same_version_published_again_after_an_unversioned_delete_lands(store: Store) -> None:
    """A file indexed, deleted, then published again unchanged (same version, from its mtime)
    comes back; a chunk of that version published before the delete does not come with it."""
    store.apply([row("a", 0, count=2), row("a", 1, count=2)], [])
    store.apply([], [DeleteRequest("default", "a", None, NOW, {"offset": 9})])
    later = NOW + timedelta(seconds=5)
    store.apply([row("a", 0, count=2, published=later),
                 row("a", 1, count=2, published=NOW - timedelta(seconds=5))], [])
    assert set(rows_of(store)) == {("default", "a", 0)}


@through_pgbouncer
def test_delete_with_version_keeps_newer_versions_published_before_it(store: Store) -> None:
    """A delete of version 2 does not refuse version 3, whenever version 3 was published."""
    store.apply([], [DeleteRequest("default", "a", 2, NOW, {"offset": 9})])
    store.apply([row("a", 0, version=2, published=NOW - timedelta(seconds=5))], [])
    assert rows_of(store) == {}
    store.apply([row("a", 0, version=3, published=NOW - timedelta(seconds=5))], [])
    assert set(rows_of(store)) == {("default", "a", 0)}


@through_pgbouncer
def test_tenant_delete_removes_every_row_and_earlier_publications(store: Store) -> None:
    """A tenant delete removes all its rows; chunks published before it never come back."""
    store.apply([row("a", 0, tenant="t1"), row("b", 0, tenant="t1"), row("c", 0, tenant="t2")],
                [])
    store.apply([], [DeleteRequest("t1", None, None, NOW, {"offset": 1})])
    store.apply([row("z", 0, tenant="t1", published=NOW - timedelta(seconds=5))], [])
    assert set(rows_of(store)) == {("t2", "c", 0)}
    store.apply([row("z", 0, tenant="t1", published=NOW + timedelta(seconds=5))], [])
    assert ("t1", "z", 0) in rows_of(store)


@through_pgbouncer
def test_two_writers_on_overlapping_keys_never_fail(store: Store) -> None:
    """Concurrent merges of the same keys in opposite orders neither deadlock nor diverge."""
    keys = [(f"d{i % 7}", i % 3) for i in range(60)]
    errors: list[BaseException] = []

    def writer(reverse: bool, version: int) -> None:
        try:
            for n in range(15):
                batch = [row(d, i, version=version + n, count=3)
                         for d, i in (reversed(keys) if reverse else keys)]
                store.apply(batch, [])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(r, v)) for r, v in ((False, 1), (True, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {v for v, _ in rows_of(store).values()} == {15}


@through_pgbouncer
def test_killed_connection_mid_batch_is_retried_to_the_same_result(migrated: Any) -> None:
    """A writer whose connection is killed mid-batch retries, and every row lands once."""
    cfg = migrated
    producer = DurableProducer(cfg.kafka)
    rows = [row(f"doc{i}", 0, text=f"text {i}") for i in range(300)]
    for r in rows:
        emb = Embedding(Chunk(r.tenant_id, r.doc_id, 1, 0, 1, r.content, r.content_hash, 0,
                              len(r.content)), vector_of(r), "m", "r", "torch-fp32")
        producer.produce(cfg.kafka.embeddings_topic, encode_embedding(emb), key=b"k",
                         headers=schema_headers(EMBEDDING))
    producer.flush()
    # Hold a lock so the writer's merge waits, then kill its backend while it waits.
    blocker = connect(cfg.database)
    blocker.execute("LOCK TABLE documents IN EXCLUSIVE MODE")
    killed: list[int] = []

    def killer() -> None:
        try:
            kill()
        except BaseException as exc:
            print("KILLER", repr(exc))
            raise

    def kill() -> None:
        with connect(cfg.database, autocommit=True) as admin:
            for _ in range(1200):
                pids = [p for (p,) in admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND strpos(query, %s) > 0 AND pid <> pg_backend_pid()",
                    (f'"{cfg.database.schema}".documents',))]
                if pids:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pids[0],))
                    killed.append(pids[0])
                    blocker.rollback()
                    return
                time.sleep(0.05)
            blocker.rollback()

    t = threading.Thread(target=killer)
    t.start()
    code = run_stage("write", cfg, until_idle_s=3)
    t.join()
    blocker.close()
    assert code == 0
    assert killed, "the writer never reached the merge while the lock was held"
    with connect(cfg.database) as conn:
        assert conn.execute("SELECT count(*) FROM chunks").fetchone() == (300,)


def test_offsets_are_committed_only_after_the_database_commit(migrated: Any) -> None:
    """A writer that cannot commit to the database stores no offset; the next run lands all."""
    cfg = migrated
    producer = DurableProducer(cfg.kafka)
    for i in range(20):
        r = row(f"doc{i}", 0)
        emb = Embedding(Chunk(r.tenant_id, r.doc_id, 1, 0, 1, r.content, r.content_hash, 0, 1),
                        vector_of(r), "m", "r", "torch-fp32")
        producer.produce(cfg.kafka.embeddings_topic, encode_embedding(emb),
                         key=r.doc_id.encode(), headers=schema_headers(EMBEDDING))
    producer.flush()
    with connect(cfg.database, autocommit=True) as admin:
        # A missing table is neither transient nor a fault of a record: the worker must stop
        # without storing any offset, and dead-letter nothing.
        admin.execute("ALTER TABLE documents RENAME TO documents_away")
        try:
            failing = run_stage("write", cfg, until_idle_s=3)
        finally:
            admin.execute("ALTER TABLE documents_away RENAME TO documents")
    assert failing != 0
    assert offsets_committed(cfg.kafka, cfg.kafka.write_group, cfg.kafka.embeddings_topic) == {}
    assert run_stage("write", cfg, until_idle_s=3) == 0
    with connect(cfg.database) as conn:
        assert conn.execute("SELECT count(*) FROM chunks").fetchone() == (20,)
    assert read_topic(cfg, cfg.kafka.dlq_topic(cfg.kafka.embeddings_topic), timeout=3) == []


@through_pgbouncer
def test_delete_message_through_the_worker_is_applied_and_audited(migrated: Any) -> None:
    """A delete on the embeddings topic removes the document's rows and leaves an audit row."""
    cfg = migrated
    producer = DurableProducer(cfg.kafka)
    for i in range(3):
        r = row("gone", i, count=3)
        emb = Embedding(Chunk(r.tenant_id, "gone", 1, i, 3, r.content, r.content_hash, 0, 1),
                        vector_of(r), "m", "r", "torch-fp32")
        producer.produce(cfg.kafka.embeddings_topic, encode_embedding(emb),
                         key=b"default/gone", headers=schema_headers(EMBEDDING))
    producer.produce(cfg.kafka.embeddings_topic, encode_delete(Delete("default", "gone")),
                     key=b"default/gone", headers=schema_headers(DELETE))
    producer.flush()
    assert run_stage("write", cfg, until_idle_s=3) == 0
    with connect(cfg.database) as conn:
        assert conn.execute("SELECT count(*) FROM chunks").fetchone() == (0,)
        audit = conn.execute("SELECT action, doc_id FROM audit_log").fetchall()
    assert audit == [("delete_document", "gone")]


@through_pgbouncer
def test_psycopg_pool_registers_vector_types(store: Store) -> None:
    """Connections from the pool read vectors as pgvector objects (register_vector in configure)."""
    store.apply([row("a", 0)], [])
    with connect(store.cfg.database) as conn:
        r = conn.execute("SELECT embedding FROM chunks").fetchone()
    assert r is not None and r[0].to_numpy().shape == (384,)
    assert isinstance(psycopg.__version__, str)


def test_a_black_holed_database_fails_the_merge_instead_of_holding_the_writer(
        migrated: Any) -> None:
    """A network that swallows packets in the middle of the writer's transaction: the merge
    fails as a lost connection within database.call_timeout_s (a transient failure, which the
    stage retries) instead of waiting forever; once the network is back, the retry lands."""
    url = psycopg.conninfo.conninfo_to_dict(migrated.database.url)
    proxy = BlackHoleProxy(str(url.get("host") or "127.0.0.1"), int(str(url.get("port") or 5432)))
    via = {**url, "host": "127.0.0.1", "port": proxy.port}
    cfg = with_section(migrated, "database", url=psycopg.conninfo.make_conninfo("", **via),
                       call_timeout_s=2.0, network_timeout_s=2, pool_min=1, pool_max=2)
    pool = make_pool(cfg.database)
    try:
        store = Store(cfg, pool)
        store.apply([row("before", 0)], [])
        proxy.black_hole()
        outcome: list[BaseException | None] = []

        def merge() -> None:
            try:
                store.apply([row("during", 0)], [])
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=merge, daemon=True)
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), "the merge waited on the silent network"
        assert outcome and outcome[0] is not None and is_transient(outcome[0])
        proxy.restore()
        store.apply([row("during", 0)], [])
        assert {d for _, d, _ in rows_of(store)} == {"before", "during"}
    finally:
        pool.close()
        proxy.close()


# -- deletions that hold: late deletes, races, redeliveries, audits -------------------------------

@through_pgbouncer
def test_a_late_delete_never_removes_a_version_published_after_it(store: Store) -> None:
    """A delete without a version that arrives after a newer version (a producer's re-send
    after an outage, a replay, a redelivery) removes nothing published after it: the newer
    version stays searchable, the delete is audited as not applied, and a chunk published
    before the delete still never comes back."""
    t0, t1, t2 = NOW - timedelta(seconds=20), NOW - timedelta(seconds=10), NOW
    store.apply([row("a", 0, version=1, published=t0)], [])
    store.apply([row("a", 0, version=2, text="v2 text", published=t2)], [])
    late = DeleteRequest("default", "a", None, t1, {"offset": 3, "reason": "late"})
    assert store.apply([], [late]).deleted == 0
    assert rows_of(store) == {("default", "a", 0): (2, "v2 text")}
    store.apply([row("a", 1, version=3, count=2, published=t0 + timedelta(seconds=1))], [])
    assert set(rows_of(store)) == {("default", "a", 0)}
    with connect(store.cfg.database) as conn:
        assert conn.execute("SELECT applied FROM audit_log").fetchall() == [(False,)]


@through_pgbouncer
def test_a_delete_delivered_twice_removes_once_and_is_audited_once(store: Store) -> None:
    """Redelivery is normal: the second copy of a delete changes nothing and writes no second
    audit row; a delete of the same document published later is a new request."""
    store.apply([row("a", 0)], [])
    req = DeleteRequest("default", "a", None, NOW + timedelta(seconds=1), {"offset": 5})
    assert store.apply([], [req]).deleted == 1
    assert store.apply([], [req]).deleted == 0
    again = DeleteRequest("default", "a", None, NOW + timedelta(seconds=2), {"offset": 6})
    store.apply([], [again])
    with connect(store.cfg.database) as conn:
        assert conn.execute("SELECT count(*) FROM audit_log").fetchone() == (2,)


@through_pgbouncer
def test_an_audit_problem_never_blocks_a_deletion(store: Store) -> None:
    """A reason that jsonb cannot hold (a NUL character) is cleaned, and the deletion and its
    audit row both land: the chunk removal is never dead-lettered for a cosmetic field."""
    store.apply([row("a", 0)], [])
    req = DeleteRequest("default", "a", None, NOW + timedelta(seconds=1),
                        {"offset": 5, "reason": "ticket\x00 42"})
    assert store.apply([], [req]).deleted == 1
    assert rows_of(store) == {}
    with connect(store.cfg.database) as conn:
        assert conn.execute("SELECT source->>'reason' FROM audit_log").fetchone() == (
            "ticket\ufffd 42",)


class PausingStore(Store):
    """Holds its merge transaction open, after the merge, until told to commit."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.merged = threading.Event()
        self.commit = threading.Event()

    def _merge(self, conn: Any, rows: list[Row]) -> Any:
        stats = super()._merge(conn, rows)
        self.merged.set()
        assert self.commit.wait(30)
        return stats


@through_pgbouncer
def test_a_tenant_deletion_racing_a_merge_of_a_new_document_removes_it(migrated: Any) -> None:
    """A writer on another partition merges a document of a tenant seen for the first time
    while the tenant is being deleted: the deletion waits for the merge's transaction and then
    removes its rows (under READ COMMITTED it could not see them, and they would survive a
    deletion the audit log says applied)."""
    pools = [make_pool(migrated.database), make_pool(migrated.database)]
    try:
        merging, deleting = PausingStore(migrated, pools[0]), Store(migrated, pools[1])
        published = NOW - timedelta(seconds=5)
        merger = threading.Thread(target=merging.apply, daemon=True,
                                  args=([row("new", 0, tenant="racy", published=published)], []))
        merger.start()
        assert merging.merged.wait(30)
        deletion = DeleteRequest("racy", None, None, NOW, {"offset": 1})
        deleter = threading.Thread(target=deleting.apply, args=([], [deletion]), daemon=True)
        deleter.start()
        deleter.join(3)  # waiting on the merge's lock, if the locks are right
        merging.commit.set()
        merger.join(30)
        deleter.join(30)
        assert not merger.is_alive() and not deleter.is_alive()
        assert rows_of(deleting) == {}
    finally:
        for pool in pools:
            pool.close()


def gap(doc: str, idx: int, version: int, count: int, text: str,
        published: datetime = NOW) -> Row:
    """The gap a dead-lettered chunk of ``text`` leaves."""
    return Row.gap_of(ChunkGap("default", doc, version, idx, count, content_hash(text), "bad"),
                      published, 0)


@through_pgbouncer
def test_a_partly_failed_version_leaves_gaps_never_the_old_versions_text(store: Store) -> None:
    """Version 2 of a three-chunk document arrives with its middle chunk dead-lettered: the
    document is served at version 2 with a gap, not with version 1's middle chunk, unless that
    chunk's content is what version 2 has there too. A replay of the dead letter fills the gap."""
    store.apply([row("a", i, version=1, count=3, text=f"v1 chunk {i}") for i in range(3)], [])
    stats = store.apply([row("a", 0, version=2, count=3, text="v2 chunk 0"),
                         gap("a", 1, 2, 3, "v2 chunk 1"),
                         row("a", 2, version=2, count=3, text="v1 chunk 2")], [])
    assert stats.gap_deleted == 1
    assert rows_of(store) == {("default", "a", 0): (2, "v2 chunk 0"),
                              ("default", "a", 2): (2, "v1 chunk 2")}
    store.apply([row("a", 1, version=2, count=3, text="v2 chunk 1")], [])  # the replay
    assert rows_of(store)[("default", "a", 1)] == (2, "v2 chunk 1")


@through_pgbouncer
def test_a_gap_keeps_a_chunk_whose_content_did_not_change(store: Store) -> None:
    """A dead-lettered chunk whose text equals the stored one (of the older version) leaves
    the stored chunk: it is what the new version has at that index."""
    store.apply([row("a", 0, version=1, text="same")], [])
    store.apply([gap("a", 0, 2, 1, "same")], [])
    assert rows_of(store) == {("default", "a", 0): (1, "same")}


@through_pgbouncer
def test_a_gap_published_before_a_delete_does_not_bring_the_document_back(store: Store) -> None:
    """A gap is ordered against deletes like the chunk it stands for."""
    store.apply([row("a", 0, version=1)], [])
    store.apply([], [DeleteRequest("default", "a", None, NOW, {"offset": 1})])
    store.apply([gap("a", 0, 2, 1, "x", published=NOW - timedelta(seconds=1))], [])
    with connect(store.cfg.database) as conn:
        assert conn.execute("SELECT deleted FROM documents WHERE doc_id = 'a'").fetchone() == (
            True,)


@through_pgbouncer
def test_the_same_version_published_again_outlives_a_delete_published_between(
        store: Store) -> None:
    """Version 1 published, deleted, published again (unchanged, so the same version): when the
    writer sees both publications before the late delete, the delete is older than what the
    second publication restated, and removes nothing."""
    t0, t1, t2 = NOW - timedelta(seconds=20), NOW - timedelta(seconds=10), NOW
    store.apply([row("a", 0, published=t0)], [])
    store.apply([row("a", 0, published=t2)], [])
    late = DeleteRequest("default", "a", None, t1, {"offset": 3})
    assert store.apply([], [late]).deleted == 0
    assert set(rows_of(store)) == {("default", "a", 0)}
    # A redelivery of the first publication does not move the time back.
    store.apply([row("a", 0, published=t0)], [])
    assert store.apply([], [replace(late, source={"offset": 4})]).deleted == 0
    assert set(rows_of(store)) == {("default", "a", 0)}


@through_pgbouncer
def test_a_large_tenant_deletion_goes_in_bounded_steps_that_show_progress(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tenant's documents and chunks are deleted STEP rows at a time (each statement short,
    each step renewing the deadline and the batch's progress): all of what was published
    before the deletion goes, none of what came after, and no other tenant's rows."""
    monkeypatch.setattr(erase, "STEP", 3)
    before, after = NOW - timedelta(seconds=5), NOW + timedelta(seconds=5)
    old = [row(f"d{i:02d}", j, count=2, tenant="big", published=before)
           for i in range(10) for j in range(2)]
    new = [row(f"n{i}", 0, tenant="big", published=after) for i in range(4)]
    other = [row("d00", 0, tenant="small", published=before)]
    store.apply([*old, *new, *other], [])
    steps = []
    stats = store.apply([], [DeleteRequest("big", None, None, NOW, {"offset": 1})],
                        progress=lambda: steps.append(1))
    assert stats.deleted == len(old)
    assert set(rows_of(store)) == {r.key for r in [*new, *other]}
    # 14 documents in steps of 3, 24 chunks in steps of 3, and the request itself.
    assert len(steps) >= 5 + 8
    with connect(store.cfg.database) as conn:
        flags = dict(conn.execute(
            "SELECT doc_id, deleted FROM documents WHERE tenant_id = 'big'").fetchall())
    assert flags == {**{f"d{i:02d}": True for i in range(10)},
                     **{f"n{i}": False for i in range(4)}}


@through_pgbouncer
def test_an_audit_table_the_writer_cannot_use_stops_the_deletion(store: Store) -> None:
    """A missing audit table is the deployment's fault, not the record's: the deletion is rolled
    back and the error stops the writer (fatal), rather than erase without a trail."""
    store.apply([row("a", 0)], [])
    with connect(store.cfg.database) as conn:
        conn.execute("ALTER TABLE audit_log RENAME TO audit_log_away")
    try:
        with pytest.raises(psycopg.errors.UndefinedTable) as caught:
            store.apply([], [DeleteRequest("default", "a", None, NOW + timedelta(seconds=1),
                                           {"offset": 5})])
        assert is_fatal(caught.value)
        assert set(rows_of(store)) == {("default", "a", 0)}
    finally:
        with connect(store.cfg.database) as conn:
            conn.execute("ALTER TABLE audit_log_away RENAME TO audit_log")


@through_pgbouncer
def test_erased_covers_a_tombstones_versions_as_the_writer_does(store: Store) -> None:
    """What the dead-letter tools leave out is what the writer would refuse: versions below a
    tombstone's, its own version after a delete with a version, and not after a delete without
    one when published after it (that publication brings the document back)."""
    t0, t1, t2 = NOW - timedelta(seconds=20), NOW - timedelta(seconds=10), NOW
    store.apply([row("a", 0, version=3, published=t0), row("b", 0, version=3, published=t0)], [])
    store.apply([], [DeleteRequest("default", "a", 3, t1, {"offset": 1}),
                     DeleteRequest("default", "b", None, t1, {"offset": 2})])
    probes = [("default", "a", 2, t2), ("default", "a", 3, t2), ("default", "a", 4, t2),
              ("default", "b", 2, t2), ("default", "b", 3, t2), ("default", "b", 3, t0),
              ("default", "c", 1, t0)]
    with connect(store.cfg.database) as conn:
        covered = erased(conn, store.cfg.database.schema, probes)
    assert covered == {0, 1, 3, 5}
    # And the writer agrees on every probe that it would land.
    for i, (_, doc, version, published) in enumerate(probes[:6]):
        store.apply([row(doc, 0, version=version, text=f"probe {i}", published=published)], [])
        landed = rows_of(store).get(("default", doc, 0)) == (version, f"probe {i}")
        assert landed == (i not in covered), probes[i]


@through_pgbouncer
def test_a_version_deleted_by_version_stays_deleted_after_a_late_delete_moved_its_time(
        store: Store) -> None:
    """A late delete without a version (kept nothing from being published) moves
    deleted_before; then a delete of version 3 removes it: a redelivered chunk of version 3,
    published after the late delete, must not bring it back, and erased() agrees."""
    t0, t1 = NOW - timedelta(seconds=20), NOW - timedelta(seconds=10)
    store.apply([row("a", 0, version=3, published=t1)], [])
    assert store.apply([], [DeleteRequest("default", "a", None, t0, {"offset": 1})]).deleted == 0
    assert store.apply([], [DeleteRequest("default", "a", 3, NOW, {"offset": 2})]).deleted == 1
    store.apply([row("a", 0, version=3, published=t1)], [])  # the redelivery
    assert rows_of(store) == {}
    with connect(store.cfg.database) as conn:
        assert erased(conn, store.cfg.database.schema, [("default", "a", 3, t1),
                                                        ("default", "a", 4, t1)]) == {0}
    store.apply([row("a", 0, version=4, published=t1)], [])
    assert set(rows_of(store)) == {("default", "a", 0)}


@through_pgbouncer
def test_a_writer_waits_out_a_long_tenant_deletion_showing_progress(
        migrated: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A merge that needs a lock a tenant deletion holds waits in short steps (each a bounded
    lock wait in a savepoint, then its progress shown), however long the deletion runs, instead
    of one wait that statement_timeout would cancel; it lands once the deletion commits."""
    monkeypatch.setattr(erase, "LOCK_STEP_MS", 100)
    schema = migrated.database.schema
    key = erase.tenant_lock(schema, "busy")
    pool = make_pool(migrated.database)
    try:
        with connect(migrated.database) as held, connect(migrated.database) as other:
            # The premise: a lock taken in a savepoint that rolls back is released.
            with held.transaction():
                held.execute("SAVEPOINT s")
                held.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
                held.execute("ROLLBACK TO SAVEPOINT s")
                assert other.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone() == (
                    True,)
                other.execute("SELECT pg_advisory_unlock(%s)", (key,))
            # A deletion's transaction holds the tenant's lock; a writer wants it.
            held.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
            waits = threading.Semaphore(0)
            writer = Store(migrated, pool)
            merged = threading.Thread(target=writer.apply, daemon=True, kwargs={
                "rows": [row("x", 0, tenant="busy")], "deletes": [],
                "progress": waits.release})
            merged.start()
            for _ in range(3):
                assert waits.acquire(timeout=30), "the writer stopped showing progress"
            assert rows_of(writer) == {}
            held.commit()
            merged.join(30)
            assert not merged.is_alive()
            assert set(rows_of(writer)) == {("busy", "x", 0)}
    finally:
        pool.close()
