"""The writer stage: embeddings and deletes in, one idempotent database transaction per batch.

decode -> collapse -> COPY into staging -> merge (see ``vecpipe.store``) -> commit. The records
are returned to the consumer loop, which stores their offsets, only after the commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol

from confluent_kafka import Message

from vecpipe.config import Config
from vecpipe.consumer import Batch
from vecpipe.deadletter import DeadLetterGuard, DeadLetters
from vecpipe.faults import PermanentError, call_with_retry, is_permanent
from vecpipe.health import Metrics
from vecpipe.messages import Chunk, Delete, Embedding, InvalidMessage, decode
from vecpipe.producer import DurableProducer
from vecpipe.store import DeleteRequest, MergeStats, Row

__all__ = ["StoreLike", "WriteProcessor", "to_row"]


class StoreLike(Protocol):
    """What the stage needs of the database (``vecpipe.store.Store`` or a test fake)."""

    def apply(self, rows: Sequence[Row], deletes: Sequence[DeleteRequest],
              worker_id: str = "") -> MergeStats:
        """Apply deletes and merge rows in one transaction."""
        ...


def _published_at(msg: Message) -> datetime:
    ts = msg.timestamp()[1]
    return datetime.fromtimestamp(ts / 1000, UTC) if ts and ts > 0 else datetime(1970, 1, 1,
                                                                                   tzinfo=UTC)


def to_row(emb: Embedding, msg: Message, cfg: Config) -> Row:
    """Check an embedding against the table's shape and turn it into a row to merge."""
    dim = cfg.vector.dimension
    if emb.vector.shape != (dim,):
        raise PermanentError(
            f"the vector has {emb.vector.shape[0]} dimensions but the table stores {dim} "
            "(vector.dimension); it was made by another model or configuration."
        )
    if cfg.vector.normalize:
        norm = float((emb.vector.astype("float64") ** 2).sum() ** 0.5)
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
        model_backend=emb.backend, embedded_at=embedded_at, published_at=_published_at(msg),
        offset=msg.offset() or 0,
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
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.producer = producer
        self.dead_letters = dead_letters
        self.guard = guard
        self.metrics = metrics
        self.log = log
        self.worker_id = worker_id
        # Which message each row or delete came from, to dead-letter what the database refuses.
        self._source: dict[int, Message] = {}

    def weight(self, msg: Message) -> int:
        """Every record counts one towards the batch size."""
        return 1

    def process(self, batch: Batch) -> list[Message]:
        """Merge the batch in one transaction; return its records once committed."""
        rows: list[tuple[Message, Row]] = []
        deletes: list[tuple[Message, DeleteRequest]] = []
        failures: list[tuple[Message, BaseException]] = []
        for msg in batch.messages:
            try:
                obj = decode(msg.value(), msg.headers())
                if isinstance(obj, Chunk):
                    raise InvalidMessage(
                        "a chunk without a vector was published on the embeddings topic; "
                        "publish chunks on the chunks topic."
                    )
                if isinstance(obj, Delete):
                    deletes.append((msg, DeleteRequest(
                        tenant_id=obj.tenant_id, doc_id=obj.doc_id, version=obj.version,
                        published_at=_published_at(msg),
                        source={"topic": msg.topic(), "partition": msg.partition(),
                                "offset": msg.offset(), "requested_at": obj.requested_at,
                                "reason": obj.reason},
                    )))
                else:
                    rows.append((msg, to_row(obj, msg, self.cfg)))
            except (InvalidMessage, PermanentError) as exc:
                failures.append((msg, exc))
        kept, deletes = _drop_superseded(rows, deletes)
        self._source = {id(item): msg for msg, item in [*rows, *deletes]}
        stats = self._apply(kept, [d for _, d in deletes], failures)
        if failures:
            for msg, err in failures:
                self.dead_letters.send(msg, err)
                self.log.warning("dead_lettered", partition=msg.partition(), offset=msg.offset(),
                                 error_class=type(err).__name__, error=str(err))
            call_with_retry(self.cfg.retry, self.producer.flush)
        failed = {id(m) for m, _ in failures}
        for msg in batch.messages:
            self.guard.record(id(msg) in failed)
        self.metrics.count("ok", len(batch.messages) - len(failed))
        self.metrics.count("dead_letter", len(failed))
        self.metrics.dead_letters.labels(self.metrics.stage).inc(len(failed))
        for action in ("inserted", "updated", "unchanged", "stale_deleted", "deleted"):
            self.metrics.rows.labels(self.metrics.stage, action).inc(getattr(stats, action))
        self.log.debug("batch_merged", records=len(batch.messages), **vars(stats))
        return list(batch.messages)

    def _apply(self, rows: list[Row], deletes: list[DeleteRequest],
               failures: list[tuple[Message, BaseException]]) -> MergeStats:
        def on_retry(exc: BaseException, attempt: int) -> None:
            self.metrics.retries.labels(self.metrics.stage, "database").inc()
            self.log.warning("retrying", kind="database", attempt=attempt, error=str(exc))

        if not rows and not deletes:
            return MergeStats()
        try:
            result: MergeStats = call_with_retry(
                self.cfg.retry, self.store.apply, rows, deletes, self.worker_id,
                on_retry=on_retry)
            return result
        except Exception as exc:
            if not is_permanent(exc):
                raise
            items: list[Row | DeleteRequest] = [*deletes, *rows]
            if len(items) == 1:
                msg = self._source.get(id(items[0]))
                if msg is None:
                    raise
                failures.append((msg, exc))
                return MergeStats()
        # One record the database refuses must not hold back the rest: bisect to find it.
        # Halves keep the order (deletes first), so the result is what one transaction gives.
        self.log.warning("batch_bisect", rows=len(rows), deletes=len(deletes))
        stats = MergeStats()
        half = len(items) // 2
        for part in (items[:half], items[half:]):
            stats.add(self._apply([r for r in part if isinstance(r, Row)],
                                  [d for d in part if isinstance(d, DeleteRequest)], failures))
        return stats


def _drop_superseded(
    rows: list[tuple[Message, Row]], deletes: list[tuple[Message, DeleteRequest]]
) -> tuple[list[Row], list[tuple[Message, DeleteRequest]]]:
    """Rows of a document deleted later in the same batch never reach the merge.

    Returns the rows to merge, and the deletes, each knowing the highest version it dropped
    (``supersedes``): its tombstone records that version, as if the rows had been merged first.
    """
    doc_deletes: dict[tuple[str, str], list[tuple[int, int | None]]] = {}
    tenant_cut: dict[str, datetime] = {}
    for msg, req in deletes:
        if req.doc_id is None:
            tenant_cut[req.tenant_id] = max(req.published_at,
                                            tenant_cut.get(req.tenant_id, req.published_at))
        else:
            doc_deletes.setdefault((req.tenant_id, req.doc_id), []).append(
                (msg.offset() or 0, req.version))

    def deleted_later(row: Row) -> bool:
        # A versioned delete removes that version and older ones only, as in the store.
        return any(offset > row.offset and (version is None or row.doc_version <= version)
                   for offset, version in doc_deletes.get((row.tenant_id, row.doc_id), ()))

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
