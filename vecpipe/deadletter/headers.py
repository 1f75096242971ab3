"""The dead-letter header contract, both sides: the headers a stage writes, and reading them back.

A dead-letter record keeps the original key, value, headers and timestamp, and adds Kafka
Connect's ``__connect.errors.*`` headers plus vecpipe's stage, worker, attempts and
first-failed-at (``schemas/dead-letter-headers.v1.json``). :func:`error_headers` writes them;
:meth:`DeadLetter.of` reads a consumed dead letter, tolerating missing or garbled headers;
:func:`replay_headers` is what a replayed copy carries.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from vecpipe.messages import TRACE_HEADERS, HeaderLike, Headers, header_list, with_published_at

__all__ = [
    "ERROR_PREFIXES",
    "H_ATTEMPTS",
    "H_CLASS",
    "H_FIRST_FAILED",
    "H_MESSAGE",
    "H_OFFSET",
    "H_ORIGINAL_BYTES",
    "H_PARTITION",
    "H_REPLAYS",
    "H_STACK",
    "H_STAGE",
    "H_TOPIC",
    "H_TRUNCATED",
    "H_WORKER",
    "DeadLetter",
    "RecordLike",
    "error_headers",
    "fit",
    "record_size",
    "replay_headers",
]

H_TOPIC = "__connect.errors.topic"
H_PARTITION = "__connect.errors.partition"
H_OFFSET = "__connect.errors.offset"
H_CLASS = "__connect.errors.exception.class.name"
H_MESSAGE = "__connect.errors.exception.message"
H_STACK = "__connect.errors.exception.stacktrace"
H_STAGE = "__connect.errors.stage"
H_WORKER = "vecpipe.errors.worker"
H_ATTEMPTS = "vecpipe.errors.attempts"
H_FIRST_FAILED = "vecpipe.errors.first.failed.at"
H_REPLAYS = "vecpipe.replay.count"
# A dead letter larger than its topic takes is cut to fit, and says so: what was cut ("value",
# "value,headers", "value,headers,key") and the record's size before.
H_TRUNCATED = "vecpipe.errors.truncated"
H_ORIGINAL_BYTES = "vecpipe.errors.original.bytes"
ERROR_PREFIXES = ("__connect.errors.", "vecpipe.errors.")
_MAX_STACK = 8000
# An error message quoting its input (a database error echoing a 5 MB value) is cut to this.
_MAX_MESSAGE = 2000


class RecordLike(Protocol):
    """What is read of a consumed record (confluent_kafka.Message has it)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> str | bytes | None: ...
    def value(self) -> str | bytes | None: ...
    def headers(self) -> HeaderLike: ...
    def timestamp(self) -> tuple[int, int]: ...


