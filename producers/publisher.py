"""The publishing API for upstream Python systems: documents in, chunk messages on Kafka.

    with Publisher(load_config()) as pub:
        pub.publish(Document(tenant_id="acme", doc_id="faq/1", content=text, version=7))
        pub.delete("acme", "faq/0")

Messages are keyed by tenant/document, so a document's chunks and its deletes stay in order on
one partition. The producer is idempotent (acks=all) and compressed; :meth:`Publisher.flush`
(and leaving the ``with`` block) raises :class:`DeliveryRefused` if the broker refused a
message for good (too large, not authorized) and :class:`DeliveryFailed` if it did not
acknowledge one in time. Called inside an active OpenTelemetry span, every message carries its
W3C trace context (``traceparent``, ``tracestate``), which the stages carry on and link to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol

from producers.chunking import chunk_document, make_chunker
from vecpipe.config import Config
from vecpipe.kafka.admin import ensure_topics
from vecpipe.kafka.producer import DurableProducer
from vecpipe.messages import (
    CHUNK,
    DELETE,
    Chunk,
    Delete,
    Document,
    check_chunk,
    check_delete,
    encode_chunk,
    encode_delete,
    published_header,
    schema_headers,
)
from vecpipe.tracing import current_headers

__all__ = ["Chunker", "PublishResult", "Publisher"]


class Chunker(Protocol):
    """Turns a document into chunks (see ``producers.chunking``)."""

    def __call__(self, doc: Document) -> list[Chunk]:
        """The document's chunks, indexed 0..n-1."""
        ...


@dataclass(frozen=True)
class PublishResult:
    """What one ``publish`` queued."""

    doc_id: str
    chunks: int
    chars: int


class Publisher:
    """Chunks and publishes documents; see the module docstring."""

    def __init__(self, cfg: Config, chunker: Chunker | None = None,
                 *, create_topics: bool = True, **producer_overrides: Any) -> None:
        self.cfg = cfg
        if chunker is None:
            splitter = make_chunker(cfg.produce.chunker, cfg.model.name, cfg.produce.chunk_size,
                                    cfg.produce.chunk_overlap)

            def chunker(doc: Document) -> list[Chunk]:
                return chunk_document(doc, splitter)

        self.chunker: Chunker = chunker
        if create_topics:
            ensure_topics(cfg.kafka)
        self.producer = DurableProducer(cfg.kafka, **producer_overrides)
        self.topic = cfg.kafka.chunks_topic

    def publish(self, document: Document) -> PublishResult:
        """Chunk ``document`` and queue its chunks, all stamped with one publish time.

        A version without content (nothing to chunk) is published as a versioned delete: the
        versions before it stop being searchable, as a version with fewer chunks removes the
        stale ones, and a later version brings the document back. Raises InvalidMessage, before
        sending anything, for a chunk the pipeline would refuse.
        """
        chunks = self.chunker(document)
        for chunk in chunks:
            check_chunk(chunk)
        if not chunks:
            self._delete(Delete(tenant_id=document.tenant_id, doc_id=document.doc_id,
                                version=document.version,
                                reason=f"version {document.version} has no content"))
            return PublishResult(document.doc_id, 0, len(document.content))
        headers = [*schema_headers(CHUNK), published_header(), *current_headers()]
        for chunk in chunks:
            self.producer.produce(self.topic, encode_chunk(chunk), key=chunk.key,
                                  headers=headers)
        return PublishResult(document.doc_id, len(chunks), len(document.content))

    def publish_many(
        self, documents: Iterable[Document],
        progress: Callable[[PublishResult], None] | None = None,
    ) -> list[PublishResult]:
        """Publish each document in turn; ``progress`` is called after each."""
        results = []
        for doc in documents:
            result = self.publish(doc)
            results.append(result)
            if progress is not None:
                progress(result)
        return results

    def publish_chunk(self, chunk: Chunk, published: datetime | None = None) -> None:
        """Queue one already-made chunk (for systems that chunk themselves). Give every chunk
        of a version the same ``published`` time (default: now). Raises InvalidMessage, before
        sending, for a chunk the pipeline would refuse."""
        check_chunk(chunk)
        self.producer.produce(self.topic, encode_chunk(chunk), key=chunk.key,
                              headers=[*schema_headers(CHUNK), published_header(published),
                                       *current_headers()])

    def delete(self, tenant_id: str, doc_id: str, *, version: int | None = None,
               reason: str = "") -> None:
        """Remove one document (of ``version`` or older, if given; else every version
        published before this call), end to end, audited. Raises InvalidMessage, before
        sending, for a delete the pipeline would refuse: a caller is never told an erasure was
        requested that would be dead-lettered."""
        self._delete(Delete(tenant_id=tenant_id, doc_id=doc_id, version=version, reason=reason))

    def delete_tenant(self, tenant_id: str, *, reason: str = "") -> None:
        """Remove every chunk of a tenant published before this call, end to end, audited."""
        self._delete(Delete(tenant_id=tenant_id, reason=reason))

    def _delete(self, delete: Delete) -> None:
        check_delete(delete)
        self.producer.produce(self.topic, encode_delete(delete), key=delete.key,
                              headers=[*schema_headers(DELETE), published_header(),
                                       *current_headers()])

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until the broker acknowledged everything queued; raise if it refused any."""
        self.producer.flush(timeout)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.flush()
        else:
            # Do not mask the caller's error; still give queued messages their chance.
            with contextlib.suppress(Exception):
                self.flush()
