"""Traces across the stages: W3C trace context carried, a span per batch, an optional exporter.

An upstream's trace context (``traceparent``, and ``tracestate`` with it) is read from each
record and never trusted: a well-formed one travels unchanged onto what a stage makes of the
record and links the batch span to the upstream's span; a malformed one gives no link and is not
carried on, and never fails its record (its dead letter, like the record, keeps every header).
Spans go through opentelemetry-api: unless ``tracing.otlp_endpoint`` is set, its tracer is the
no-op one, and the SDK is not even imported.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol
from urllib.parse import urlsplit

import structlog
from opentelemetry import trace
from opentelemetry.trace import Span, SpanContext, SpanKind, TraceFlags, Tracer, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from vecpipe.config import Config
from vecpipe.errors import ConfigError
from vecpipe.messages import (
    TRACEPARENT_HEADER,
    TRACESTATE_HEADER,
    HeaderLike,
    Headers,
)

__all__ = [
    "A_DEAD_LETTERS",
    "TRACER_NAME",
    "batch_span",
    "build_provider",
    "count_dead_letters",
    "current_headers",
    "flush",
    "get_tracer",
    "install",
    "record_context",
    "trace_headers",
    "traces_url",
]

TRACER_NAME = "vecpipe"
# vecpipe's own span attribute: how many records of the batch went to the dead-letter topic.
A_DEAD_LETTERS = "vecpipe.dead_letters"
_SETTING = "tracing.otlp_endpoint (VECPIPE_TRACING_OTLP_ENDPOINT)"
_OTLP_EXPORTER = "opentelemetry.exporter.otlp.proto.http.trace_exporter"

# version-traceid-parentid-flags; a later version may append fields after a '-' (W3C Trace
# Context, "Versioning of traceparent"). Version ff and all-zero ids are invalid.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_MAX_TRACEPARENT = 512
# tracestate: at most 32 comma-separated key=value members, each as W3C defines them. One of
# more than 512 characters (what every participant must pass on) is dropped, not truncated.
_TRACESTATE_MEMBER = re.compile(
    r"[ \t]*([a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
    r"=([\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e])[ \t]*")
_MAX_TRACESTATE = 512
_MAX_MEMBERS = 32
_PROPAGATOR = TraceContextTextMapPropagator()


class RecordLike(Protocol):
    """What a batch span reads of a consumed record (confluent_kafka.Message has it)."""

    def headers(self) -> HeaderLike: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...


def _found(headers: HeaderLike) -> tuple[bytes | None, bytes | None]:
    """The record's last ``traceparent`` and ``tracestate`` values, in one pass."""
    parent = state = None
    if headers is not None:
        for key, value in headers.items() if isinstance(headers, Mapping) else headers:
            if key == TRACEPARENT_HEADER:
                parent = value
            elif key == TRACESTATE_HEADER:
                state = value
    return _bytes(parent), _bytes(state)


