"""The embedding stage against the real broker and the real model."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from producers.publisher import Publisher
from tests.helpers import read_topic, run_stage
from vecpipe.deadletter.headers import H_CLASS, H_MESSAGE, H_OFFSET, H_STAGE, H_TOPIC
from vecpipe.errors import ModelOutOfMemory
from vecpipe.kafka.admin import offsets_committed
from vecpipe.kafka.producer import DurableProducer
from vecpipe.messages import (
    CHUNK,
    Chunk,
    ChunkGap,
    Document,
    Embedding,
    content_hash,
    decode,
    header_value,
    schema_headers,
)

pytestmark = pytest.mark.integration


class CountingEncoder:
    """The real model behind a counter (and optional fault injection)."""

    def __init__(self, real: Any, oom_above: int | None = None, delay_s: float = 0.0) -> None:
        self.real = real
        self.name, self.revision = real.name, real.revision
        self.backend_tag, self.dimension = real.backend_tag, real.dimension
        self.oom_above = oom_above
        self.delay_s = delay_s
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def encode(self, texts: list[str], batch_size: int | None = None) -> npt.NDArray[np.float32]:
        """Count, maybe fail like a full GPU, maybe stall like a slow one, then encode."""
        with self.lock:
            self.calls.append(len(texts))
        if self.oom_above is not None and len(texts) > self.oom_above:
            raise ModelOutOfMemory(f"CUDA out of memory (injected) on {len(texts)} texts")
        if self.delay_s:
            time.sleep(self.delay_s)
        out: npt.NDArray[np.float32] = self.real.encode(texts, batch_size)
        return out

    @property
    def texts_encoded(self) -> int:
        """How many texts went through the model."""
        return sum(n for n in self.calls if self.oom_above is None or n <= self.oom_above)


def publish(cfg: Any, docs: dict[str, str], version: int = 1, tenant: str = "default") -> None:
    """Publish ``docs`` through the Python API."""
    with Publisher(cfg) as pub:
        for doc_id, text in docs.items():
            pub.publish(Document(tenant, doc_id, text, version=version))


def embeddings(cfg: Any) -> list[Embedding]:
    """Every embedding message on the embeddings topic, decoded (the chunk gaps left out)."""
    out = []
    for m in read_topic(cfg, cfg.kafka.embeddings_topic):
        obj = decode(m.value(), m.headers())
        if isinstance(obj, ChunkGap):
            continue
        assert isinstance(obj, Embedding)
        out.append(obj)
    return out


DOCS = {f"doc{i}": f"Document number {i} talks about topic {i % 5} in plain words."
        for i in range(12)}


def test_poison_message_goes_to_dead_letters_and_the_good_ones_land(
    cfg: Any, encoder: Any
) -> None:
    """A malformed record among good ones is dead-lettered with its headers; the rest go on."""
    publish(cfg, DOCS)
    producer = DurableProducer(cfg.kafka)
    producer.produce(cfg.kafka.chunks_topic, b"{not json", key=b"default/poison",
                     headers=[*schema_headers(CHUNK), ("trace-id", b"abc")])
    producer.flush()
    assert run_stage("embed", cfg, encoder=encoder) == 0

    embs = embeddings(cfg)
    assert sorted(e.chunk.doc_id for e in embs) == sorted(DOCS)
    for e in embs:
        assert abs(float(np.linalg.norm(e.vector)) - 1.0) < 1e-5
        assert (e.model_name, e.backend) == (encoder.name, "torch-fp32")
        assert e.model_revision == encoder.revision
    dead = read_topic(cfg, cfg.kafka.dlq_topic(cfg.kafka.chunks_topic))
    assert len(dead) == 1
    rec = dead[0]
    assert (rec.key(), rec.value()) == (b"default/poison", b"{not json")
    headers = rec.headers()
    assert header_value(headers, "trace-id") == "abc"
    assert header_value(headers, H_TOPIC) == cfg.kafka.chunks_topic
    assert header_value(headers, H_STAGE) == "embed"
    assert header_value(headers, H_CLASS) == "vecpipe.errors.InvalidMessage"
    assert "not valid JSON" in (header_value(headers, H_MESSAGE) or "")
    assert header_value(headers, H_OFFSET) is not None


def test_out_of_memory_halves_the_batch_until_it_fits(cfg: Any, encoder: Any) -> None:
    """A batch the device cannot hold is split in halves down to a size that fits; all land."""
    publish(cfg, DOCS)
    counting = CountingEncoder(encoder, oom_above=3)
    cfg = replace(cfg, embed=replace(cfg.embed, batch_size=12, batch_wait_ms=2000),
                  model=cfg.model)
    assert run_stage("embed", cfg, encoder=counting) == 0
    assert any(n > 3 for n in counting.calls), "no batch was large enough to split"
    assert max(n for n in counting.calls if n <= 3) <= 3
    assert sorted(e.chunk.doc_id for e in embeddings(cfg)) == sorted(DOCS)
    assert read_topic(cfg, cfg.kafka.dlq_topic(cfg.kafka.chunks_topic), timeout=3) == []


def test_restart_re_embeds_nothing_already_acknowledged(cfg: Any, encoder: Any) -> None:
    """Offsets stored after the broker's acknowledgement: a second run encodes only new chunks."""
    publish(cfg, DOCS)
    first = CountingEncoder(encoder)
    assert run_stage("embed", replace(cfg, embed=replace(cfg.embed, reuse_vectors=False)),
                     encoder=first) == 0
    assert first.texts_encoded == len(DOCS)
    committed = offsets_committed(cfg.kafka, cfg.kafka.embed_group, cfg.kafka.chunks_topic)
    assert sum(committed.values()) == len(DOCS)

    publish(cfg, {"late": "A document published after the first worker stopped."})
    second = CountingEncoder(encoder)
    assert run_stage("embed", replace(cfg, embed=replace(cfg.embed, reuse_vectors=False)),
                     encoder=second) == 0
    assert second.texts_encoded == 1
    assert len(embeddings(cfg)) == len(DOCS) + 1


