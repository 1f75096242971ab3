"""The writer stage: embeddings and deletes in, one idempotent database transaction per batch.

decode and convert -> collapse -> COPY into staging -> merge (see ``vecpipe.db.store``) ->
commit -> settle. A row the database refuses is isolated by halving the batch and
dead-lettered alone. The records are returned to the consumer loop, which stores their offsets,
only after the commit. The batch is one span, linked to each record's upstream trace context,
and the merge a child of it (``vecpipe.tracing``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol

from confluent_kafka import Message
from opentelemetry.trace import Tracer

from vecpipe.config import Config
from vecpipe.db.erase import DeleteRequest
from vecpipe.db.store import MergeStats, Row
from vecpipe.deadletter.guard import DeadLetterGuard
from vecpipe.deadletter.sender import DeadLetters
from vecpipe.errors import InvalidMessage, PermanentError
from vecpipe.health import Metrics
from vecpipe.kafka.consumer import Batch
from vecpipe.kafka.producer import DurableProducer
from vecpipe.messages import Chunk, ChunkGap, Delete, Embedding, published_at
from vecpipe.model import vector_norm
from vecpipe.retry import call_with_retry, is_permanent
from vecpipe.stages.bisect import isolate
from vecpipe.stages.decode import Decoded, decode_batch
from vecpipe.stages.settle import Failure, Settle, retry_counter
from vecpipe.tracing import batch_span, get_tracer

__all__ = ["MAX_PAUSE_S", "StoreLike", "WriteProcessor", "to_row"]

# The longest pause write.pause_ratio inserts after one merge (shutdown waits for it).
MAX_PAUSE_S = 2.0


class StoreLike(Protocol):
    """What the stage needs of the database (``vecpipe.store.Store`` or a test fake)."""

    def apply(self, rows: Sequence[Row], deletes: Sequence[DeleteRequest],
              worker_id: str = "", progress: Callable[[], None] = lambda: None) -> MergeStats:
        """Apply deletes and merge rows in one transaction, calling ``progress`` as it goes."""
        ...


def to_row(emb: Embedding, msg: Message, cfg: Config) -> Row:
    """Check an embedding against the table's shape and turn it into a row to merge."""
    dim = cfg.vector.dimension
    if emb.vector.shape != (dim,):
        raise PermanentError(
            f"the vector has {emb.vector.shape[0]} dimensions but the table stores {dim} "
            "(vector.dimension); it was made by another model or configuration."
        )
    if cfg.vector.normalize:
        norm = vector_norm(emb.vector)
        # float16 on the wire rounds norms by about 1e-3; anything further off was not normalized.
        if abs(norm - 1.0) > 1e-2:
            raise PermanentError(
                f"the vector's norm is {norm:.4f}, not 1: metric {cfg.vector.metric} stores unit "
                "vectors, so the producer of this embedding must normalize it."
            )
    c: Chunk = emb.chunk
    if "\x00" in c.text or "\x00" in c.doc_id or "\x00" in c.source_uri:
        raise PermanentError(
            "the chunk contains a NUL character (U+0000), which PostgreSQL text cannot store; "
            "remove it before publishing."
        )
    try:
        embedded_at = datetime.fromisoformat(emb.embedded_at)
    except ValueError:
        raise PermanentError(f"embedded_at {emb.embedded_at!r} is not an ISO 8601 time.") from None
    if embedded_at.tzinfo is None:
        embedded_at = embedded_at.replace(tzinfo=UTC)
    return Row(
        tenant_id=c.tenant_id, doc_id=c.doc_id, chunk_index=c.chunk_index,
        doc_version=c.version, chunk_count=c.chunk_count, content_hash=c.content_hash,
        content=c.text, char_start=c.char_start, char_end=c.char_end,
        source_uri=c.source_uri, metadata=dict(c.metadata), embedding=emb.vector,
        model_name=emb.model_name, model_revision=emb.model_revision,
        model_backend=emb.backend, embedded_at=embedded_at,
        published_at=published_at(msg.headers(), msg.timestamp()), offset=msg.offset() or 0,
    )


