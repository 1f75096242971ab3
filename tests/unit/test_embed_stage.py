"""Unit tests of workers.embed.EmbedProcessor with a fake model, producer and messages."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from tests.fakes import FakeProducer, FakeRecord, Sent
from vecpipe.config import Config, load_config
from vecpipe.deadletter.guard import DeadLetterGuard
from vecpipe.deadletter.headers import H_CLASS, H_MESSAGE, H_STAGE
from vecpipe.deadletter.sender import DeadLetters
from vecpipe.errors import DeadLetterRateExceeded, ModelOutOfMemory
from vecpipe.health import Metrics
from vecpipe.kafka.consumer import Batch
from vecpipe.logs import get_logger
from vecpipe.messages import (
    CHUNK,
    DELETE,
    EMBEDDING,
    GAP,
    PUBLISHED_HEADER,
    Chunk,
    ChunkGap,
    Delete,
    Embedding,
    content_hash,
    decode,
    encode_chunk,
    encode_delete,
    encode_embedding,
    published_header,
    schema_headers,
)
from workers import embed as embed_module
from workers.embed import EmbedProcessor

DIM = 4
CHUNKS = "vecpipe.chunks"
BASE = load_config(environ={})
CFG = replace(
    BASE,
    vector=replace(BASE.vector, dimension=DIM),
    retry=replace(BASE.retry, attempts=3, initial_wait_s=0.001, max_wait_s=0.002),
)
T0 = 1_714_566_615_000


# -- fakes ---------------------------------------------------------------------------------------


def fake_vector(text: str) -> npt.NDArray[np.float32]:
    """A deterministic, deliberately not unit-length vector for ``text``."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    vec = np.random.default_rng(seed).normal(size=DIM) * 3.0 + 0.5
    return vec.astype(np.float32)


