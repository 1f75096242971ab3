"""DurableProducer: what a failed flush queues again, and what it refuses for good."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, TIMESTAMP_NOT_AVAILABLE, KafkaError

from tests.fakes import FakeRecord
from vecpipe.config import KafkaConfig
from vecpipe.errors import DeliveryFailed, DeliveryRefused
from vecpipe.kafka.producer import DurableProducer


@dataclass
class FakeLibrdkafka:
    """Delivers on flush; the values in ``fail`` get ``fail[value]`` once instead."""

    fail: dict[bytes, KafkaError]
    sent: list[FakeRecord] = field(default_factory=list)
    queue: list[tuple[FakeRecord, Callable[[KafkaError | None, Any], None]]] = field(
        default_factory=list)

    def produce(self, topic: str, value: bytes, *, key: bytes, headers: Any,
                on_delivery: Any, timestamp: int = 0) -> None:
        msg = FakeRecord(topic, 0, 0, key, value, headers, (TIMESTAMP_CREATE_TIME, timestamp))
        self.sent.append(msg)
        self.queue.append((msg, on_delivery))

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        queue, self.queue = self.queue, []
        for msg, callback in queue:
            err = self.fail.pop(msg.value() or b"", None)
            if err is not None:
                # As librdkafka reports a failed delivery: no headers, no timestamp.
                msg = replace(msg, headers_=None, timestamp_=(TIMESTAMP_NOT_AVAILABLE, -1))  # type: ignore[arg-type]
            callback(err, msg)
        return 0

    def __len__(self) -> int:
        return len(self.queue)


def producer(fail: dict[bytes, KafkaError]) -> tuple[DurableProducer, FakeLibrdkafka]:
    p = DurableProducer(KafkaConfig(bootstrap="127.0.0.1:1"))
    fake = FakeLibrdkafka(fail)
    p._producer = fake  # type: ignore[assignment]
    return p, fake


def test_failed_flush_requeues_only_the_unacknowledged_messages() -> None:
    """A retry after a timed-out delivery sends that message again, not the whole batch."""
    p, fake = producer({b"b": KafkaError(KafkaError._MSG_TIMED_OUT)})
    for v in (b"a", b"b", b"c"):
        p.produce("t", v, key=b"k-" + v, headers=[("h", b"1")], timestamp=1234)
    with pytest.raises(DeliveryFailed, match="1 message"):
        p.flush()
    p.flush()
    assert [m.value() for m in fake.sent] == [b"a", b"b", b"c", b"b"]
    assert p.delivered == 3
    assert fake.sent[3] == FakeRecord("t", 0, 0, b"k-b", b"b", [("h", b"1")],
                                      (TIMESTAMP_CREATE_TIME, 1234))


def test_message_refused_for_good_is_not_retried_and_the_others_are() -> None:
    """A message the broker will never take raises DeliveryRefused naming the topic; one that
    timed out in the same flush is still queued again."""
    p, fake = producer({b"big": KafkaError(KafkaError.MSG_SIZE_TOO_LARGE),
                        b"late": KafkaError(KafkaError._MSG_TIMED_OUT)})
    p.produce("orders.dlq", b"big", key=b"k")
    p.produce("orders.dlq", b"late", key=b"k")
    with pytest.raises(DeliveryRefused, match=r"'orders.dlq'.*max.message.bytes"):
        p.flush()
    p.flush()
    assert [m.value() for m in fake.sent] == [b"big", b"late", b"late"]


def test_a_message_without_timestamp_keeps_its_first_one_when_sent_again() -> None:
    """CreateTime is the time of produce(), also for the copy sent after a failure (the writer
    orders deletes by it)."""
    p, fake = producer({b"a": KafkaError(KafkaError._MSG_TIMED_OUT)})
    calls: list[KafkaError | None] = []
    p.produce("t", b"a", key=b"k", on_delivery=lambda err, msg: calls.append(err))
    with pytest.raises(DeliveryFailed):
        p.flush()
    p.flush()
    first, again = fake.sent
    assert first.timestamp()[1] > 0 and again.timestamp() == first.timestamp()
    assert [c is None for c in calls] == [False, True]  # the caller hears of both outcomes


def test_a_refused_message_with_a_smaller_form_is_sent_smaller_instead() -> None:
    """A dead letter the broker refuses as too large goes again in its smaller form: the flush
    says it must be flushed again (transient), never that it was refused for good."""
    p, fake = producer({b"huge": KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)})
    p.produce("orders.dlq", b"huge", key=b"k", headers=[("h", b"1")],
              smaller=lambda: (b"k", b"hu", [("h", b"1"), ("cut", b"value")]))
    with pytest.raises(DeliveryFailed):
        p.flush()
    p.flush()
    assert [m.value() for m in fake.sent] == [b"huge", b"hu"]
    assert fake.sent[1].headers() == [("h", b"1"), ("cut", b"value")]


def test_the_client_refusing_a_message_as_too_large_sends_the_smaller_form() -> None:
    """librdkafka itself refuses, in produce(), a message over its message.max.bytes: the
    smaller form is queued instead, and without one the refusal is a sentence."""
    real = DurableProducer(KafkaConfig(bootstrap="127.0.0.1:1"),
                           **{"message.max.bytes": 10_000, "log_level": 0})
    real.produce("t.dlq", b"x" * 50_000, key=b"k",
                 smaller=lambda: (b"k", b"x" * 100, [("cut", b"value")]))
    assert real.pending() == 1
    with pytest.raises(DeliveryRefused, match="50000 bytes"):
        real.produce("t.dlq", b"x" * 50_000, key=b"k")
