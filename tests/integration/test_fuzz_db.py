"""The fuzzer's embedding records through the real writer and the real PostgreSQL.

Each generated record, alone in a batch, is stored exactly as its embedding says (read back
from the table) or dead-lettered once; the writer never raises. This is the database half of
tests/unit/test_fuzz.py: what PostgreSQL refuses (a value it cannot store, an index row too
large) must be isolated to the record, never stop the stage.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from tests.fakes import FakeProducer, FakeRecord
from tests.fuzz import FUZZ, embedding_values
from tests.helpers import connect
from vecpipe.config import with_section
from vecpipe.db.migrate import migrate
from vecpipe.db.pool import make_pool
from vecpipe.db.store import Store
from vecpipe.deadletter.guard import DeadLetterGuard
from vecpipe.deadletter.sender import DeadLetters
from vecpipe.health import Metrics
from vecpipe.kafka.consumer import Batch
from vecpipe.logs import get_logger
from vecpipe.messages import EMBEDDING, Embedding, decode, schema_headers
from workers.write import WriteProcessor

pytestmark = pytest.mark.integration


@pytest.fixture
def writer(cfg: Any) -> Iterator[tuple[Any, Store]]:
    """A migrated schema for 8-dimension vectors, and a Store over it."""
    small = with_section(with_section(cfg, "vector", dimension=8, index="none"),
                         "dead_letter", max_consecutive=10**9, max_ratio=1.0)
    small = with_section(small, "retry", attempts=2, initial_wait_s=0.01, max_wait_s=0.02)
    migrate(small)
    pool = make_pool(small.database)
    try:
        yield small, Store(small, pool)
    finally:
        pool.close()


@settings(parent=FUZZ, max_examples=max(10, FUZZ.max_examples // 3),
          suppress_health_check=[*FUZZ.suppress_health_check,
                                 HealthCheck.function_scoped_fixture])
@given(value=embedding_values())
def test_every_embedding_is_stored_faithfully_or_dead_lettered(
        writer: tuple[Any, Store], value: bytes) -> None:
    """A record the database cannot store is dead-lettered alone; one it stores reads back as
    sent."""
    cfg, store = writer
    with connect(store.cfg.database) as conn:
        conn.execute("TRUNCATE chunks, documents, tenant_deletions")
    producer = FakeProducer()
    fake: Any = producer
    processor = WriteProcessor(cfg, store, fake, DeadLetters(fake, cfg.kafka, "write", "w"),
                               DeadLetterGuard(cfg.dead_letter), Metrics("write"), get_logger(),
                               "w")
    record: Any = FakeRecord(cfg.kafka.embeddings_topic, 0, 1, b"k", value,
                             schema_headers(EMBEDDING))
    assert processor.process(Batch([record])) == [record]
    dead = producer.to(cfg.kafka.dlq_topic(cfg.kafka.embeddings_topic))
    with connect(store.cfg.database) as conn:
        rows = conn.execute("SELECT tenant_id, doc_id, chunk_index, doc_version, content,"
                            " metadata, embedding FROM chunks").fetchall()
    assert len(rows) + len(dead) == 1
    if rows:
        emb = decode(value, schema_headers(EMBEDDING))
        assert isinstance(emb, Embedding)
        c = emb.chunk
        tenant, doc, index, version, content, metadata, vector = rows[0]
        assert (tenant, doc, index, version, content, metadata) == (
            c.tenant_id, c.doc_id, c.chunk_index, c.version, c.text, dict(c.metadata))
        assert np.allclose(vector.to_numpy(), emb.vector, atol=1e-6)
