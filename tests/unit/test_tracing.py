"""Unit tests of vecpipe.tracing: the trace context carried through the stages and into dead
letters, batch spans linked to their records, and the optional exporter, with the SDK's
in-memory exporter (no collector)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Tracer

from producers.publisher import Publisher
from tests.fakes import FakeProducer, FakeRecord, Sent
from tests.unit.test_embed_stage import CFG as EMBED_CFG
from tests.unit.test_embed_stage import FakeEncoder
from tests.unit.test_embed_stage import chunk as embed_chunk
from tests.unit.test_write_stage import CFG as WRITE_CFG
from tests.unit.test_write_stage import FakeStore
from tests.unit.test_write_stage import chunk as write_chunk
from vecpipe import tracing
from vecpipe.config import Config, load_config
from vecpipe.deadletter.guard import DeadLetterGuard
from vecpipe.deadletter.headers import (
    H_TRUNCATED,
    DeadLetter,
    error_headers,
    fit,
    record_size,
    replay_headers,
)
from vecpipe.deadletter.sender import DeadLetters
from vecpipe.errors import ConfigError, InvalidMessage
from vecpipe.health import Metrics
from vecpipe.kafka.consumer import Batch
from vecpipe.logs import get_logger
from vecpipe.messages import (
    CHUNK,
    DELETE,
    EMBEDDING,
    GAP,
    Delete,
    Document,
    Embedding,
    encode_chunk,
    encode_delete,
    encode_embedding,
    header_value,
    schema_headers,
)
from workers.embed import EmbedProcessor
from workers.run import run_write
from workers.write import WriteProcessor

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TP = f"00-{TRACE_ID}-b7ad6b7169203331-01"
TP2 = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
TS = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
CHUNKS = EMBED_CFG.kafka.chunks_topic
EMBEDDINGS = WRITE_CFG.kafka.embeddings_topic
T0 = 1_714_566_615_000
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def spans() -> Iterator[tuple[Tracer, InMemorySpanExporter]]:
    """A tracer of the real SDK whose finished spans stay in memory (no global provider)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def linked(span: ReadableSpan) -> list[tuple[str, int, str, int]]:
    """(trace id, span id, partition, offset) of each of the span's links."""
    return [(format(link.context.trace_id, "032x"), link.context.span_id,
             str((link.attributes or {})["messaging.destination.partition.id"]),
             int(str((link.attributes or {})["messaging.kafka.offset"])))
            for link in span.links]


def trace_of(sent: Sent) -> tuple[str | None, str | None]:
    return header_value(sent.headers, "traceparent"), header_value(sent.headers, "tracestate")


# -- reading the context -------------------------------------------------------------------------


def test_a_well_formed_context_is_read_and_carried_as_it_came() -> None:
    """traceparent and tracestate give the upstream's span context, and travel on unchanged."""
    headers = [*schema_headers(CHUNK), ("traceparent", TP.encode()),
               ("tracestate", TS.encode())]
    ctx = tracing.record_context(headers)
    assert ctx is not None and ctx.is_valid and ctx.is_remote
    assert (format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")) == (
        TRACE_ID, "b7ad6b7169203331")
    assert ctx.trace_flags.sampled and dict(ctx.trace_state) == {
        "congo": "t61rcWkgMzE", "rojo": "00f067aa0ba902b7"}
    assert tracing.trace_headers(headers) == [("traceparent", TP.encode()),
                                              ("tracestate", TS.encode())]
    # A later version of the format may add fields; its first four are read.
    future = f"cc-{TRACE_ID}-b7ad6b7169203331-01-what-comes-next"
    assert tracing.record_context([("traceparent", future.encode())]) is not None


@pytest.mark.parametrize("bad", [
    b"00-abc-def-01",                                           # ids too short
    TP.upper().encode(),                                        # upper-case hex
    f"00-{'0' * 32}-b7ad6b7169203331-01".encode(),              # all-zero trace id
    f"00-{TRACE_ID}-{'0' * 16}-01".encode(),                    # all-zero span id
    f"ff-{TRACE_ID}-b7ad6b7169203331-01".encode(),              # version ff
    f"{TP}-extra".encode(),                                     # version 00 takes no more
    f" {TP}".encode(),
    b"\xff\xfe" + TP.encode(),                                  # not ASCII
    TP.encode() + b"-" + b"x" * 1000,                           # absurdly long
    b"",
], ids=["short", "upper", "zero-trace", "zero-span", "ff", "suffix", "space", "binary",
        "long", "empty"])
