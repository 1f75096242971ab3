"""Unit tests of workers.write.WriteProcessor with a fake store, and of vecpipe.store.collapse."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import numpy as np
import psycopg
import psycopg.errors
import pytest

from tests.fakes import FakeProducer, FakeRecord, Sent
from vecpipe.config import Config, load_config
from vecpipe.db.erase import DeleteRequest
from vecpipe.db.store import MergeStats, Row, collapse
from vecpipe.deadletter.guard import DeadLetterGuard
from vecpipe.deadletter.headers import H_CLASS, H_MESSAGE, H_STAGE
from vecpipe.deadletter.sender import DeadLetters
from vecpipe.errors import DeadLetterRateExceeded
from vecpipe.health import Metrics
from vecpipe.kafka.consumer import Batch
from vecpipe.logs import get_logger
from vecpipe.messages import (
    CHUNK,
    DELETE,
    EMBEDDING,
    Chunk,
    ChunkGap,
    Delete,
    Embedding,
    content_hash,
    encode_chunk,
    encode_delete,
    encode_embedding,
    schema_headers,
)
from workers.write import WriteProcessor

DIM = 4
TOPIC = "vecpipe.embeddings"
DLQ = TOPIC + ".dlq"
BASE = load_config(environ={})
CFG = replace(
    BASE,
    vector=replace(BASE.vector, dimension=DIM),
    retry=replace(BASE.retry, attempts=3, initial_wait_s=0.001, max_wait_s=0.002),
)
T0 = 1_714_566_615_000
UNIT = np.array([0.5, 0.5, 0.5, 0.5], dtype=np.float32)


# -- fakes ---------------------------------------------------------------------------------------


@dataclass
class Call:
    """One call of FakeStore.apply and whether it committed."""

    rows: list[Row]
    deletes: list[DeleteRequest]
    worker_id: str
    ok: bool = True


@dataclass
class FakeStore:
    """Records apply calls; can deadlock once, or refuse rows or deletes of one document."""

    deadlock_once: bool = False
    bad_doc: str | None = None
    bad_delete: str | None = None
    error: type[psycopg.Error] = psycopg.errors.DataException
    calls: list[Call] = field(default_factory=list)

    def apply(self, rows: Sequence[Row], deletes: Sequence[DeleteRequest],
              worker_id: str = "", progress: Callable[[], None] = lambda: None) -> MergeStats:
        call = Call(list(rows), list(deletes), worker_id)
        self.calls.append(call)
        if self.deadlock_once:
            self.deadlock_once = False
            call.ok = False
            raise psycopg.errors.DeadlockDetected("deadlock detected")
        if self.bad_doc is not None and any(r.doc_id == self.bad_doc for r in rows):
            call.ok = False
            raise self.error(f"invalid input in document {self.bad_doc}")
        if self.bad_delete is not None and any(d.doc_id == self.bad_delete for d in deletes):
            call.ok = False
            raise self.error(f"cannot delete {self.bad_delete}")
        return MergeStats(inserted=len(collapse(rows)), deleted=len(deletes))

    @property
    def committed_rows(self) -> list[Row]:
        return [r for c in self.calls if c.ok for r in c.rows]

    @property
    def committed_deletes(self) -> list[DeleteRequest]:
        return [d for c in self.calls if c.ok for d in c.deletes]


def chunk(doc: str = "doc-1", index: int = 0, version: int = 1, text: str = "some text",
          tenant: str = "acme", **changes: Any) -> Chunk:
    c = Chunk(tenant_id=tenant, doc_id=doc, version=version, chunk_index=index, chunk_count=4,
              text=text, content_hash=content_hash(text), char_start=0, char_end=len(text))
    return replace(c, **changes)


class Feed:
    """Builds messages of one partition with increasing offsets and timestamps."""

    def __init__(self) -> None:
        self.offset = -1

    def _next(self) -> tuple[int, tuple[int, int]]:
        self.offset += 1
        return self.offset, (1, T0 + 1000 * self.offset)

    def emb(self, c: Chunk, vector: np.ndarray[Any, Any] = UNIT) -> FakeRecord:
        off, ts = self._next()
        e = Embedding(chunk=c, vector=np.asarray(vector, dtype=np.float32),
                      model_name="fake-minilm", model_revision="rev-1", backend="torch-fp32",
                      embedded_at="2024-05-01T12:00:00+00:00")
        return FakeRecord(TOPIC, 0, off, c.key, encode_embedding(e), schema_headers(EMBEDDING),
                          ts)

    def delete(self, d: Delete) -> FakeRecord:
        off, ts = self._next()
        return FakeRecord(TOPIC, 0, off, d.key, encode_delete(d), schema_headers(DELETE), ts)

    def chunk_msg(self, c: Chunk) -> FakeRecord:
        off, ts = self._next()
        return FakeRecord(TOPIC, 0, off, c.key, encode_chunk(c), schema_headers(CHUNK), ts)


@dataclass
class Stage:
    """A WriteProcessor wired to fakes, and the fakes to inspect."""

    processor: WriteProcessor
    store: FakeStore
    producer: FakeProducer
    metrics: Metrics

    def run(self, messages: list[FakeRecord]) -> Any:
        msgs: list[Any] = list(messages)
        return self.processor.process(Batch(msgs))

    def dead(self) -> list[Sent]:
        return self.producer.to(DLQ)

    def reasons(self) -> dict[int, str]:
        """Dead-letter message by original offset."""
        out = {}
        for s in self.dead():
            h = dict(s.headers)
            out[int(h["__connect.errors.offset"])] = h[H_MESSAGE].decode()
        return out


def stage(store: FakeStore | None = None, cfg: Config = CFG) -> Stage:
    store = store or FakeStore()
    producer = FakeProducer()
    fake: Any = producer
    metrics = Metrics("write")
    processor = WriteProcessor(
        cfg, store, fake, DeadLetters(fake, cfg.kafka, "write", "w-1"),
        DeadLetterGuard(cfg.dead_letter), metrics, get_logger(), worker_id="w-1")
    return Stage(processor, store, producer, metrics)


def row(doc: str, index: int, version: int, offset: int, tenant: str = "acme") -> Row:
    when = datetime(2024, 5, 1, tzinfo=UTC)
    return Row(tenant_id=tenant, doc_id=doc, chunk_index=index, doc_version=version,
               chunk_count=4, content_hash="0" * 64, content=f"{doc}-{index}-v{version}",
               char_start=0, char_end=1, source_uri="", metadata={}, embedding=UNIT,
               model_name="m", model_revision="", model_backend="b", embedded_at=when,
               published_at=when, offset=offset)


# -- collapse ------------------------------------------------------------------------------------


def test_collapse_keeps_newest_per_key_sorted_by_key() -> None:
    """One row per key survives: highest version, then highest offset; sorted by key."""
    rows = [
        row("b", 0, 1, offset=1),
        row("a", 1, 2, offset=2),
        row("a", 1, 3, offset=3),   # newer version wins
        row("a", 1, 1, offset=9),   # a later offset of an older version loses
        row("a", 0, 2, offset=4),
        row("a", 0, 2, offset=7),   # same version: the later offset wins
        row("a", 0, 2, offset=5),
        row("b", 0, 1, offset=0, tenant="aaa"),
    ]
    out = collapse(rows)
    assert [(r.tenant_id, r.doc_id, r.chunk_index) for r in out] == [
        ("aaa", "b", 0), ("acme", "a", 0), ("acme", "a", 1), ("acme", "b", 0)]
    assert [(r.doc_version, r.offset) for r in out] == [(1, 0), (2, 7), (3, 3), (1, 1)]


def test_collapse_of_nothing() -> None:
    """Collapsing no rows gives no rows."""
    assert collapse([]) == []


def test_collapse_sorts_chunk_index_numerically() -> None:
    """Chunk 10 sorts after chunk 9, not after chunk 1."""
    out = collapse([row("a", i, 1, offset=i) for i in (10, 9, 1, 0)])
    assert [r.chunk_index for r in out] == [0, 1, 9, 10]


# -- the stage -----------------------------------------------------------------------------------


def test_rows_reach_the_store_and_all_records_return() -> None:
    """Valid embeddings become rows in one apply call, with provenance; all records return."""
    feed = Feed()
    msgs = [feed.emb(chunk("d1", 0)), feed.emb(chunk("d1", 1)), feed.emb(chunk("d2", 0))]
    s = stage()
    assert s.run(msgs) == msgs
    [call] = s.store.calls
    assert call.worker_id == "w-1"
    assert call.deletes == []
    assert [(r.doc_id, r.chunk_index, r.offset) for r in call.rows] == [
        ("d1", 0, 0), ("d1", 1, 1), ("d2", 0, 2)]
    r = call.rows[0]
    assert (r.tenant_id, r.doc_version, r.content, r.model_name, r.model_backend) == (
        "acme", 1, "some text", "fake-minilm", "torch-fp32")
    assert r.published_at == datetime.fromtimestamp(T0 / 1000, UTC)
    assert r.embedded_at == datetime(2024, 5, 1, 12, tzinfo=UTC)
    np.testing.assert_array_equal(r.embedding, UNIT)
    assert s.dead() == []
    assert s.producer.flushes == 0


def test_bad_vectors_and_nul_text_are_dead_lettered_precisely() -> None:
    """Wrong dimension, non-unit vectors and NUL in text go to <embeddings>.dlq with a reason
    that names the problem; the good record is still written."""
    feed = Feed()
    good = feed.emb(chunk("good"))
    wrong_dim = feed.emb(chunk("dim"), vector=np.array([0.6, 0.8, 0.0], dtype=np.float32))
    not_unit = feed.emb(chunk("norm"), vector=np.array([1, 1, 1, 1], dtype=np.float32))
    nul = feed.emb(chunk("nul", text="bad\x00text"))
    msgs = [good, wrong_dim, not_unit, nul]
    s = stage()
    assert s.run(msgs) == msgs
    assert [r.doc_id for r in s.store.committed_rows if not r.gap] == ["good"]
    # A chunk refused after decoding leaves a gap in its slot, as one the embed stage refuses
    # does; one that breaks the contract (NUL) leaves none, as its fields cannot be trusted.
    assert sorted(r.doc_id for r in s.store.committed_rows if r.gap) == ["dim", "norm"]
    reasons = s.reasons()
    assert set(reasons) == {1, 2, 3}
    assert "the vector has 3 dimensions but the table stores 4" in reasons[1]
    assert "norm is 2.0000, not 1" in reasons[2]
    assert "NUL character (U+0000)" in reasons[3]
    for dead, msg in zip(s.dead(), msgs[1:], strict=True):
        assert (dead.value, dead.key) == (msg.value_, msg.key_)
        assert dict(dead.headers)[H_STAGE] == b"write"
        assert dict(dead.headers)[H_CLASS] in (b"vecpipe.errors.PermanentError",
                                               b"vecpipe.errors.InvalidMessage")
    assert s.producer.flushes == 1
    dead_count = s.metrics.registry.get_sample_value(
        "vecpipe_dead_letters_total", {"stage": "write"})
    assert dead_count == 3


def test_nul_in_source_uri_is_dead_lettered() -> None:
    """A NUL in the source URI is refused before it reaches PostgreSQL."""
    feed = Feed()
    msg = feed.emb(chunk("d", source_uri="file:///a\x00b"))
    s = stage()
    s.run([msg])
    assert "NUL character" in s.reasons()[0]
    assert s.store.calls == []


def test_float16_rounding_is_accepted() -> None:
    """A unit vector that travelled as float16 passes the norm check."""
    feed = Feed()
    vec = np.array([0.1, 0.2, 0.3, 0.9], dtype=np.float32)
    vec /= np.linalg.norm(vec)
    e = Embedding(chunk=chunk("h"), vector=vec, model_name="m", model_revision="",
                  backend="torch-fp16", embedded_at="2024-05-01T12:00:00+00:00")
    msg = feed.emb(chunk("h"))
    msg.value_ = encode_embedding(e, "float16")
    s = stage()
    s.run([msg])
    assert s.dead() == []
    assert len(s.store.committed_rows) == 1


def test_chunk_on_the_embeddings_topic_is_dead_lettered() -> None:
    """A chunk message (no vector) on the embeddings topic is refused."""
    feed = Feed()
    msg = feed.chunk_msg(chunk("c"))
    s = stage()
    assert s.run([msg]) == [msg]
    assert "a chunk without a vector was published on the embeddings topic" in s.reasons()[0]
    assert s.store.calls == []


def test_undecodable_record_is_dead_lettered() -> None:
    """A record that is not a valid message at all is dead-lettered, the batch goes on."""
    feed = Feed()
    bad = feed.emb(chunk("x"))
    bad.value_ = b"\x00\x00\x00\x05{}"
    good = feed.emb(chunk("y"))
    s = stage()
    assert s.run([bad, good]) == [bad, good]
    assert set(s.reasons()) == {0}
    assert [r.doc_id for r in s.store.committed_rows] == ["y"]


def test_rows_of_a_document_deleted_later_in_the_batch_are_dropped() -> None:
    """Rows before a delete of their document never reach the store; rows after it do."""
    feed = Feed()
    before = [feed.emb(chunk("d1", 0)), feed.emb(chunk("d1", 1)), feed.emb(chunk("d2", 0))]
    delete = feed.delete(Delete(tenant_id="acme", doc_id="d1", requested_at="t"))
    after = feed.emb(chunk("d1", 0, version=2))
    msgs = [*before, delete, after]
    s = stage()
    assert s.run(msgs) == msgs
    [call] = s.store.calls
    assert [(r.doc_id, r.chunk_index, r.doc_version) for r in call.rows] == [
        ("d2", 0, 1), ("d1", 0, 2)]
    [req] = call.deletes
    assert (req.tenant_id, req.doc_id, req.version) == ("acme", "d1", None)
    assert req.supersedes == 1  # the tombstone records the version it dropped
    assert req.source["offset"] == 3
    assert req.published_at == datetime.fromtimestamp((T0 + 3000) / 1000, UTC)


def test_rows_published_before_a_tenant_delete_are_dropped() -> None:
    """A tenant delete drops that tenant's rows published before it, and no other tenant's."""
    feed = Feed()
    msgs = [
        feed.emb(chunk("d1")),
        feed.emb(chunk("d1", tenant="other")),
        feed.delete(Delete(tenant_id="acme", requested_at="t")),
        feed.emb(chunk("d2")),
    ]
    s = stage()
    s.run(msgs)
    # The tenant deletion commits first, in a transaction of its own; then the rows.
    deletion, merge = s.store.calls
    assert (deletion.rows, [(d.tenant_id, d.doc_id) for d in deletion.deletes]) == (
        [], [("acme", None)])
    assert [(r.tenant_id, r.doc_id) for r in merge.rows] == [("other", "d1"), ("acme", "d2")]
    assert merge.deletes == []


def test_a_row_refused_next_to_a_tenant_deletion_does_not_redo_the_deletion() -> None:
    """Halving around a refused row repeats the merge, never the tenant deletion before it."""
    feed = Feed()
    msgs = [feed.delete(Delete(tenant_id="gone", requested_at="t")),
            *(feed.emb(chunk(f"d{i}")) for i in range(6))]
    s = stage(FakeStore(bad_doc="d3"))
    assert s.run(msgs) == msgs
    assert sum(1 for c in s.store.calls for d in c.deletes if d.tenant_id == "gone") == 1
    assert set(s.reasons()) == {4}


def test_versioned_delete_keeps_newer_rows_earlier_in_the_batch() -> None:
    """A delete of version 1 does not drop a version-2 row published just before it."""
    feed = Feed()
    newer = feed.emb(chunk("d1", version=2))
    delete = feed.delete(Delete(tenant_id="acme", doc_id="d1", version=1, requested_at="t"))
    s = stage()
    s.run([newer, delete])
    [call] = s.store.calls
    assert [(r.doc_id, r.doc_version) for r in call.rows] == [("d1", 2)]


def test_deadlock_is_retried() -> None:
    """A deadlock is retried with the same rows and deletes, and nothing is dead-lettered."""
    feed = Feed()
    msgs = [feed.emb(chunk("d1")), feed.delete(Delete(tenant_id="acme", doc_id="d9",
                                                      requested_at="t"))]
    s = stage(FakeStore(deadlock_once=True))
    assert s.run(msgs) == msgs
    first, second = s.store.calls
    assert (first.ok, second.ok) == (False, True)
    assert first.rows == second.rows and first.deletes == second.deletes
    assert s.dead() == []
    retries = s.metrics.registry.get_sample_value(
        "vecpipe_retries_total", {"stage": "write", "kind": "database"})
    assert retries == 1


@pytest.mark.parametrize("error", [
    psycopg.errors.DataException,
    psycopg.errors.InvalidTextRepresentation,
    psycopg.errors.UntranslatableCharacter,
])
def test_row_the_database_refuses_is_bisected_out(error: type[psycopg.Error]) -> None:
    """A row the database refuses is found by bisection; only its record is dead-lettered and
    every other row and delete is committed exactly once."""
    feed = Feed()
    msgs = [feed.emb(chunk(f"d{i}")) for i in range(7)]
    msgs.insert(2, feed.delete(Delete(tenant_id="acme", doc_id="gone", requested_at="t")))
    bad = msgs[5]
    s = stage(FakeStore(bad_doc="d4", error=error))
    assert s.run(msgs) == msgs
    committed = [r.doc_id for r in s.store.committed_rows]
    assert sorted(committed) == ["d0", "d1", "d2", "d3", "d5", "d6"]
    assert [d.doc_id for d in s.store.committed_deletes] == ["gone"]
    [dead] = s.dead()
    assert (dead.key, dead.value) == (bad.key_, bad.value_)
    assert "invalid input in document d4" in dict(dead.headers)[H_MESSAGE].decode()
    assert s.producer.flushes == 1


def test_transient_failure_that_persists_fails_the_batch() -> None:
    """A database that keeps failing transiently fails the batch (nothing is stored)."""

    class Down(FakeStore):
        def apply(self, rows: Sequence[Row], deletes: Sequence[DeleteRequest],
                  worker_id: str = "", progress: Callable[[], None] = lambda: None) -> MergeStats:
            self.calls.append(Call(list(rows), list(deletes), worker_id, ok=False))
            raise psycopg.OperationalError("connection refused")

    feed = Feed()
    s = stage(Down())
    with pytest.raises(psycopg.OperationalError):
        s.run([feed.emb(chunk("d1")), feed.emb(chunk("d2"))])
    assert len(s.store.calls) == CFG.retry.attempts
    assert s.dead() == []


@pytest.mark.parametrize("deletes", [1, 2])
def test_delete_the_database_refuses_is_dead_lettered(deletes: int) -> None:
    """A delete the database refuses goes to the dead letters; the rest is committed."""
    feed = Feed()
    msgs = [feed.emb(chunk("d1")),
            feed.delete(Delete(tenant_id="acme", doc_id="bad", requested_at="t",
                               reason="nul \x00 in the audit json"))]
    if deletes == 2:
        msgs.append(feed.delete(Delete(tenant_id="acme", doc_id="fine", requested_at="t")))
    s = stage(FakeStore(bad_delete="bad"))
    assert s.run(msgs) == msgs
    assert [r.doc_id for r in s.store.committed_rows] == ["d1"]
    assert [d.doc_id for d in s.store.committed_deletes] == ["fine"] * (deletes - 1)
    assert set(s.reasons()) == {1}


def test_empty_batch_makes_no_store_call() -> None:
    """A batch with nothing to write does not touch the database."""
    feed = Feed()
    msg = feed.chunk_msg(chunk("c"))
    s = stage()
    s.run([msg])
    s2 = stage()
    assert s2.run([]) == []
    assert s.store.calls == [] and s2.store.calls == []


def test_a_row_the_database_refuses_leaves_a_gap_merged_after_the_rest() -> None:
    """The slot of a row the database refuses is emptied (a gap, merged once the rest of the
    batch is in), so the document never serves an older version's text there."""
    feed = Feed()
    msgs = [feed.emb(chunk("d1", 0, version=2)), feed.emb(chunk("d1", 1, version=2, text="bad"))]

    class RefusesText(FakeStore):
        def apply(self, rows: Sequence[Row], deletes: Sequence[DeleteRequest],
                  worker_id: str = "", progress: Callable[[], None] = lambda: None) -> MergeStats:
            if any(r.content == "bad" for r in rows):
                self.calls.append(Call(list(rows), list(deletes), worker_id, ok=False))
                raise psycopg.errors.DataException("invalid input")
            return super().apply(rows, deletes, worker_id, progress)

    s = stage(RefusesText())
    assert s.run(msgs) == msgs
    assert set(s.reasons()) == {1}
    committed = [(r.chunk_index, r.doc_version, r.gap) for r in s.store.committed_rows]
    assert committed == [(0, 2, False), (1, 2, True)]
    gap = s.store.committed_rows[1]
    assert (gap.content, gap.embedding, gap.content_hash) == ("", None, content_hash("bad"))