def _bytes(value: str | bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _traceparent(raw: bytes | None) -> tuple[int, int, int] | None:
    """(trace id, span id, flags) of a well-formed traceparent, else None."""
    if not raw or len(raw) > _MAX_TRACEPARENT:
        return None
    match = _TRACEPARENT.fullmatch(raw.decode("ascii", "replace"))
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    ids = int(trace_id, 16), int(span_id, 16)
    if version == "ff" or (version == "00" and rest) or not all(ids):
        return None
    return ids[0], ids[1], int(flags, 16)


def _tracestate(raw: bytes | None) -> list[tuple[str, str]] | None:
    """The members of a well-formed tracestate, else None (absent, too long or malformed)."""
    if raw is None or len(raw) > _MAX_TRACESTATE:
        return None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    pairs: list[tuple[str, str]] = []
    for member in text.split(","):
        if not member.strip(" \t"):
            continue  # W3C allows empty members
        match = _TRACESTATE_MEMBER.fullmatch(member)
        if match is None:
            return None
        pairs.append((match.group(1), match.group(2)))
    if len(pairs) > _MAX_MEMBERS or len({k for k, _ in pairs}) != len(pairs):
        return None
    return pairs


def record_context(headers: HeaderLike) -> SpanContext | None:
    """The upstream span context that a record's headers carry; None when they carry none or a
    malformed one (which is never the record's fault)."""
    try:
        raw_parent, raw_state = _found(headers)
        parent = _traceparent(raw_parent)
        if parent is None:
            return None
        pairs = _tracestate(raw_state)
        return SpanContext(parent[0], parent[1], is_remote=True,
                           trace_flags=TraceFlags(parent[2]),
                           trace_state=TraceState(pairs) if pairs is not None else None)
    except Exception:
        return None


def trace_headers(headers: HeaderLike) -> Headers:
    """The record's ``traceparent`` (and a well-formed ``tracestate``) as they came, for what a
    stage makes of the record; nothing when it has no well-formed ``traceparent``."""
    try:
        raw_parent, raw_state = _found(headers)
        if raw_parent is None or _traceparent(raw_parent) is None:
            return []
        if raw_state is None or _tracestate(raw_state) is None:
            return [(TRACEPARENT_HEADER, raw_parent)]
        return [(TRACEPARENT_HEADER, raw_parent), (TRACESTATE_HEADER, raw_state)]
    except Exception:
        return []


def current_headers() -> Headers:
    """The active OpenTelemetry span's context as ``traceparent`` (and ``tracestate``) headers,
    for a publisher; nothing when no span is active."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return [(k, v.encode()) for k, v in carrier.items()]


def get_tracer() -> Tracer:
    """vecpipe's tracer from the global provider (a no-op one unless one is installed)."""
    return trace.get_tracer(TRACER_NAME)


@contextmanager
def batch_span(tracer: Tracer, stage: str, topic: str, group: str,
               records: Sequence[RecordLike]) -> Iterator[Span]:
    """A CONSUMER span ``vecpipe.<stage> batch`` over one batch, with a link to each record's
    upstream context (records without one get no link), and messaging attributes. While it is
    open, the stage's log events carry its ``trace_id`` and ``span_id``."""
    attributes: dict[str, str | int] = {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.destination.name": topic,
        "messaging.consumer.group.name": group,
        "messaging.batch.message_count": len(records),
        "vecpipe.stage": stage,
    }
    with tracer.start_as_current_span(f"vecpipe.{stage} batch", kind=SpanKind.CONSUMER,
                                      attributes=attributes) as span:
        if not span.is_recording():
            # The no-op tracer, or a batch not sampled: no record's headers are even read.
            yield span
            return
        for record in records:
            context = record_context(record.headers())
            if context is not None:
                span.add_link(context, {
                    "messaging.destination.partition.id": str(record.partition()),
                    "messaging.kafka.offset": record.offset() or 0,
                })
        own = span.get_span_context()
        with structlog.contextvars.bound_contextvars(
                trace_id=format(own.trace_id, "032x"), span_id=format(own.span_id, "016x")):
            yield span


def count_dead_letters(dead: int) -> None:
    """Record on the active batch span how many of its records went to the dead-letter topic."""
    trace.get_current_span().set_attribute(A_DEAD_LETTERS, dead)


# -- the exporter -------------------------------------------------------------------------------

_lock = threading.Lock()
_provider: Any = None


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of ``endpoint``: ``/v1/traces`` is added when it has no path."""
    if urlsplit(endpoint).path.strip("/"):
        return endpoint
    return endpoint.rstrip("/") + "/v1/traces"


def build_provider(cfg: Config, stage: str, exporter: Any = None) -> Any:
    """The SDK's TracerProvider for ``cfg.tracing``: sampled by ``sample_ratio``, exporting in
    batches through ``exporter`` (default: OTLP/HTTP to ``otlp_endpoint``).

    Raises ConfigError, naming the setting and the extra, when the SDK or the exporter is not
    installed.
    """
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanLimits, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        if exporter is None:
            # Imported by name: the exporter is an optional extra, typed or not.
            module = importlib.import_module(_OTLP_EXPORTER)
            exporter = module.OTLPSpanExporter(endpoint=traces_url(cfg.tracing.otlp_endpoint))
    except ImportError as exc:
        raise ConfigError(
            f"{_SETTING} is set, but the OpenTelemetry SDK or its OTLP/HTTP exporter is not "
            f"installed ({exc.name or exc} is missing): install vecpipe[otlp], or unset it."
        ) from None
    resource = Resource.create({"service.name": cfg.tracing.service_name,
                                "service.instance.id": cfg.ops.worker_id,
                                "vecpipe.stage": stage})
    # A batch span links to every record of its batch: room for the largest batch.
    limits = SpanLimits(max_links=max(128, cfg.embed.batch_size, cfg.write.batch_size))
    provider = TracerProvider(resource=resource, span_limits=limits,
                              sampler=ParentBased(TraceIdRatioBased(cfg.tracing.sample_ratio)))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def install(cfg: Config, stage: str) -> bool:
    """Make :func:`build_provider`'s provider the global one when ``tracing.otlp_endpoint`` is
    set (once per process); return whether one is installed. Without the setting nothing of
    the SDK is loaded, and spans cost next to nothing."""
    global _provider
    if not cfg.tracing.otlp_endpoint:
        return False
    with _lock:
        if _provider is None:
            _provider = build_provider(cfg, stage)
            trace.set_tracer_provider(_provider)
    return True


def flush(timeout_s: float = 10.0) -> None:
    """Export the spans the installed provider still holds (a worker calls it on its way out)."""
    if _provider is not None:
        _provider.force_flush(int(timeout_s * 1000))