class WriteProcessor:
    """Processes one batch of the embeddings topic (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        store: StoreLike,
        producer: DurableProducer,
        dead_letters: DeadLetters,
        guard: DeadLetterGuard,
        metrics: Metrics,
        log: Any,
        worker_id: str,
        tracer: Tracer | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.producer = producer
        self.dead_letters = dead_letters
        self.guard = guard
        self.metrics = metrics
        self.log = log
        self.worker_id = worker_id
        self.tracer = tracer or get_tracer()
        self.settle = Settle(cfg.retry, producer, dead_letters, guard, metrics, log)

    def weight(self, msg: Message) -> int:
        """Every record counts one towards the batch size."""
        return 1

    def process(self, batch: Batch) -> list[Message]:
        """Merge the batch in one transaction; return its records once committed."""
        with batch_span(self.tracer, "write", self.cfg.kafka.embeddings_topic,
                        self.cfg.kafka.write_group, batch.messages):
            return self._process(batch)

    def _process(self, batch: Batch) -> list[Message]:
        refused: list[tuple[Message, Row]] = []

        def convert(msg: Message, obj: Decoded) -> Row | DeleteRequest:
            try:
                return self._convert(msg, obj)
            except Exception:
                # An embedding refused here leaves a gap, as one the embed stage refuses does.
                if isinstance(obj, Embedding) and (gap := _gap_for(msg, obj)) is not None:
                    refused.append((msg, gap))
                raise

        def gaps_wanted(failures: Sequence[Failure]) -> bool:
            # A batch whose failures trip the dead-letter cap stops the worker: most likely a
            # wrong configuration, not bad records, so it must not empty slots on their account.
            failed = {id(f.msg) for f in failures}
            return not self.guard.would_trip([id(m) in failed for m in batch.messages])

        decoded = decode_batch(batch.messages, convert)
        rows = [(m, r) for m, r in decoded.inputs if isinstance(r, Row)]
        deletes = [(m, d) for m, d in decoded.inputs if isinstance(d, DeleteRequest)]
        failures = list(decoded.failures)
        if not gaps_wanted(failures):
            refused.clear()
        kept, deletes = _drop_superseded([*rows, *refused], deletes)
        merge_started = time.monotonic()
        with self.tracer.start_as_current_span(
                "vecpipe.write merge",
                attributes={"vecpipe.rows": len(kept), "vecpipe.deletes": len(deletes)}) as span:
            stats = self._apply(kept, [d for _, d in deletes],
                                {id(item): msg for msg, item in [*rows, *deletes]}, failures,
                                batch.progress, gaps_wanted)
            span.set_attributes({f"vecpipe.rows.{action}": getattr(stats, action)
                                 for action in MergeStats.ACTIONS})
        for action in MergeStats.ACTIONS:
            self.metrics.rows.labels(self.metrics.stage, action).inc(getattr(stats, action))
        self.log.debug("batch_merged", records=len(batch.messages), **vars(stats))
        self._pace(time.monotonic() - merge_started)
        # The transaction committed for every record, revoked partitions' included.
        return self.settle(batch.messages, list(batch.messages), failures, produced=False,
                           progress=batch.progress)

    def _pace(self, merge_s: float) -> None:
        """The writer's own pacing (write.pause_ratio): after a merge that kept a database core
        busy for ``merge_s``, leave it to searches for ``pause_ratio`` times as long (at most
        ``MAX_PAUSE_S``), so that an ingestion spike never takes every core from them."""
        pause = min(self.cfg.write.pause_ratio * merge_s, MAX_PAUSE_S)
        if pause > 0:
            time.sleep(pause)

    def _convert(self, msg: Message, obj: Decoded) -> Row | DeleteRequest:
        if isinstance(obj, Chunk):
            raise InvalidMessage(
                "a chunk without a vector was published on the embeddings topic; publish "
                "chunks on the chunks topic."
            )
        if isinstance(obj, Delete):
            return DeleteRequest(
                tenant_id=obj.tenant_id, doc_id=obj.doc_id, version=obj.version,
                published_at=published_at(msg.headers(), msg.timestamp()),
                source={"topic": msg.topic(), "partition": msg.partition(),
                        "offset": msg.offset(), "requested_at": obj.requested_at,
                        "reason": obj.reason},
            )
        if isinstance(obj, ChunkGap):
            return Row.gap_of(obj, published_at(msg.headers(), msg.timestamp()),
                              msg.offset() or 0)
        return to_row(obj, msg, self.cfg)

    def _apply(self, rows: list[Row], deletes: list[DeleteRequest],
               source: dict[int, Message], failures: list[Failure],
               progress: Callable[[], None],
               gaps_wanted: Callable[[Sequence[Failure]], bool]) -> MergeStats:
        """Tenant deletions first, each batch of them in a transaction of its own (a large one
        is not redone when a row of the batch is refused), then one transaction for the rest;
        a row or delete the database refuses is isolated by halving (deletes first, order kept:
        the result is what one transaction gives)."""

        counted = retry_counter(self.metrics, self.log, "database")

        def on_retry(exc: BaseException, attempt: int) -> None:
            progress()  # waiting out an outage is not a stalled batch
            counted(exc, attempt)

        def run(part: Sequence[Row | DeleteRequest]) -> MergeStats:
            progress()
            result: MergeStats = call_with_retry(
                self.cfg.retry, self.store.apply, [r for r in part if isinstance(r, Row)],
                [d for d in part if isinstance(d, DeleteRequest)], self.worker_id, progress,
                on_retry=on_retry)
            return result

        gaps: list[Row] = []

        def on_poison(item: Row | DeleteRequest, exc: BaseException) -> None:
            msg = source.get(id(item))
            if msg is None:
                # A gap staged for a refused record, which is dead-lettered already: the slot
                # keeps what it had.
                self.log.warning("gap_refused", error=str(exc),
                                 doc_id=getattr(item, "doc_id", None))
                return
            failures.append(Failure(msg, exc))
            if isinstance(item, Row) and not item.gap:
                gaps.append(item.as_gap())

        def on_split(part: Sequence[Row | DeleteRequest], exc: BaseException) -> None:
            self.log.warning("batch_bisect", records=len(part), error=str(exc))

        stats = MergeStats()
        tenants: list[Row | DeleteRequest] = [d for d in deletes if d.doc_id is None]
        items: list[Row | DeleteRequest] = [*(d for d in deletes if d.doc_id is not None), *rows]
        for part in (tenants, items):
            for result in isolate(part, run, poison=is_permanent, on_poison=on_poison,
                                  on_split=on_split):
                stats.add(result)
        # The rows the database refused leave gaps too, merged after the rest (best effort).
        if gaps and gaps_wanted(failures):
            for result in isolate(list(gaps), run, poison=is_permanent, on_poison=on_poison):
                stats.add(result)
        return stats


def _gap_for(msg: Message, emb: Embedding) -> Row | None:
    """The gap a refused embedding leaves, or None when even its publish time is unreadable."""
    try:
        published = published_at(msg.headers(), msg.timestamp())
    except InvalidMessage:
        return None
    return Row.gap_of(ChunkGap.of(emb.chunk, "refused by the writer"), published,
                      msg.offset() or 0)


def _drop_superseded(
    rows: list[tuple[Message, Row]], deletes: list[tuple[Message, DeleteRequest]]
) -> tuple[list[Row], list[tuple[Message, DeleteRequest]]]:
    """Rows of a document deleted later in the same batch never reach the merge.

    Returns the rows to merge, and the deletes, each knowing the highest version it dropped
    (``supersedes``): its tombstone records that version, as if the rows had been merged first.
    """
    doc_deletes: dict[tuple[str, str], list[DeleteRequest]] = {}
    tenant_cut: dict[str, datetime] = {}
    offset_of: dict[int, int] = {}
    for msg, req in deletes:
        offset_of[id(req)] = msg.offset() or 0
        if req.doc_id is None:
            tenant_cut[req.tenant_id] = max(req.published_at,
                                            tenant_cut.get(req.tenant_id, req.published_at))
        else:
            doc_deletes.setdefault((req.tenant_id, req.doc_id), []).append(req)

    def deleted_later(row: Row) -> bool:
        # As in the store: a versioned delete removes that version and older ones; one without
        # a version what was published before it.
        return any(offset_of[id(req)] > row.offset
                   and (row.published_at < req.published_at if req.version is None
                        else row.doc_version <= req.version)
                   for req in doc_deletes.get((row.tenant_id, row.doc_id), ()))

    kept: list[Row] = []
    dropped: dict[tuple[str, str], int] = {}
    for _, row in rows:
        if row.tenant_id in tenant_cut and row.published_at <= tenant_cut[row.tenant_id]:
            continue
        if deleted_later(row):
            key = (row.tenant_id, row.doc_id)
            dropped[key] = max(dropped.get(key, 0), row.doc_version)
        else:
            kept.append(row)
    return kept, [
        (msg, replace(req, supersedes=dropped[(req.tenant_id, req.doc_id)])
         if req.doc_id is not None and (req.tenant_id, req.doc_id) in dropped else req)
        for msg, req in deletes]
