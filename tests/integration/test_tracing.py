"""Traces across the stages against the real broker, database and model, with the SDK's
in-memory exporter installed in this process as the global provider."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from producers.publisher import Publisher
from tests.helpers import read_topic, run_stage
from vecpipe.kafka.producer import DurableProducer
from vecpipe.messages import CHUNK, Chunk, Document, content_hash, encode_chunk, header_value
from vecpipe.messages import schema_headers as schema

pytestmark = pytest.mark.integration

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TS = "vendor=opaque-value"
POISON_TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class _Switch(SpanProcessor):
    """Hands finished spans to the exporter of the test under way: a process has one global
    provider, set once, and other tests' stages must not fill this test's exporter."""

    target: SimpleSpanProcessor | None = None

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        """Nothing to do when a span starts."""

    def on_end(self, span: ReadableSpan) -> None:
        """Export the span if a test listens."""
        if self.target is not None:
            self.target.on_end(span)

    def shutdown(self) -> None:
        """Nothing held."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Spans are exported as they end."""
        return True


_SWITCH = _Switch()


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    """The spans this process ends while the test runs, through the global SDK provider."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
        assert isinstance(provider, TracerProvider)
        provider.add_span_processor(_SWITCH)
    exporter = InMemorySpanExporter()
    _SWITCH.target = SimpleSpanProcessor(exporter)
    try:
        yield exporter
    finally:
        _SWITCH.target = None


def links_of(exporter: InMemorySpanExporter, name: str) -> set[tuple[int, int]]:
    """(trace id, span id) of every link of every span named ``name``."""
    return {(link.context.trace_id, link.context.span_id)
            for s in exporter.get_finished_spans() if s.name == name for link in s.links}


def ids(traceparent: str) -> tuple[int, int]:
    _, trace_id, span_id, _ = traceparent.split("-")
    return int(trace_id, 16), int(span_id, 16)


def test_a_documents_trace_is_followed_across_the_stages(
        migrated: Any, encoder: Any, exported: InMemorySpanExporter) -> None:
    """A chunk published inside an upstream span, and one published with its own traceparent
    and tracestate, reach the embeddings topic with the same context; the embed and write
    batch spans link to it; a poison chunk's dead letter carries its traceparent."""
    cfg = migrated
    upstream = trace.get_tracer("upstream-system")
    with upstream.start_as_current_span("import documents") as span, Publisher(cfg) as pub:
        pub.publish(Document("default", "traced", "A short text about tracing.", version=1))
        ctx = span.get_span_context()
    published_tp = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
    text = "A chunk some other client published."
    own = Chunk("default", "own", 1, 0, 1, text, content_hash(text), 0, len(text))
    producer = DurableProducer(cfg.kafka)
    producer.produce(cfg.kafka.chunks_topic, encode_chunk(own), key=own.key,
                     headers=[*schema(CHUNK), ("traceparent", TP.encode()),
                              ("tracestate", TS.encode())])
    producer.produce(cfg.kafka.chunks_topic, b"{not json", key=b"default/poison",
                     headers=[*schema(CHUNK), ("traceparent", POISON_TP.encode())])
    producer.flush()
    producer.close()

    assert run_stage("embed", cfg, encoder=encoder) == 0
    carried = {m.key(): (header_value(m.headers(), "traceparent"),
                         header_value(m.headers(), "tracestate"))
               for m in read_topic(cfg, cfg.kafka.embeddings_topic)}
    assert carried == {b"default/traced": (published_tp, None), b"default/own": (TP, TS)}
    [dead] = read_topic(cfg, cfg.kafka.dlq_topic(cfg.kafka.chunks_topic))
    assert header_value(dead.headers(), "traceparent") == POISON_TP

    assert run_stage("write", cfg) == 0
    assert links_of(exported, "vecpipe.embed batch") == {
        (ctx.trace_id, ctx.span_id), ids(TP), ids(POISON_TP)}
    assert links_of(exported, "vecpipe.write batch") == {(ctx.trace_id, ctx.span_id), ids(TP)}
    spans = exported.get_finished_spans()
    embed_batches = [s for s in spans if s.name == "vecpipe.embed batch"]
    assert {(s.attributes or {})["messaging.destination.name"] for s in embed_batches} == {
        cfg.kafka.chunks_topic}
    assert sum(int(str((s.attributes or {})["vecpipe.dead_letters"]))
               for s in embed_batches) == 1
    merged = sum(int(str((s.attributes or {})["vecpipe.rows.inserted"]))
                 for s in spans if s.name == "vecpipe.write merge")
    assert merged == 2