def test_a_malformed_traceparent_gives_no_context_and_is_not_carried(bad: bytes) -> None:
    """A malformed traceparent is ignored: no link, nothing carried, no exception."""
    headers = [("traceparent", bad), ("tracestate", TS.encode())]
    assert tracing.record_context(headers) is None
    assert tracing.trace_headers(headers) == []


@pytest.mark.parametrize("bad_state", [
    b"Upper=1", b"a=1,a=2", b"no-equals", ",".join(f"k{i}=v" for i in range(33)).encode(),
    b"k=" + b"v" * 600, b"k=\xff",
], ids=["upper", "duplicate", "no-equals", "33-members", "long", "binary"])
def test_a_malformed_tracestate_is_dropped_and_the_traceparent_kept(bad_state: bytes) -> None:
    """A bad tracestate does not spoil a good traceparent: the traceparent alone travels on."""
    headers = [("traceparent", TP.encode()), ("tracestate", bad_state)]
    ctx = tracing.record_context(headers)
    assert ctx is not None and len(ctx.trace_state) == 0
    assert tracing.trace_headers(headers) == [("traceparent", TP.encode())]


def test_the_last_traceparent_header_wins() -> None:
    """Kafka allows a header name twice; as for every header, the last one counts."""
    headers = [("traceparent", b"garbage"), ("traceparent", TP2.encode())]
    assert tracing.trace_headers(headers) == [("traceparent", TP2.encode())]
    assert tracing.record_context([("traceparent", TP.encode()), ("traceparent", b"x")]) is None


# -- the embed stage -----------------------------------------------------------------------------


def chunk_record(offset: int, text: str, trace: list[tuple[str, bytes]],
                 value: bytes | None = None, partition: int = 0) -> FakeRecord:
    c = embed_chunk(text, doc=f"doc-{offset}")
    return FakeRecord(CHUNKS, partition, offset, c.key,
                      encode_chunk(c) if value is None else value,
                      [*schema_headers(CHUNK), *trace], (1, T0 + offset))


def embed_stage(tracer: Tracer, encoder: FakeEncoder | None = None,
                cfg: Config = EMBED_CFG) -> tuple[EmbedProcessor, FakeProducer]:
    producer = FakeProducer()
    fake: Any = producer
    processor = EmbedProcessor(
        cfg, encoder or FakeEncoder(), fake, DeadLetters(fake, cfg.kafka, "embed", "w-1"),
        DeadLetterGuard(cfg.dead_letter), Metrics("embed"), get_logger(), tracer=tracer)
    return processor, producer


def test_embed_carries_each_records_context_and_links_the_batch_span_to_it(
        spans: tuple[Tracer, InMemorySpanExporter]) -> None:
    """Each embedding carries its own chunk's traceparent and tracestate (not the batch's);
    a chunk with a malformed or no traceparent is embedded like any other and carries none;
    the poison record's dead letter keeps its context; the batch span is a CONSUMER span
    linked to exactly the records with a context, with the messaging attributes."""
    tracer, exporter = spans
    msgs = [
        chunk_record(1, "first text", [("traceparent", TP.encode()),
                                       ("tracestate", TS.encode())]),
        chunk_record(2, "second text", [("traceparent", b"00-abc-def-01")], partition=1),
        chunk_record(3, "third text", []),
        chunk_record(4, "poison", [("traceparent", TP2.encode())], value=b"{not json"),
    ]
    processor, producer = embed_stage(tracer)
    records: list[Any] = msgs
    assert processor.process(Batch(records)) == records
    out = producer.to(EMBEDDINGS)
    assert [dict(o.headers)["vecpipe.schema"] for o in out] == [EMBEDDING.encode()] * 3
    assert [trace_of(o) for o in out] == [(TP, TS), (None, None), (None, None)]
    [dead] = producer.to(CHUNKS + ".dlq")
    assert trace_of(dead) == (TP2, None) and dead.value == b"{not json"

    [batch] = named(exporter, "vecpipe.embed batch")
    assert batch.kind == SpanKind.CONSUMER
    assert linked(batch) == [(TRACE_ID, 0xB7AD6B7169203331, "0", 1),
                             (TP2.split("-")[1], 0x00F067AA0BA902B7, "0", 4)]
    assert dict(batch.attributes or {}) == {
        "messaging.system": "kafka", "messaging.operation.type": "process",
        "messaging.destination.name": CHUNKS,
        "messaging.consumer.group.name": EMBED_CFG.kafka.embed_group,
        "messaging.batch.message_count": 4, "vecpipe.stage": "embed",
        tracing.A_DEAD_LETTERS: 1}
    [encode] = named(exporter, "vecpipe.embed encode")
    assert encode.parent is not None and encode.parent.span_id == batch.context.span_id
    assert (encode.attributes or {})["vecpipe.texts"] == 3
    # The batch span is a root of its own: the records' traces are followed by links.
    assert batch.parent is None and batch.context.trace_id != int(TRACE_ID, 16)