def test_a_gap_that_cannot_be_merged_only_costs_its_slot() -> None:
    """When even the gap is refused, the record is still dead-lettered once and the batch goes
    on: the gap is best effort."""
    feed = Feed()
    msgs = [feed.emb(chunk("d1")), feed.emb(chunk("d2"))]
    s = stage(FakeStore(bad_doc="d2"))
    assert s.run(msgs) == msgs
    assert set(s.reasons()) == {1}
    assert [r.doc_id for r in s.store.committed_rows] == ["d1"]
    assert any(r.gap for c in s.store.calls if not c.ok for r in c.rows)


def test_a_chunk_beats_a_gap_for_the_same_slot_and_version() -> None:
    """Within one batch a chunk that arrived wins over a gap of the same version."""
    c = chunk("d", 0, version=2)
    real = Row.gap_of(ChunkGap.of(c, "x"), datetime.now(UTC), 9)
    row = replace(real, gap=False, content="text", offset=3)
    assert collapse([row, real]) == [row]
    assert collapse([real, replace(row, doc_version=1)]) == [real]


def test_a_batch_waiting_out_a_database_outage_keeps_showing_progress() -> None:
    """Retries of a transient failure beat the batch's progress, so the liveness probe does not
    restart a writer that is only waiting for the database to come back."""
    def beats(store: FakeStore) -> int:
        count: list[int] = []
        msgs: list[Any] = [Feed().emb(chunk("d1"))]
        stage(store).processor.process(Batch(msgs, progress=lambda: count.append(1)))
        return len(count)

    assert beats(FakeStore(deadlock_once=True)) > beats(FakeStore())