def unit(vec: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return (vec / np.linalg.norm(vec)).astype(np.float32)


class FakeEncoder:
    """A model: deterministic vectors, counted calls, optional out-of-memory and bad vectors."""

    name = "fake-minilm"
    revision = "rev-1"
    backend_tag = "torch-fp32"
    dimension = DIM

    def __init__(self, *, oom_above: int | None = None, oom_text: str | None = None,
                 nan_text: str | None = None, zero_text: str | None = None,
                 refused_text: str | None = None, broken: bool = False) -> None:
        self.refused_text = refused_text
        self.broken = broken
        self.oom_above = oom_above
        self.oom_text = oom_text
        self.nan_text = nan_text
        self.zero_text = zero_text
        self.calls: list[list[str]] = []
        self.ooms = 0

    def encode(self, texts: list[str], batch_size: int | None = None) -> npt.NDArray[np.float32]:
        self.calls.append(list(texts))
        if (self.oom_above is not None and len(texts) > self.oom_above) or (
                self.oom_text is not None and self.oom_text in texts):
            self.ooms += 1
            raise ModelOutOfMemory(f"CUDA out of memory on {len(texts)} texts")
        if self.broken or (self.refused_text is not None and self.refused_text in texts):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")
        rows = []
        for text in texts:
            if text == self.nan_text:
                rows.append(np.full(DIM, np.nan, dtype=np.float32))
            elif text == self.zero_text:
                rows.append(np.zeros(DIM, dtype=np.float32))
            else:
                rows.append(fake_vector(text))
        return np.stack(rows)


@dataclass
class FakeCache:
    """Vectors already stored, by content hash."""

    known: dict[str, npt.NDArray[np.float32]]
    lookups: list[tuple[list[str], str, str, str]] = field(default_factory=list)

    def cached_vectors(self, hashes: Sequence[str], model: str, revision: str,
               backend: str) -> dict[str, npt.NDArray[np.float32]]:
        self.lookups.append((list(hashes), model, revision, backend))
        return {h: self.known[h] for h in hashes if h in self.known}


def chunk(text: str, doc: str = "doc-1", index: int = 0) -> Chunk:
    return Chunk(tenant_id="acme", doc_id=doc, version=1, chunk_index=index, chunk_count=1,
                 text=text, content_hash=content_hash(text), char_start=0, char_end=len(text))


class Feed:
    """Builds messages with increasing offsets and timestamps."""

    def __init__(self) -> None:
        self.offset = 0

    def _next(self, partition: int) -> tuple[int, tuple[int, int]]:
        self.offset += 1
        return self.offset, (1, T0 + self.offset)

    def chunk(self, c: Chunk, partition: int = 0) -> FakeRecord:
        off, ts = self._next(partition)
        return FakeRecord(CHUNKS, partition, off, c.key, encode_chunk(c), schema_headers(CHUNK),
                          ts)

    def delete(self, d: Delete, partition: int = 0) -> FakeRecord:
        off, ts = self._next(partition)
        return FakeRecord(CHUNKS, partition, off, d.key, encode_delete(d),
                          schema_headers(DELETE), ts)

    def raw(self, value: bytes, partition: int = 0) -> FakeRecord:
        off, ts = self._next(partition)
        return FakeRecord(CHUNKS, partition, off, b"acme/bad", value, schema_headers(CHUNK), ts)


def is_gap(sent: Sent) -> bool:
    """Whether ``sent`` is a chunk gap (not an embedding or a delete)."""
    return dict(sent.headers).get("vecpipe.schema") == GAP.encode()


@dataclass
class Stage:
    """An EmbedProcessor wired to fakes, and the fakes to inspect."""

    processor: EmbedProcessor
    encoder: FakeEncoder
    producer: FakeProducer
    metrics: Metrics

    def run(self, messages: list[FakeRecord], revoked: Sequence[tuple[str, int]] = ()) -> Any:
        msgs: list[Any] = list(messages)
        batch = Batch(msgs)
        batch.revoke(list(revoked))
        return self.processor.process(batch)

    def embeddings(self) -> list[Sent]:
        """What went to the embeddings topic but the chunk gaps."""
        return [o for o in self.outputs() if not is_gap(o)]

    def gaps(self) -> list[Sent]:
        """The chunk gaps: chunks dead-lettered here, whose slot the writer empties."""
        return [o for o in self.outputs() if is_gap(o)]

    def outputs(self) -> list[Sent]:
        return self.producer.to(CFG.kafka.embeddings_topic)

    def dead(self) -> list[Sent]:
        return self.producer.to(CHUNKS + ".dlq")

    def counted(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "vecpipe_messages_total", {"stage": "embed", "outcome": outcome})
        return value or 0.0


def stage(encoder: FakeEncoder | None = None, cache: FakeCache | None = None,
          cfg: Config = CFG) -> Stage:
    encoder = encoder or FakeEncoder()
    producer = FakeProducer()
    fake: Any = producer
    metrics = Metrics("embed")
    processor = EmbedProcessor(
        cfg, encoder, fake, DeadLetters(fake, cfg.kafka, "embed", "w-1"),
        DeadLetterGuard(cfg.dead_letter), metrics, get_logger(), cache=cache)
    return Stage(processor, encoder, producer, metrics)


def decoded(sent: Sent) -> Embedding:
    obj = decode(sent.value, sent.headers)
    assert isinstance(obj, Embedding)
    return obj


def dead_message(sent: Sent) -> str:
    return dict(sent.headers)[H_MESSAGE].decode()


# -- tests ---------------------------------------------------------------------------------------


def test_unit_vectors_in_order_with_keys_and_timestamps() -> None:
    """Each chunk becomes a unit vector on the embeddings topic, in input order, with the
    chunk's key and the original publish timestamp; every record is returned."""
    feed = Feed()
    chunks = [chunk(t, doc=f"d{i}") for i, t in enumerate(
        ["a much longer chunk of text here", "short", "medium length", "x"])]
    msgs = [feed.chunk(c, partition=i % 2) for i, c in enumerate(chunks)]
    s = stage()
    done = s.run(msgs)
    assert done == msgs
    out = s.embeddings()
    assert [decoded(o).chunk for o in out] == chunks
    assert [o.key for o in out] == [m.key_ for m in msgs]
    assert [o.timestamp for o in out] == [m.timestamp_[1] for m in msgs]
    for o, c in zip(out, chunks, strict=True):
        emb = decoded(o)
        assert abs(float(np.linalg.norm(emb.vector)) - 1.0) < 1e-6
        np.testing.assert_allclose(emb.vector, unit(fake_vector(c.text)), rtol=1e-6)
        assert (emb.model_name, emb.model_revision, emb.backend) == (
            "fake-minilm", "rev-1", "torch-fp32")
        assert dict(o.headers) == {**dict(schema_headers(EMBEDDING)),
                                   PUBLISHED_HEADER: published_header(
                                       datetime.fromtimestamp((o.timestamp or 0) / 1000, UTC))[1]}
    assert s.dead() == []
    assert s.producer.events[-1] == "flush"
    assert s.counted("ok") == 4


def test_deletes_pass_through_unchanged_and_in_order() -> None:
    """Deletes travel on unchanged (value, key, headers, timestamp), ordered with the chunks."""
    feed = Feed()
    msgs = [
        feed.chunk(chunk("first version", doc="d1")),
        feed.delete(Delete(tenant_id="acme", doc_id="d1", version=1,
                           requested_at="2024-05-01T00:00:00+00:00")),
        feed.chunk(chunk("another doc", doc="d2")),
        feed.delete(Delete(tenant_id="acme", requested_at="2024-05-01T00:00:00+00:00")),
    ]
    s = stage()
    assert s.run(msgs) == msgs
    out = s.embeddings()
    assert len(out) == 4
    for o, m in zip((out[1], out[3]), (msgs[1], msgs[3]), strict=True):
        assert (o.value, o.key, o.headers, o.timestamp) == (
            m.value_, m.key_, [*m.headers_, published_header(
                datetime.fromtimestamp(m.timestamp_[1] / 1000, UTC))], m.timestamp_[1])
    assert isinstance(decode(out[1].value, out[1].headers), Delete)
    assert decoded(out[0]).chunk.doc_id == "d1"
    assert decoded(out[2]).chunk.doc_id == "d2"


def test_poison_message_goes_to_dead_letters_and_the_rest_lands() -> None:
    """A record that is not JSON goes to <chunks>.dlq unchanged; the good ones still land."""
    feed = Feed()
    good1 = feed.chunk(chunk("good one", doc="d1"))
    bad = feed.raw(b'{"tenant_id": "acme", ')
    good2 = feed.chunk(chunk("good two", doc="d2"))
    s = stage()
    done = s.run([good1, bad, good2])
    assert done == [good1, bad, good2]
    assert [decoded(o).chunk.doc_id for o in s.embeddings()] == ["d1", "d2"]
    [dead] = s.dead()
    assert (dead.value, dead.key) == (bad.value_, bad.key_)
    headers = dict(dead.headers)
    assert headers[H_CLASS] == b"vecpipe.errors.InvalidMessage"
    assert headers[H_STAGE] == b"embed"
    assert "not valid JSON" in dead_message(dead)
    assert s.counted("ok") == 2
    assert s.counted("dead_letter") == 1
    assert s.producer.events[-1] == "flush"


def test_embedding_on_the_chunks_topic_is_dead_lettered() -> None:
    """An embedding message published on the chunks topic is refused."""
    feed = Feed()
    emb = Embedding(chunk=chunk("x"), vector=np.full(DIM, 0.5, dtype=np.float32),
                    model_name="m", model_revision="", backend="torch-fp32")
    msg = feed.raw(encode_embedding(emb))
    msg.headers_ = schema_headers(EMBEDDING)
    s = stage()
    assert s.run([msg]) == [msg]
    assert "embedding message was published on the chunks topic" in dead_message(s.dead()[0])
    assert s.embeddings() == []


def test_nan_and_zero_vectors_are_dead_lettered() -> None:
    """A NaN vector and a zero vector go to the dead letters; the others land."""
    feed = Feed()
    msgs = [feed.chunk(chunk(t, doc=t)) for t in ("fine text", "nan-text", "zero-text")]
    s = stage(FakeEncoder(nan_text="nan-text", zero_text="zero-text"))
    assert s.run(msgs) == msgs
    assert [decoded(o).chunk.text for o in s.embeddings()] == ["fine text"]
    reasons = {d.key: dead_message(d) for d in s.dead()}
    assert "NaN or infinite" in reasons[b"acme/nan-text"]
    assert "zero vector" in reasons[b"acme/zero-text"]
    assert s.counted("dead_letter") == 2
    # Each dead-lettered chunk leaves a gap for the writer, in place of its embedding.
    gaps = [decode(g.value, g.headers) for g in s.gaps()]
    assert [(g.doc_id, g.chunk_index) for g in gaps if isinstance(g, ChunkGap)] == [
        ("nan-text", 0), ("zero-text", 0)]


def test_wrong_model_dimension_is_dead_lettered() -> None:
    """Vectors of another dimension than vector.dimension are refused with a clear reason."""
    feed = Feed()
    msg = feed.chunk(chunk("text"))
    cfg = replace(CFG, vector=replace(CFG.vector, dimension=8))
    s = stage(cfg=cfg)
    s.run([msg])
    assert "returned 4 dimensions but vector.dimension is 8" in dead_message(s.dead()[0])


def test_out_of_memory_halves_batches_until_they_fit() -> None:
    """On out-of-memory the batch is halved, recursively, until each part fits."""
    feed = Feed()
    texts = [f"text number {i:02d}" for i in range(8)]
    msgs = [feed.chunk(chunk(t, doc=t)) for t in texts]
    s = stage(FakeEncoder(oom_above=2))
    assert s.run(msgs) == msgs
    assert [len(c) for c in s.encoder.calls] == [8, 4, 2, 2, 4, 2, 2]
    assert s.encoder.ooms == 3
    assert [decoded(o).chunk.text for o in s.embeddings()] == texts
    assert s.dead() == []
    retries = s.metrics.registry.get_sample_value(
        "vecpipe_retries_total", {"stage": "embed", "kind": "oom_split"})
    assert retries == 3


def test_item_that_runs_out_of_memory_alone_is_dead_lettered() -> None:
    """A chunk that runs out of memory even alone is retried, then dead-lettered alone."""
    feed = Feed()
    texts = ["alpha text", "beta text!", "gamma text", "huge chunk"]
    msgs = [feed.chunk(chunk(t, doc=t.split()[0])) for t in texts]
    s = stage(FakeEncoder(oom_text="huge chunk"))
    assert s.run(msgs) == msgs
    assert [decoded(o).chunk.text for o in s.embeddings()] == texts[:3]
    [dead] = s.dead()
    assert dead.key == b"acme/huge"
    assert "ran out of memory on this chunk alone" in dead_message(dead)
    assert s.encoder.calls.count(["huge chunk"]) == CFG.retry.attempts


def test_input_the_model_refuses_is_isolated_and_dead_lettered_alone() -> None:
    """A text the model raises on (not a transient failure) costs only its own record: the
    batch is halved until it is alone, it is dead-lettered once, and the rest are embedded."""
    feed = Feed()
    texts = ["alpha text", "beta text!", "gamma text", "bad text!!", "delta text"]
    msgs = [feed.chunk(chunk(t, doc=t.split()[0])) for t in texts]
    s = stage(FakeEncoder(refused_text="bad text!!"))
    assert s.run(msgs) == msgs
    assert sorted(decoded(o).chunk.text for o in s.embeddings()) == sorted(
        t for t in texts if t != "bad text!!")
    [dead] = s.dead()
    assert dead.key == b"acme/bad"
    assert "the model could not encode this chunk: TypeError" in dead_message(dead)
    assert s.encoder.calls.count(["bad text!!"]) == 1  # not transient: no retries


def test_a_model_that_fails_on_everything_stops_the_worker_and_dead_letters_nothing() -> None:
    """When every record fails and so does a plain sentence, the model is broken: the batch
    raises (the worker stops, nothing is committed) instead of filling the dead-letter topic."""
    feed = Feed()
    msgs = [feed.chunk(chunk(f"text {i}", doc=f"d{i}")) for i in range(4)]
    s = stage(FakeEncoder(broken=True))
    with pytest.raises(TypeError, match="TextEncodeInput"):
        s.run(msgs)
    assert s.dead() == [] and s.embeddings() == []


def test_batch_of_records_the_model_refuses_is_dead_lettered_when_the_model_works() -> None:
    """Every record refused, yet a plain sentence encodes: the records are at fault."""
    feed = Feed()
    msgs = [feed.chunk(chunk("bad text!!", doc=f"d{i}")) for i in range(3)]
    s = stage(FakeEncoder(refused_text="bad text!!"))
    assert s.run(msgs) == msgs
    assert len(s.dead()) == 3


def test_chunk_whose_embedding_is_too_large_for_a_message_is_dead_lettered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Huge metadata can make an embedding larger than any message may be: that record is
    dead-lettered with its size, the others go on (the broker would refuse it forever)."""
    monkeypatch.setattr(embed_module, "_MAX_EMBEDDING_BYTES", 2000)
    feed = Feed()
    small = feed.chunk(chunk("small text", doc="small"))
    big_chunk = replace(chunk("big metadata", doc="big"), metadata={"blob": "x" * 3000})
    big = feed.chunk(big_chunk)
    s = stage()
    assert s.run([small, big]) == [small, big]
    assert [decoded(o).chunk.doc_id for o in s.embeddings()] == ["small"]
    [dead] = s.dead()
    assert "more than the 2000 a message may have" in dead_message(dead)


def test_known_vectors_are_reused_without_inference() -> None:
    """Chunks whose content hash the cache knows make no encoder call."""
    feed = Feed()
    c = chunk("already embedded text")
    stored = unit(np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32))
    cache = FakeCache({c.content_hash: stored})
    s = stage(cache=cache)
    s.run([feed.chunk(c)])
    assert s.encoder.calls == []
    np.testing.assert_array_equal(decoded(s.embeddings()[0]).vector, stored)
    assert cache.lookups == [([c.content_hash], "fake-minilm", "rev-1", "torch-fp32")]
    skipped = s.metrics.registry.get_sample_value("vecpipe_unchanged_total", {"stage": "embed"})
    assert skipped == 1


def test_only_unknown_vectors_are_encoded() -> None:
    """With a partly warm cache only the unknown texts reach the model."""
    feed = Feed()
    known, fresh = chunk("known text", doc="k"), chunk("fresh text", doc="f")
    cache = FakeCache({known.content_hash: unit(np.ones(DIM, dtype=np.float32))})
    s = stage(cache=cache)
    s.run([feed.chunk(known), feed.chunk(fresh)])
    assert s.encoder.calls == [["fresh text"]]
    assert [decoded(o).chunk.doc_id for o in s.embeddings()] == ["k", "f"]


def test_failing_cache_falls_back_to_the_model() -> None:
    """A cache that fails never stops the stage: the model embeds instead."""

    class BrokenCache(FakeCache):
        def cached_vectors(self, hashes: Sequence[str], model: str, revision: str,
                   backend: str) -> dict[str, npt.NDArray[np.float32]]:
            self.lookups.append((list(hashes), model, revision, backend))
            raise ConnectionError("database down")

    feed = Feed()
    cache = BrokenCache({})
    s = stage(cache=cache)
    s.run([feed.chunk(chunk("text"))])
    assert s.encoder.calls == [["text"]]
    assert len(s.embeddings()) == 1
    # While the database is away the next batches do not wait on the cache at all.
    s.run([feed.chunk(chunk("more text", doc="doc-2"))])
    assert len(cache.lookups) == 1
    assert s.encoder.calls == [["text"], ["more text"]]


def test_revoked_partition_is_neither_produced_nor_returned() -> None:
    """Records of a partition revoked mid-batch are not produced, dead-lettered or returned."""
    feed = Feed()
    kept = [feed.chunk(chunk("kept one", doc="k1"), partition=0),
            feed.chunk(chunk("kept two", doc="k2"), partition=0)]
    gone = [feed.chunk(chunk("gone one", doc="g1"), partition=1),
            feed.raw(b"not json", partition=1),
            feed.delete(Delete(tenant_id="acme", doc_id="g1", requested_at="t"), partition=1)]
    s = stage()
    done = s.run([kept[0], gone[0], gone[1], kept[1], gone[2]], revoked=[(CHUNKS, 1)])
    assert done == kept
    assert [decoded(o).chunk.doc_id for o in s.embeddings()] == ["k1", "k2"]
    assert s.dead() == []
    assert s.counted("dropped") == 3


def test_texts_are_encoded_sorted_by_length() -> None:
    """The model sees the texts shortest first, so each forward pass pads little."""
    feed = Feed()
    texts = ["a medium text", "tiny", "the longest text of them all", "mid size", "xy"]
    msgs = [feed.chunk(chunk(t, doc=str(i))) for i, t in enumerate(texts)]
    s = stage()
    s.run(msgs)
    assert s.encoder.calls == [sorted(texts, key=len)]
    assert [decoded(o).chunk.text for o in s.embeddings()] == texts


def test_halfvec_columns_get_float16_on_the_wire() -> None:
    """With a halfvec column the vectors travel as float16."""
    feed = Feed()
    cfg = replace(CFG, vector=replace(CFG.vector, column_type="halfvec"))
    s = stage(cfg=cfg)
    s.run([feed.chunk(chunk("text"))])
    value = s.embeddings()[0].value
    assert value is not None and b'"dtype":"float16"' in value
    assert len(value) - 4 - int.from_bytes(value[:4], "big") == 2 * DIM


def test_a_batch_of_poison_trips_the_guard_before_sending_its_dead_letters() -> None:
    """Too many dead letters in a row stop the worker, and none of the batch's dead letters is
    sent: the restarted worker meets the same batch and never sends a second copy."""
    feed = Feed()
    cfg = replace(CFG, dead_letter=replace(CFG.dead_letter, max_consecutive=3))
    s = stage(cfg=cfg)
    with pytest.raises(DeadLetterRateExceeded):
        s.run([feed.raw(b"{") for _ in range(3)])
    assert s.dead() == []


def test_a_batch_that_trips_the_dead_letter_cap_produces_no_gaps() -> None:
    """Chunks the model fails on, enough of them to stop the worker, leave no gaps: a worker
    that stops on the cap is most likely broken, and must not empty their slots downstream."""
    feed = Feed()
    cfg = replace(CFG, dead_letter=replace(CFG.dead_letter, max_consecutive=3))
    msgs = [feed.chunk(chunk("nan-text", doc=f"d{i}")) for i in range(3)]
    s = stage(FakeEncoder(nan_text="nan-text"), cfg=cfg)
    with pytest.raises(DeadLetterRateExceeded):
        s.run(msgs)
    assert s.gaps() == []
    few = stage(FakeEncoder(nan_text="nan-text"), cfg=cfg)
    few.run(msgs[:2])
    assert len(few.gaps()) == 2