def test_gaps_and_deletes_carry_the_context_on(
        spans: tuple[Tracer, InMemorySpanExporter]) -> None:
    """A chunk the model fails on leaves a gap carrying the chunk's context; a delete travels
    on unchanged, its context with it."""
    tracer, _ = spans
    delete = Delete(tenant_id="acme", doc_id="d9", requested_at="2024-05-01T00:00:00+00:00")
    msgs = [chunk_record(1, "fine text", []),
            chunk_record(2, "not a number", [("traceparent", TP.encode()),
                                             ("tracestate", TS.encode())]),
            FakeRecord(CHUNKS, 0, 3, delete.key, encode_delete(delete),
                       [*schema_headers(DELETE), ("traceparent", TP2.encode())], (1, T0))]
    processor, producer = embed_stage(tracer, FakeEncoder(nan_text="not a number"))
    records: list[Any] = msgs
    processor.process(Batch(records))
    by_schema = {dict(o.headers)["vecpipe.schema"]: o for o in producer.to(EMBEDDINGS)}
    assert trace_of(by_schema[GAP.encode()]) == (TP, TS)
    assert trace_of(by_schema[DELETE.encode()]) == (TP2, None)
    assert trace_of(by_schema[EMBEDDING.encode()]) == (None, None)
    [dead] = producer.to(CHUNKS + ".dlq")
    assert trace_of(dead) == (TP, TS)


def test_one_malformed_header_does_not_hurt_the_batch(
        spans: tuple[Tracer, InMemorySpanExporter]) -> None:
    """Headers of every odd shape (a None value, binary bytes, a str) on good chunks: every
    chunk is embedded, none is dead-lettered, and only the good context is linked."""
    tracer, exporter = spans
    msgs = [chunk_record(1, "one", [("traceparent", b"\x00\xff" * 40)]),
            chunk_record(2, "two", [("traceparent", TP.encode())]),
            chunk_record(3, "three", [("tracestate", TS.encode())])]
    msgs[0].headers_.append(("traceparent", None))  # type: ignore[arg-type]
    processor, producer = embed_stage(tracer)
    records: list[Any] = msgs
    assert processor.process(Batch(records)) == records
    assert len(producer.to(EMBEDDINGS)) == 3 and producer.to(CHUNKS + ".dlq") == []
    [batch] = named(exporter, "vecpipe.embed batch")
    assert [offset for *_, offset in linked(batch)] == [2]
    assert (batch.attributes or {})[tracing.A_DEAD_LETTERS] == 0


def test_the_batch_log_events_carry_the_batch_spans_trace_id(
        spans: tuple[Tracer, InMemorySpanExporter]) -> None:
    """A dead letter's log event, logged in the batch, names the batch span's trace and span."""
    tracer, exporter = spans
    processor, _ = embed_stage(tracer)
    records: list[Any] = [chunk_record(1, "poison", [], value=b"{not json"),
                          chunk_record(2, "good", [])]
    with structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]) as events:
        processor.process(Batch(records))
    [batch] = named(exporter, "vecpipe.embed batch")
    [event] = [e for e in events if e["event"] == "dead_lettered"]
    assert event["trace_id"] == format(batch.context.trace_id, "032x")
    assert event["span_id"] == format(batch.context.span_id, "016x")
    assert "trace_id" not in structlog.contextvars.get_contextvars()  # unbound after the batch