def test_a_batch_that_trips_the_dead_letter_cap_leaves_no_gaps() -> None:
    """A writer whose every embedding is refused (a wrong vector.dimension, say) is about to stop
    on the dead-letter cap: it must not empty the slots of the chunks it refused."""
    feed = Feed()
    wrong = np.array([0.6, 0.8, 0.0], dtype=np.float32)
    msgs = [feed.emb(chunk(f"d{i}"), vector=wrong) for i in range(CFG.dead_letter.max_consecutive)]
    s = stage()
    with pytest.raises(DeadLetterRateExceeded):
        s.run(msgs)
    assert not [r for c in s.store.calls for r in c.rows if r.gap]
    # Below the cap the same refusals leave their gaps.
    few = stage()
    few.run(msgs[:3])
    assert len([r for r in few.store.committed_rows if r.gap]) == 3


@pytest.mark.parametrize(("ratio", "paused"), [(0.0, False), (0.5, True)])
def test_the_writer_paces_itself_after_each_merge(monkeypatch: pytest.MonkeyPatch, ratio: float,
                                                   paused: bool) -> None:
    """write.pause_ratio: after a merge, the writer leaves the database alone for that share of
    the merge's time (bounded), and never with the default of 0."""
    import workers.write as write_stage

    sleeps: list[float] = []
    clock = iter([100.0, 104.0, 200.0, 200.1])
    monkeypatch.setattr(write_stage, "time", SimpleNamespace(monotonic=lambda: next(clock),
                                                             sleep=sleeps.append))
    cfg = replace(CFG, write=replace(CFG.write, pause_ratio=ratio))
    feed = Feed()
    s = stage(cfg=cfg)
    s.run([feed.emb(chunk("d1", 0))])
    s.run([feed.emb(chunk("d2", 0))])
    # 4 s merge: 2 s at most; 0.1 s merge: half of it.
    assert sleeps == ([write_stage.MAX_PAUSE_S, pytest.approx(0.05)] if paused else [])