def test_republishing_unchanged_content_makes_no_model_call(migrated: Any, encoder: Any) -> None:
    """Content already embedded by the same model reuses its stored vector: zero model calls."""
    cfg = migrated
    publish(cfg, DOCS)
    assert run_stage("embed", cfg, encoder=encoder) == 0
    assert run_stage("write", cfg) == 0

    publish(cfg, DOCS, version=2)  # same text, newer version: the vectors are known
    counting = CountingEncoder(encoder)
    assert run_stage("embed", cfg, encoder=counting) == 0
    assert counting.calls == []
    second = [e for e in embeddings(cfg) if e.chunk.version == 2]
    assert len(second) == len(DOCS)
    first = {e.chunk.content_hash: e.vector for e in embeddings(cfg) if e.chunk.version == 1}
    for e in second:
        assert np.allclose(e.vector, first[e.chunk.content_hash], atol=1e-6)


def test_long_batches_never_exceed_max_poll_interval(cfg: Any, encoder: Any) -> None:
    """A batch slower than max.poll.interval.ms neither loses the partitions nor duplicates."""
    publish(cfg, {f"d{i}": f"text {i}" for i in range(4)})
    slow = CountingEncoder(encoder, delay_s=9.0)
    kafka = replace(cfg.kafka, client={"max.poll.interval.ms": "6000",
                                       "session.timeout.ms": "6000",
                                       "heartbeat.interval.ms": "1000"})
    cfg = replace(cfg, kafka=kafka,
                  embed=replace(cfg.embed, batch_size=64, batch_wait_ms=1500,
                                reuse_vectors=False))
    assert run_stage("embed", cfg, encoder=slow) == 0
    embs = embeddings(cfg)
    assert sorted(e.chunk.doc_id for e in embs) == [f"d{i}" for i in range(4)]
    assert len(slow.calls) == 1


def test_nan_vector_from_the_model_is_dead_lettered(cfg: Any, encoder: Any) -> None:
    """A NaN vector from the model never reaches the embeddings topic."""

    class NaNForPoison(CountingEncoder):
        def encode(self, texts: list[str],
                   batch_size: int | None = None) -> npt.NDArray[np.float32]:
            out = super().encode(texts, batch_size).copy()
            for i, t in enumerate(texts):
                if "poison" in t:
                    out[i, :] = np.nan
            return out

    publish(cfg, {"ok": "a perfectly fine text", "bad": "poison text for the model"})
    assert run_stage("embed", cfg, encoder=NaNForPoison(encoder)) == 0
    assert [e.chunk.doc_id for e in embeddings(cfg)] == ["ok"]
    dead = read_topic(cfg, cfg.kafka.dlq_topic(cfg.kafka.chunks_topic))
    assert len(dead) == 1
    assert "NaN" in (header_value(dead[0].headers(), H_MESSAGE) or "")
    # In its place the writer gets a gap: the slot of the failed chunk is emptied.
    gaps = [decode(m.value(), m.headers()) for m in read_topic(cfg, cfg.kafka.embeddings_topic)]
    assert [g.doc_id for g in gaps if isinstance(g, ChunkGap)] == ["bad"]


def test_hand_written_chunk_from_any_kafka_client_is_embedded(cfg: Any, encoder: Any) -> None:
    """A chunk message built from schemas/ alone (plain confluent-kafka) is embedded."""
    from confluent_kafka import Producer

    text = "Written by a Go service, following chunk.v1.json only."
    value = ('{"tenant_id":"acme","doc_id":"go/1","version":3,"chunk_index":0,'
             f'"chunk_count":1,"text":"{text}","content_hash":"{content_hash(text)}"}}')
    p = Producer({"bootstrap.servers": cfg.kafka.bootstrap})
    p.produce(cfg.kafka.chunks_topic, value.encode(), key=b"acme/go/1",
              headers=[("vecpipe.schema", b"vecpipe.chunk"), ("vecpipe.schema.version", b"1")])
    assert p.flush(10) == 0
    assert run_stage("embed", cfg, encoder=encoder) == 0
    (emb,) = embeddings(cfg)
    assert emb.chunk == Chunk("acme", "go/1", 3, 0, 1, text, content_hash(text), 0, len(text))


def test_onnx_int8_backend_is_exported_offline_and_agrees_with_torch(
    encoder: Any, tmp_path: Any
) -> None:
    """The quantized ONNX model is exported once from the local model, and agrees with fp32."""
    from vecpipe.config import ModelConfig
    from vecpipe.model import Encoder, quantization_target

    texts = [f"Sentence {i} about pgvector, Kafka and embeddings in production." for i in range(16)]
    int8 = Encoder(ModelConfig(backend="onnx-int8", cache_dir=str(tmp_path)))
    assert int8.backend_tag == f"onnx-int8-{quantization_target()}"
    assert int8.name == encoder.name and int8.revision == encoder.revision
    assert list(tmp_path.glob("*/onnx/model_*int8_*.onnx")), "no quantized export in the cache"
    a, b = encoder.encode(texts), int8.encode(texts)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert float(cos.mean()) >= 0.98