def test_without_a_provider_nothing_is_recorded_and_headers_still_travel() -> None:
    """With opentelemetry-api's no-op tracer (no SDK installed), the context is still carried."""
    processor, producer = embed_stage(tracing.get_tracer())
    records: list[Any] = [chunk_record(1, "text", [("traceparent", TP.encode())])]
    processor.process(Batch(records))
    assert trace_of(producer.to(EMBEDDINGS)[0]) == (TP, None)


# -- the write stage -----------------------------------------------------------------------------


def embedding_record(offset: int, trace: list[tuple[str, bytes]], dim: int = 4) -> FakeRecord:
    c = write_chunk(doc=f"doc-{offset}")
    vector = np.full(dim, 1 / np.sqrt(dim), dtype=np.float32)
    e = Embedding(chunk=c, vector=vector, model_name="fake-minilm", model_revision="rev-1",
                  backend="torch-fp32", embedded_at="2024-05-01T12:00:00+00:00")
    return FakeRecord(EMBEDDINGS, 0, offset, c.key, encode_embedding(e),
                      [*schema_headers(EMBEDDING), *trace], (1, T0 + offset))


def test_write_links_its_batch_span_and_its_dead_letters_keep_the_context(
        spans: tuple[Tracer, InMemorySpanExporter]) -> None:
    """The writer's batch span links to each embedding's context, the merge is its child, and
    an embedding it refuses (wrong dimension) is dead-lettered with its context."""
    tracer, exporter = spans
    producer = FakeProducer()
    fake: Any = producer
    store = FakeStore()
    processor = WriteProcessor(
        WRITE_CFG, store, fake, DeadLetters(fake, WRITE_CFG.kafka, "write", "w-1"),
        DeadLetterGuard(WRITE_CFG.dead_letter), Metrics("write"), get_logger(), "w-1",
        tracer=tracer)
    records: list[Any] = [
        embedding_record(1, [("traceparent", TP.encode()), ("tracestate", TS.encode())]),
        embedding_record(2, [("traceparent", b"nonsense")]),
        embedding_record(3, [("traceparent", TP2.encode())], dim=8),
    ]
    assert processor.process(Batch(records)) == records
    assert sorted(r.doc_id for r in store.committed_rows if not r.gap) == ["doc-1", "doc-2"]
    [dead] = producer.to(EMBEDDINGS + ".dlq")
    assert trace_of(dead) == (TP2, None)
    [batch] = named(exporter, "vecpipe.write batch")
    assert batch.kind == SpanKind.CONSUMER
    assert [(t, o) for t, _, _, o in linked(batch)] == [(TRACE_ID, 1), (TP2.split("-")[1], 3)]
    assert (batch.attributes or {})["messaging.consumer.group.name"] == \
        WRITE_CFG.kafka.write_group
    assert (batch.attributes or {})[tracing.A_DEAD_LETTERS] == 1
    [merge] = named(exporter, "vecpipe.write merge")
    assert merge.parent is not None and merge.parent.span_id == batch.context.span_id
    # The fake store counts what it was given: two rows and the gap the refused one leaves.
    assert (merge.attributes or {})["vecpipe.rows.inserted"] == 3


# -- dead letters and replays --------------------------------------------------------------------


