"""The embedding stage: chunks in, unit vectors out, poison records to the dead-letter topic.

decode -> reuse known vectors -> encode the rest (length-sorted, halving on out-of-memory or a
refused input) -> normalize and check -> produce in the original order -> settle (dead letters,
wait for the broker's acknowledgement). Only then does :meth:`EmbedProcessor.process` return
the records, and only then are their offsets stored: a crash anywhere re-embeds, never loses.
Each chunk's upstream trace context travels on with its embedding (or gap); the batch is one
span, linked to each of them (``vecpipe.tracing``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from confluent_kafka import Message
from opentelemetry.trace import Tracer

from vecpipe.config import Config
from vecpipe.deadletter.guard import DeadLetterGuard
from vecpipe.deadletter.sender import DeadLetters
from vecpipe.errors import InvalidMessage, ModelOutOfMemory, PermanentError
from vecpipe.health import Metrics
from vecpipe.kafka.consumer import Batch
from vecpipe.kafka.producer import DurableProducer
from vecpipe.kafka.settings import MAX_MESSAGE_BYTES
from vecpipe.messages import (
    EMBEDDING,
    GAP,
    PUBLISHED_HEADER,
    Chunk,
    ChunkGap,
    Delete,
    Embedding,
    Headers,
    encode_embedding,
    encode_gap,
    published_at,
    schema_headers,
    with_published_at,
)
from vecpipe.model import normalize, vector_problem
from vecpipe.retry import call_with_retry, is_transient
from vecpipe.stages.bisect import isolate
from vecpipe.stages.decode import Decoded, decode_batch
from vecpipe.stages.settle import Failure, Settle, retry_counter
from vecpipe.tracing import batch_span, get_tracer, trace_headers

__all__ = ["EmbedProcessor", "EncoderLike", "VectorCache"]


class EncoderLike(Protocol):
    """What the stage needs of a model (``vecpipe.model.Encoder`` or a test fake)."""

    name: str
    revision: str
    backend_tag: str
    dimension: int

    def encode(self, texts: list[str], batch_size: int | None = None) -> npt.NDArray[np.float32]:
        """Embed texts into float32 rows."""
        ...


# The largest embedding value produced: what the embeddings topic takes (vecpipe.kafka.admin creates
# it with max.message.bytes = MAX_MESSAGE_BYTES), less room for the key, headers and framing.
_MAX_EMBEDDING_BYTES = MAX_MESSAGE_BYTES - 65_536

# Encoded when every record of a batch failed in the model: if this fails too, the model is
# broken (a bad deploy, a lost device) and the worker stops rather than dead-letter everything.
_PROBE_TEXT = "A plain sentence that every text model can encode."


class _ModelRefused(PermanentError):
    """The model raised on this record alone (its cause is the model's exception)."""


# After a failed lookup (the database is away), batches are encoded without asking the cache.
_CACHE_COOLDOWN_S = 30.0


class VectorCache(Protocol):
    """Vectors already stored for a content hash by the same model (name, revision, backend)."""

    def cached_vectors(
        self, hashes: Sequence[str], model: str, revision: str, backend: str
    ) -> dict[str, npt.NDArray[np.float32]]:
        """Return the known vectors of ``hashes``; missing ones are simply absent."""
        ...


@dataclass
class _Item:
    msg: Message
    chunk: Chunk
    vector: npt.NDArray[np.float32] | None = None
    error: BaseException | None = None


class EmbedProcessor:
    """Processes one batch of the chunks topic (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        encoder: EncoderLike,
        producer: DurableProducer,
        dead_letters: DeadLetters,
        guard: DeadLetterGuard,
        metrics: Metrics,
        log: Any,
        cache: VectorCache | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.cfg = cfg
        self.encoder = encoder
        self.producer = producer
        self.dead_letters = dead_letters
        self.guard = guard
        self.metrics = metrics
        self.log = log
        self.cache = cache
        self.tracer = tracer or get_tracer()
        self.settle = Settle(cfg.retry, producer, dead_letters, guard, metrics, log)
        self._cache_back_at = 0.0  # monotonic time before which a failed cache is not asked
        self.out_topic = cfg.kafka.embeddings_topic
        self.wire_dtype = "float16" if cfg.vector.column_type == "halfvec" else "float32"

    def weight(self, msg: Message) -> int:
        """Rough token count (a token is about four bytes of text), capped at the model's limit."""
        return min(len(msg.value() or b"") // 4 + 2, 512)

    # -- the batch -----------------------------------------------------------------------------

    def process(self, batch: Batch) -> list[Message]:
        """Embed, produce and settle; return the records now durable downstream."""
        with batch_span(self.tracer, "embed", self.cfg.kafka.chunks_topic,
                        self.cfg.kafka.embed_group, batch.messages):
            return self._process(batch)

    def _process(self, batch: Batch) -> list[Message]:
        decoded = decode_batch(batch.messages, _chunk_or_delete)
        items = {id(msg): _Item(msg, obj) for msg, obj in decoded.inputs
                 if isinstance(obj, Chunk)}
        self._reuse(list(items.values()))
        batch.progress()
        self._encode([it for it in items.values() if it.vector is None], batch.progress)
        failures = list(decoded.failures)
        # A batch that trips the dead-letter cap stops the worker (a broken model or
        # configuration, most likely): its failures must not empty the slots of their chunks.
        failed = {id(f.msg) for f in failures}
        failed |= {key for key, it in items.items() if it.error is not None}
        gaps_wanted = not self.guard.would_trip([id(m) in failed for m in batch.messages])
        for msg, _ in decoded.inputs:
            if not batch.owned(msg):
                continue
            item = items.get(id(msg))
            if item is None:
                # Deletes travel on in order with their document's chunks, unchanged but for
                # their publish time, made explicit if the record carried it only as a timestamp.
                self.producer.produce(self.out_topic, msg.value(), key=msg.key(),
                                      headers=with_published_at(msg.headers(), msg.timestamp()),
                                      timestamp=msg.timestamp()[1])
                continue
            if item.error is None and item.vector is not None:
                item.error = self._produce_embedding(item)
            if item.error is not None:
                failures.append(Failure(msg, item.error))
                if gaps_wanted:
                    self._produce_gap(item, item.error)
        done = [m for m in batch.messages if batch.owned(m)]
        return self.settle(batch.messages, done, [f for f in failures if batch.owned(f.msg)],
                           progress=batch.progress)

    def _produce_gap(self, item: _Item, error: BaseException) -> None:
        """Tell the writer that this chunk of its version will not arrive: the slot is emptied
        rather than keep an older version's text there (schemas/chunk-gap.v1.json)."""
        gap = ChunkGap.of(item.chunk, f"{type(error).__name__}: {error}")
        self.producer.produce(self.out_topic, encode_gap(gap), key=gap.key,
                              headers=[*schema_headers(GAP), *self._carried(item)],
                              timestamp=item.msg.timestamp()[1])

    def _carried(self, item: _Item) -> Headers:
        """What travels on from the chunk's record: its publish time (the writer orders the
        chunk against deletes by it) and its upstream's trace context."""
        headers = with_published_at(item.msg.headers(), item.msg.timestamp())
        return [*((k, v) for k, v in headers if k == PUBLISHED_HEADER), *trace_headers(headers)]

    def _produce_embedding(self, item: _Item) -> PermanentError | None:
        """Queue the embedding of ``item``; a chunk whose embedding no topic can take (huge
        metadata, say) is the record's fault: return the error that dead-letters it."""
        assert item.vector is not None
        emb = Embedding(
            chunk=item.chunk,
            vector=item.vector,
            model_name=self.encoder.name,
            model_revision=self.encoder.revision,
            backend=self.encoder.backend_tag,
        )
        value = encode_embedding(emb, self.wire_dtype)
        if len(value) > _MAX_EMBEDDING_BYTES:
            return PermanentError(
                f"the embedding message would be {len(value)} bytes, more than the "
                f"{_MAX_EMBEDDING_BYTES} a message may have; shrink the chunk's metadata."
            )
        self.producer.produce(
            self.out_topic,
            value,
            key=item.chunk.key,
            headers=[*schema_headers(EMBEDDING), *self._carried(item)],
            timestamp=item.msg.timestamp()[1],
        )
        return None

    # -- vectors ---------------------------------------------------------------------------------

    def _reuse(self, items: list[_Item]) -> None:
        """Take vectors of content this model already embedded: no inference for them."""
        if self.cache is None or not items or time.monotonic() < self._cache_back_at:
            return
        try:
            known = self.cache.cached_vectors(
                sorted({it.chunk.content_hash for it in items}),
                self.encoder.name, self.encoder.revision, self.encoder.backend_tag,
            )
        except Exception as exc:
            # The cache saves work; it must never stop or slow the stage: encode instead, and
            # leave the cache alone for a while rather than wait for it on every batch.
            self._cache_back_at = time.monotonic() + _CACHE_COOLDOWN_S
            self.log.warning("vector_cache_unavailable", error=str(exc),
                             retry_in_s=_CACHE_COOLDOWN_S)
            return
        reused = 0
        for it in items:
            vec = known.get(it.chunk.content_hash)
            if vec is not None and vec.shape == (self.encoder.dimension,):
                it.vector = vec.astype(np.float32)
                reused += 1
        self.metrics.skipped.labels(self.metrics.stage).inc(reused)

    def _encode(self, items: list[_Item], progress: Callable[[], None]) -> None:
        if not items:
            return
        # Length-sorted batches pad less: every sequence in a forward pass is padded to the longest.
        ordered = sorted(items, key=lambda it: len(it.chunk.text))
        started = time.perf_counter()
        with self.tracer.start_as_current_span("vecpipe.embed encode",
                                               attributes={"vecpipe.texts": len(ordered)}):
            self._encode_split(ordered, progress)
        refused = [it.error for it in ordered if isinstance(it.error, _ModelRefused)]
        if len(ordered) > 1 and len(refused) == len(ordered) and not self._model_works():
            # Every input failed, and so does a plain sentence: the model is broken, not the
            # records. Stop the worker (nothing committed) instead of dead-lettering everything.
            cause = refused[0].__cause__
            raise cause if cause is not None else refused[0]
        self.metrics.encode_seconds.labels(self.metrics.stage).observe(
            time.perf_counter() - started)
        for it in ordered:
            if it.vector is not None:
                it.vector, it.error = self._check(it.vector)

    def _model_works(self) -> bool:
        try:
            self.encoder.encode([_PROBE_TEXT])
        except Exception:
            return False
        return True

    def _encode_split(self, items: list[_Item], progress: Callable[[], None]) -> None:
        """Encode; on out-of-memory or an input the model refuses, halve the batch, down to
        single items (which are retried), and mark what fails alone."""

        def run(part: Sequence[_Item]) -> None:
            texts = [it.chunk.text for it in part]
            if len(part) == 1:
                vectors = call_with_retry(self.cfg.retry, self.encoder.encode, texts,
                                          on_retry=retry_counter(self.metrics, self.log, "model"))
            else:
                vectors = self.encoder.encode(texts, self.cfg.embed.encode_batch_size)
            for it, vec in zip(part, vectors, strict=True):
                it.vector = vec
            progress()

        def poison(exc: BaseException) -> bool:
            # Out of memory: smaller batches may fit. Any other error but an outage: one input
            # the model cannot take (say, text its tokenizer refuses) must not stop the stage.
            # An outage whose retries were spent stops the worker, and nothing is lost.
            return isinstance(exc, ModelOutOfMemory) or not is_transient(exc)

        def on_poison(item: _Item, exc: BaseException) -> None:
            if isinstance(exc, ModelOutOfMemory):
                item.error = PermanentError(
                    f"the model ran out of memory on this chunk alone, even after retries: {exc}")
            else:
                item.error = _ModelRefused(
                    f"the model could not encode this chunk: {type(exc).__name__}: {exc}")
                item.error.__cause__ = exc

        def on_split(part: Sequence[_Item], exc: BaseException) -> None:
            oom = isinstance(exc, ModelOutOfMemory)
            self.metrics.retries.labels(self.metrics.stage,
                                        "oom_split" if oom else "error_split").inc()
            self.log.warning("oom_split" if oom else "encode_error_split", size=len(part),
                             error=str(exc))

        isolate(items, run, poison=poison, on_poison=on_poison, on_split=on_split)

    def _check(
        self, vec: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32] | None, BaseException | None]:
        """Normalize for cosine and inner product; NaN, infinite or zero vectors are rejected."""
        if vec.shape != (self.cfg.vector.dimension,):
            return None, PermanentError(
                f"the model returned {vec.shape[0]} dimensions but vector.dimension is "
                f"{self.cfg.vector.dimension}; configure the dimension of the model."
            )
        problem = vector_problem(vec)
        if problem is not None:
            return None, PermanentError(f"the model returned {problem}.")
        return (normalize(vec) if self.cfg.vector.normalize else vec), None


def _chunk_or_delete(msg: Message, obj: Decoded) -> Chunk | Delete:
    if isinstance(obj, Embedding | ChunkGap):
        raise InvalidMessage(
            f"a{'n embedding' if isinstance(obj, Embedding) else ' chunk gap'} message was "
            "published on the chunks topic; publish chunks there and let the embed stage make "
            "embeddings."
        )
    published_at(msg.headers(), msg.timestamp())  # refused here, before it costs an encode
    return obj