def _capped(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def error_headers(record: RecordLike, exc: BaseException, *, stage: str, worker: str,
                  attempts: int) -> Headers:
    """The record's own headers (without the error headers of an earlier failure) and this
    failure's; first-failed-at is kept across failures and replays."""
    original = header_list(record.headers())
    # The publish time is made explicit: dead-letter topics append with their own time.
    kept = [(k, v) for k, v in with_published_at(original, record.timestamp())
            if not k.startswith(ERROR_PREFIXES)]
    first_failed = (next((v for k, v in original if k == H_FIRST_FAILED), None)
                    or datetime.now(UTC).isoformat().encode())
    stack = "".join(traceback.format_exception(exc))[-_MAX_STACK:]
    return [
        *kept,
        (H_TOPIC, (record.topic() or "").encode()),
        (H_PARTITION, str(record.partition()).encode()),
        (H_OFFSET, str(record.offset()).encode()),
        (H_CLASS, f"{type(exc).__module__}.{type(exc).__qualname__}".encode()),
        (H_MESSAGE, _capped(str(exc), _MAX_MESSAGE).encode("utf-8", "replace")),
        (H_STACK, stack.encode("utf-8", "replace")),
        (H_STAGE, stage.encode()),
        (H_WORKER, worker.encode()),
        (H_ATTEMPTS, str(attempts).encode()),
        (H_FIRST_FAILED, first_failed),
    ]


# What Kafka adds around a record's key, value and each header (varints, attributes): generous.
_RECORD_OVERHEAD = 128
_HEADER_OVERHEAD = 16


def record_size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """An upper bound of what a record takes against a topic's max.message.bytes."""
    return (_RECORD_OVERHEAD + len(key or b"") + len(value or b"")
            + sum(len(k.encode()) + len(v) + _HEADER_OVERHEAD for k, v in headers))


# The longest traceparent or tracestate a cut dead letter keeps (W3C's tracestate bound).
_MAX_TRACE_HEADER = 512


def _last_raw(headers: Headers, name: str) -> bytes | None:
    return next((v for k, v in reversed(headers) if k == name), None)


def fit(key: bytes | None, value: bytes | None, headers: Headers,
        limit: int) -> tuple[bytes | None, bytes | None, Headers]:
    """The dead letter ``(key, value, headers)`` within ``limit`` bytes, so that it can always
    be sent: the value is cut first, then the record's own headers go (but its trace context),
    then the key is cut; the error headers stay. What was cut is said in H_TRUNCATED, the size
    before in H_ORIGINAL_BYTES. A record within the limit comes back as it is."""
    original = record_size(key, value, headers)
    if original <= limit:
        return key, value, headers
    cut: list[str] = []
    own = [(k, v) for k, v in headers if not k.startswith(ERROR_PREFIXES)]
    errors = [(k, v) for k, v in headers if k.startswith(ERROR_PREFIXES)]
    note = [(H_TRUNCATED, b"value,headers,key"), (H_ORIGINAL_BYTES, str(original).encode())]
    room = limit - record_size(key, b"", [*own, *errors, *note])
    if room < 0 and own:
        cut.append("headers")
        # The trace context is small and bounded: it stays, so the failure stays in its trace.
        own = [(name, v) for name in TRACE_HEADERS
               if (v := _last_raw(own, name)) is not None and len(v) <= _MAX_TRACE_HEADER]
        room = limit - record_size(key, b"", [*own, *errors, *note])
    if value:
        cut.insert(0, "value")
        value = value[: max(room, 0)]
    if room < 0 and key:
        cut.append("key")
        key = key[: max(0, len(key) + room)]
    marks = [(H_TRUNCATED, ",".join(cut).encode()), (H_ORIGINAL_BYTES, str(original).encode())]
    return key, value, [*own, *errors, *marks]


# Kafka's timestamp type for a record without one (confluent_kafka.TIMESTAMP_NOT_AVAILABLE).
_NO_TIMESTAMP = 0


def _last(headers: Headers, name: str) -> str | None:
    found: str | None = None
    for key, value in headers:
        if key == name:
            found = value.decode("utf-8", "replace")
    return found


def _int(text: str | None, default: int | None = None) -> int | None:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _bytes(data: str | bytes | None) -> bytes | None:
    return data.encode() if isinstance(data, str) else data


@dataclass(frozen=True)
class DeadLetter:
    """One record of a dead-letter topic: where it sits, the original record, and its error."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int | None
    original_topic: str | None
    original_partition: int | None
    original_offset: int | None
    error_class: str
    error_message: str
    stage: str
    worker: str
    attempts: int
    replays: int
    first_failed_at: datetime | None
    truncated: str = ""

    @classmethod
    def of(cls, record: RecordLike) -> DeadLetter:
        """Read a consumed record; missing or garbled error headers become empty values."""
        headers = header_list(record.headers())
        ts_type, ts = record.timestamp()
        return cls(
            topic=record.topic() or "",
            partition=record.partition() or 0,
            offset=record.offset() or 0,
            key=_bytes(record.key()),
            value=_bytes(record.value()),
            headers=headers,
            timestamp_ms=ts if ts_type != _NO_TIMESTAMP and ts > 0 else None,
            original_topic=_last(headers, H_TOPIC) or None,
            original_partition=_int(_last(headers, H_PARTITION)),
            original_offset=_int(_last(headers, H_OFFSET)),
            error_class=_last(headers, H_CLASS) or "",
            error_message=_last(headers, H_MESSAGE) or "",
            stage=_last(headers, H_STAGE) or "",
            worker=_last(headers, H_WORKER) or "",
            attempts=_int(_last(headers, H_ATTEMPTS), 0) or 0,
            # A count below zero would let a record past max_replays: it counts as zero.
            replays=max(0, _int(_last(headers, H_REPLAYS), 0) or 0),
            first_failed_at=_time(_last(headers, H_FIRST_FAILED)),
            truncated=_last(headers, H_TRUNCATED) or "",
        )

    @property
    def failed_at(self) -> datetime | None:
        """When it first failed; for a record without that header, when it was published."""
        if self.first_failed_at is not None:
            return self.first_failed_at
        if self.timestamp_ms is not None:
            return datetime.fromtimestamp(self.timestamp_ms / 1000, UTC)
        return None

    @property
    def short_class(self) -> str:
        """The exception class without its module: ``PermanentError``."""
        return self.error_class.rsplit(".", 1)[-1] or "?"

    @property
    def key_text(self) -> str:
        """The key as text, for display and pattern matching."""
        return (self.key or b"").decode("utf-8", "replace")

    def age(self, now: datetime) -> timedelta | None:
        """Time since it first failed."""
        when = self.failed_at
        return now - when if when is not None else None

    def to_json(self, now: datetime) -> dict[str, Any]:
        """The JSON form that ``dlq inspect --json`` prints, one object per record."""
        age = self.age(now)
        return {
            "dlq_topic": self.topic,
            "dlq_partition": self.partition,
            "dlq_offset": self.offset,
            "key": self.key_text if self.key is not None else None,
            "error_class": self.error_class,
            "error_message": self.error_message,
            "original_topic": self.original_topic,
            "original_partition": self.original_partition,
            "original_offset": self.original_offset,
            "stage": self.stage,
            "worker": self.worker,
            "attempts": self.attempts,
            "replays": self.replays,
            "first_failed_at": self.failed_at.isoformat() if self.failed_at else None,
            "age_s": round(age.total_seconds(), 3) if age is not None else None,
            "timestamp_ms": self.timestamp_ms,
            "value_bytes": len(self.value or b""),
        }


def replay_headers(dead: DeadLetter) -> Headers:
    """The headers of the replayed record: the original ones (the publish time among them,
    taken from the dead letter's timestamp if it was written without one), first-failed-at,
    and the replay count one higher.

    Error headers of the last failure go (a new failure writes fresh ones); first-failed-at
    stays, so an operator sees how long a record has been failing across replays.
    """
    original = with_published_at(dead.headers, (1, dead.timestamp_ms or 0))
    kept = [(k, v) for k, v in original if not k.startswith(ERROR_PREFIXES) and k != H_REPLAYS]
    first = next((v for k, v in reversed(dead.headers) if k == H_FIRST_FAILED), None)
    if first is not None:
        kept.append((H_FIRST_FAILED, first))
    kept.append((H_REPLAYS, str(dead.replays + 1).encode()))
    return kept