def test_a_cut_dead_letter_keeps_its_trace_context() -> None:
    """When the record's own headers must go to fit the topic, its trace context stays (and
    only the last of each; an absurd tracestate goes too)."""
    own = [("traceparent", b"old"), ("traceparent", TP.encode()), ("tracestate", TS.encode()),
           ("big", b"h" * 5000)]
    errors = [("__connect.errors.exception.message", b"why")]
    key, value, headers = fit(b"k", b"v" * 100, [*own, *errors], 2000)
    assert record_size(key, value, headers) <= 2000
    assert dict(headers)[H_TRUNCATED] == b"value,headers"
    assert trace_of(Sent("", value, key, headers, None)) == (TP, TS)
    assert [k for k, _ in headers].count("traceparent") == 1
    huge = [("traceparent", TP.encode()), ("tracestate", b"k=" + b"v" * 5000)]
    _, _, headers = fit(b"k", b"v", [*huge, *errors], 2000)
    assert trace_of(Sent("", None, None, headers, None)) == (TP, None)


def test_a_replayed_dead_letter_carries_the_context_back() -> None:
    """fail -> dead letter -> replay: the replayed record has the original traceparent and
    tracestate, once each."""
    record = FakeRecord(headers_=[*schema_headers(CHUNK), ("traceparent", TP.encode()),
                                  ("tracestate", TS.encode())])
    dead = FakeRecord("vecpipe.chunks.dlq", 0, 5, record.key_, record.value_,
                      error_headers(record, InvalidMessage("bad"), stage="embed", worker="w",
                                    attempts=1), record.timestamp_)
    replayed = replay_headers(DeadLetter.of(dead))
    assert trace_of(Sent("", None, None, replayed, None)) == (TP, TS)
    assert [k for k, _ in replayed].count("traceparent") == 1


# -- the publisher -------------------------------------------------------------------------------


@dataclass
class Published:
    publisher: Publisher
    producer: FakeProducer


def publisher() -> Published:
    pub = Publisher(Config(), lambda doc: [embed_chunk(doc.content, doc=doc.doc_id)],
                    create_topics=False, **{"log_level": 0})
    fake = FakeProducer()
    pub.producer = fake  # type: ignore[assignment]
    return Published(pub, fake)


def test_the_publisher_sets_the_active_context(
        spans: tuple[Tracer, InMemorySpanExporter]) -> None:
    """Inside an active span, every chunk and delete carries that span's traceparent; outside
    one, none (a publisher never needs OpenTelemetry)."""
    tracer, _ = spans
    p = publisher()
    with tracer.start_as_current_span("upstream import") as span:
        p.publisher.publish(Document("acme", "d1", "some text", 1))
        p.publisher.publish_chunk(embed_chunk("more", doc="d2"))
        p.publisher.delete("acme", "d0")
        ctx = span.get_span_context()
    expected = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
    assert [trace_of(s)[0] for s in p.producer.sent] == [expected] * 3
    p.publisher.publish(Document("acme", "d3", "later text", 1))
    assert trace_of(p.producer.sent[-1]) == (None, None)
    assert tracing.current_headers() == []


# -- the exporter --------------------------------------------------------------------------------


