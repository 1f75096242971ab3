"""Kafka fakes shared by the unit tests: a consumed record and a producer, without a broker.

``FakeRecord`` has the methods of ``confluent_kafka.Message`` that vecpipe reads, and
``FakeProducer`` keeps every ``produce()`` call as a ``Sent`` and counts ``flush()`` calls,
so that stages and dead letters can be driven and inspected in process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vecpipe.messages import CHUNK, schema_headers


def _default_headers() -> list[tuple[str, bytes]]:
    """The headers of a chunk record as a producer sends it: its schema and a trace context."""
    return [*schema_headers(CHUNK), ("traceparent", b"00-abc-def-01")]


@dataclass
class FakeRecord:
    """A consumed record with the methods of confluent_kafka.Message.

    The defaults describe a record of the chunks topic whose value is not valid JSON; tests
    pass the fields they care about, by position or by name.
    """

    topic_: str = "vecpipe.chunks"
    partition_: int = 2
    offset_: int = 41
    key_: bytes | None = b"acme/doc-1"
    value_: bytes | None = b'{"not": "valid"'
    headers_: list[tuple[str, bytes]] = field(default_factory=_default_headers)
    timestamp_: tuple[int, int] = (1, 1_714_566_615_123)

    def topic(self) -> str:
        """The topic the record was read from."""
        return self.topic_

    def partition(self) -> int:
        """The partition the record was read from."""
        return self.partition_

    def offset(self) -> int:
        """The record's offset in its partition."""
        return self.offset_

    def key(self) -> bytes | None:
        """The record's key."""
        return self.key_

    def value(self) -> bytes | None:
        """The record's value."""
        return self.value_

    def headers(self) -> list[tuple[str, bytes]]:
        """The record's headers, in order."""
        return self.headers_

    def timestamp(self) -> tuple[int, int]:
        """The record's (timestamp type, milliseconds since the epoch)."""
        return self.timestamp_

    def error(self) -> None:
        """No error: a fake record is always a real message, never a consumer event."""
        return None


@dataclass
class Sent:
    """One message the fake producer was asked to send."""

    topic: str
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp: int | None


@dataclass
class FakeProducer:
    """Records produce calls and flushes, in order, like DurableProducer without a broker."""

    sent: list[Sent] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    flushes: int = 0

    def produce(self, topic: str, value: bytes | None, key: bytes | None = None,
                headers: Any = None, timestamp: int | None = None, smaller: Any = None) -> None:
        """Keep the message as a ``Sent`` and note the call in ``events``."""
        self.sent.append(Sent(topic, value, key, list(headers or []), timestamp))
        self.events.append(f"produce {topic}")

    def flush(self, timeout: float = 60.0) -> None:
        """Count the flush and note it in ``events``."""
        self.flushes += 1
        self.events.append("flush")

    def to(self, topic: str) -> list[Sent]:
        """The messages sent to ``topic``, in order."""
        return [s for s in self.sent if s.topic == topic]

    def records(self) -> list[FakeRecord]:
        """Every message sent, read back as a consumer would see it: partition 0, offsets
        counting from 0 in the order sent, and a create-time timestamp (0 when none was given)."""
        return [FakeRecord(s.topic, 0, offset, s.key, s.value, list(s.headers),
                           (1, s.timestamp or 0))
                for offset, s in enumerate(self.sent)]
