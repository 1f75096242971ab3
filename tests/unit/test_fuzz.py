"""Property-based fuzzing of the record boundary (tests/fuzz.py makes the records).

Every generated record, alone in a batch, either comes out of the stage faithfully (the
embedding carries exactly the chunk that was sent; the row holds exactly the embedding's chunk)
or is dead-lettered once, with a reason; and the stage never raises. The writer's side against
the real database is in tests/integration/test_fuzz_db.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt
from hypothesis import given

from tests.fakes import FakeProducer, FakeRecord
from tests.fuzz import FUZZ, chunk_values, embedding_values
from vecpipe.config import Config, load_config
from vecpipe.db.erase import DeleteRequest
from vecpipe.db.store import MergeStats, Row
from vecpipe.deadletter.guard import DeadLetterGuard
from vecpipe.deadletter.sender import DeadLetters
from vecpipe.health import Metrics
from vecpipe.kafka.consumer import Batch
from vecpipe.logs import get_logger
from vecpipe.messages import CHUNK, EMBEDDING, GAP, Chunk, Embedding, decode, schema_headers
from workers.embed import EmbedProcessor
from workers.write import WriteProcessor

DIM = 8
BASE = load_config(environ={})
CFG: Config = replace(
    BASE, vector=replace(BASE.vector, dimension=DIM),
    retry=replace(BASE.retry, attempts=2, initial_wait_s=0.001, max_wait_s=0.002),
    # One bad record after another is what a fuzzer sends: the cap is not under test here.
    dead_letter=replace(BASE.dead_letter, max_consecutive=10**9, max_ratio=1.0))


class Encoder:
    """Deterministic vectors; refuses (like a tokenizer) texts with a lone surrogate."""

    name, revision, backend_tag, dimension = "fuzz", "1", "torch-fp32", DIM

    def encode(self, texts: list[str], batch_size: int | None = None) -> npt.NDArray[np.float32]:
        for t in texts:
            t.encode("utf-8")
        return np.stack([np.random.default_rng(len(t)).standard_normal(DIM).astype(np.float32)
                         for t in texts])


def _decoded(value: bytes, headers: Any) -> Any:
    try:
        return decode(value, headers)
    except Exception:
        return None


@FUZZ
@given(chunk_values)
def test_every_chunk_is_embedded_faithfully_or_dead_lettered(value: bytes) -> None:
    """The embed stage over any chunk record: the embedding carries the chunk as sent, or the
    record is dead-lettered once; never an exception."""
    producer = FakeProducer()
    fake: Any = producer
    processor = EmbedProcessor(CFG, Encoder(), fake,
                               DeadLetters(fake, CFG.kafka, "embed", "w"),
                               DeadLetterGuard(CFG.dead_letter), Metrics("embed"), get_logger())
    record: Any = FakeRecord(CFG.kafka.chunks_topic, 0, 1, b"acme/doc", value,
                             schema_headers(CHUNK))
    assert processor.process(Batch([record])) == [record]
    out = [s for s in producer.to(CFG.kafka.embeddings_topic)
           if dict(s.headers).get("vecpipe.schema") != GAP.encode()]
    dead = producer.to(CFG.kafka.dlq_topic(CFG.kafka.chunks_topic))
    assert len(out) + len(dead) == 1
    if out:
        sent = _decoded(value, schema_headers(CHUNK))
        emb = decode(out[0].value, out[0].headers)
        assert isinstance(sent, Chunk) and isinstance(emb, Embedding)
        assert emb.chunk == sent


class Store:
    """Keeps what one transaction would commit."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def apply(self, rows: Sequence[Row], deletes: Sequence[DeleteRequest],
              worker_id: str = "", progress: Callable[[], None] = lambda: None) -> MergeStats:
        self.rows.extend(rows)
        return MergeStats(inserted=len(rows))


@FUZZ
@given(embedding_values())
def test_every_embedding_becomes_a_faithful_row_or_is_dead_lettered(value: bytes) -> None:
    """The writer over any embedding record: the row holds the embedding's chunk and unit
    vector as sent, or the record is dead-lettered once; never an exception."""
    producer, store = FakeProducer(), Store()
    fake: Any = producer
    processor = WriteProcessor(CFG, store, fake, DeadLetters(fake, CFG.kafka, "write", "w"),
                               DeadLetterGuard(CFG.dead_letter), Metrics("write"), get_logger(),
                               "w")
    record: Any = FakeRecord(CFG.kafka.embeddings_topic, 0, 1, b"acme/doc", value,
                             schema_headers(EMBEDDING))
    assert processor.process(Batch([record])) == [record]
    dead = producer.to(CFG.kafka.dlq_topic(CFG.kafka.embeddings_topic))
    assert len(store.rows) + len(dead) == 1
    if store.rows:
        emb = decode(value, schema_headers(EMBEDDING))
        assert isinstance(emb, Embedding)
        [row] = store.rows
        c = emb.chunk
        assert (row.tenant_id, row.doc_id, row.chunk_index, row.doc_version, row.content,
                row.metadata) == (c.tenant_id, c.doc_id, c.chunk_index, c.version, c.text,
                                  dict(c.metadata))
        assert row.embedding is not None
        assert abs(float(np.linalg.norm(row.embedding)) - 1.0) < 1e-2