def traced_cfg(**changes: Any) -> Config:
    environ = {"VECPIPE_TRACING_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    environ.update({f"VECPIPE_TRACING_{k.upper()}": str(v) for k, v in changes.items()})
    return load_config(environ=environ)


@pytest.mark.parametrize(("variable", "value", "says"), [
    ("VECPIPE_TRACING_OTLP_ENDPOINT", "collector:4318", "tracing.otlp_endpoint"),
    ("VECPIPE_TRACING_SAMPLE_RATIO", "1.5", "tracing.sample_ratio"),
    ("VECPIPE_TRACING_SERVICE_NAME", " ", "tracing.service_name"),
])
def test_tracing_settings_are_checked(variable: str, value: str, says: str) -> None:
    """A wrong tracing setting stops the process with a sentence naming it."""
    with pytest.raises(ConfigError, match=rf"{says} \({variable}\)"):
        load_config(environ={variable: value})


def test_off_by_default_and_nothing_of_the_sdk_is_loaded() -> None:
    """Without an endpoint, install() installs nothing: no SDK module is even imported."""
    code = ("import sys\n"
            "from vecpipe.config import load_config\n"
            "from vecpipe import tracing\n"
            "assert tracing.install(load_config(environ={}), 'embed') is False\n"
            "tracing.flush()\n"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_a_missing_exporter_stops_the_worker_with_one_sentence(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint set without the otlp extra installed: a ConfigError naming the setting and
    the extra, raised before the worker connects to anything."""
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter",
                        None)
    with pytest.raises(ConfigError) as caught:
        tracing.build_provider(traced_cfg(), "embed")
    message = str(caught.value)
    assert "VECPIPE_TRACING_OTLP_ENDPOINT" in message and "vecpipe[otlp]" in message
    assert message.count(". ") == 0 and message.endswith(".")
    with pytest.raises(ConfigError, match="vecpipe\\[otlp\\]"):
        run_write(traced_cfg())  # no broker or database here: it stops before either


def test_the_cli_says_so_and_exits_2() -> None:
    """``vecpipe embed`` with the endpoint set and no exporter: one line, exit 2, no traceback."""
    code = ("import sys\n"
            "sys.modules['opentelemetry.exporter.otlp.proto.http.trace_exporter'] = None\n"
            "from vecpipe.cli.main import main\n"
            "sys.exit(main(['embed']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT,
                          env={"VECPIPE_TRACING_OTLP_ENDPOINT": "http://x:4318",
                               "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "VECPIPE_TRACING_OTLP_ENDPOINT" in line and "vecpipe[otlp]" in line


def test_the_provider_batches_samples_and_names_the_service() -> None:
    """The installed provider exports in batches (nothing until flushed), under the service
    name, with room for a link per record, and samples by the ratio."""
    exporter = InMemorySpanExporter()
    provider = tracing.build_provider(traced_cfg(service_name="ingest"), "write", exporter)
    processor, _ = embed_stage(provider.get_tracer("t"))
    many: list[Any] = [chunk_record(i, f"text {i}", [("traceparent", TP.encode())])
                       for i in range(1, 201)]
    processor.process(Batch(many))
    provider.force_flush()
    [batch] = named(exporter, "vecpipe.embed batch")
    assert len(batch.links) == 200
    assert batch.resource.attributes["service.name"] == "ingest"
    assert batch.resource.attributes["vecpipe.stage"] == "write"
    provider.shutdown()

    none = InMemorySpanExporter()
    provider = tracing.build_provider(traced_cfg(sample_ratio=0), "embed", none)
    processor, _ = embed_stage(provider.get_tracer("t"))
    processor.process(Batch(many[:3]))
    provider.force_flush()
    assert none.get_finished_spans() == ()
    provider.shutdown()


def test_spans_reach_a_real_otlp_http_receiver() -> None:
    """With the otlp extra installed, the provider posts its spans as OTLP/HTTP protobuf to
    <endpoint>/v1/traces (a local HTTP server stands in for the collector)."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    received: list[tuple[str, str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"] or 0))
            received.append((self.path, self.headers["Content-Type"] or "", body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = load_config(environ={
            "VECPIPE_TRACING_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"})
        provider = tracing.build_provider(cfg, "embed")
        records: list[Any] = [chunk_record(1, "x", [("traceparent", TP.encode())])]
        with tracing.batch_span(provider.get_tracer("t"), "embed", "t", "g", records):
            pass
        assert received == []  # batched: nothing is sent before the flush
        provider.force_flush()
        provider.shutdown()
    finally:
        server.shutdown()
    [(path, content_type, body)] = received
    assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
    assert b"vecpipe.embed batch" in body and bytes.fromhex(TRACE_ID) in body  # the link


@pytest.mark.parametrize(("endpoint", "url"), [
    ("http://otel:4318", "http://otel:4318/v1/traces"),
    ("http://otel:4318/", "http://otel:4318/v1/traces"),
    ("https://otel.example.com/custom/traces", "https://otel.example.com/custom/traces"),
])
def test_the_traces_url(endpoint: str, url: str) -> None:
    """/v1/traces is added to a bare collector address, not to a URL with a path."""
    assert tracing.traces_url(endpoint) == url


def test_config_keeps_tracing_off_by_default() -> None:
    """The default configuration sets no endpoint, samples everything, names the service."""
    cfg = load_config(environ={}).tracing
    assert (cfg.otlp_endpoint, cfg.sample_ratio, cfg.service_name) == ("", 1.0, "vecpipe")
    assert replace(cfg, sample_ratio=0.0).sample_ratio == 0.0
