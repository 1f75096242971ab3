"""Unit tests of vecpipe.deadletter with a fake producer: headers kept and added, and the guard."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tests.fakes import FakeProducer, FakeRecord
from vecpipe.config import DeadLetterConfig, KafkaConfig
from vecpipe.deadletter.guard import DeadLetterGuard
from vecpipe.deadletter.headers import (
    ERROR_PREFIXES,
    H_ATTEMPTS,
    H_CLASS,
    H_FIRST_FAILED,
    H_MESSAGE,
    H_OFFSET,
    H_ORIGINAL_BYTES,
    H_PARTITION,
    H_REPLAYS,
    H_STACK,
    H_STAGE,
    H_TOPIC,
    H_TRUNCATED,
    H_WORKER,
    DeadLetter,
    fit,
    record_size,
)
from vecpipe.deadletter.sender import FALLBACK_BYTES, MAX_DEAD_LETTER_BYTES, DeadLetters
from vecpipe.errors import DeadLetterRateExceeded, InvalidMessage
from vecpipe.messages import PUBLISHED_HEADER, load_schema


def _dead_letters(producer: FakeProducer, stage: str = "embed") -> DeadLetters:
    fake: Any = producer
    return DeadLetters(fake, KafkaConfig(), stage=stage, worker_id="host-123")


def _raised(exc: BaseException) -> BaseException:
    """``exc`` with a traceback, as a worker would have caught it."""
    try:
        raise exc
    except BaseException as caught:
        return caught


def _added(headers: list[tuple[str, bytes]]) -> dict[str, str]:
    return {k: v.decode("utf-8") for k, v in headers
            if k.startswith(ERROR_PREFIXES) or k == H_REPLAYS}


def test_send_keeps_the_record_and_adds_error_headers() -> None:
    """The dead letter keeps key, value, headers and timestamp, and adds every error header."""
    producer = FakeProducer()
    record = FakeRecord()
    exc = _raised(InvalidMessage("the value is not valid JSON: Expecting ',' at 15."))
    topic = _dead_letters(producer).send(record, exc, attempts=3)
    assert topic == "vecpipe.chunks.dlq"
    [sent] = producer.sent
    assert sent.topic == "vecpipe.chunks.dlq"
    assert sent.key == record.key_
    assert sent.value == record.value_
    assert sent.timestamp == 1_714_566_615_123
    assert sent.headers[: len(record.headers_)] == record.headers_
    added = _added(sent.headers)
    assert added[H_TOPIC] == "vecpipe.chunks"
    assert added[H_PARTITION] == "2"
    assert added[H_OFFSET] == "41"
    assert added[H_CLASS] == "vecpipe.errors.InvalidMessage"
    assert added[H_MESSAGE] == "the value is not valid JSON: Expecting ',' at 15."
    assert "InvalidMessage" in added[H_STACK]
    assert "Traceback" in added[H_STACK]
    assert added[H_STAGE] == "embed"
    assert added[H_WORKER] == "host-123"
    assert added[H_ATTEMPTS] == "3"
    assert datetime.fromisoformat(added[H_FIRST_FAILED]).utcoffset() is not None


def test_added_headers_follow_the_schema() -> None:
    """The added headers validate against schemas/dead-letter-headers.v1.json."""
    producer = FakeProducer()
    _dead_letters(producer, stage="write").send(FakeRecord(), _raised(ValueError("bad")))
    added = _added(producer.sent[0].headers)
    schema = load_schema("dead-letter-headers.v1.json")
    Draft202012Validator(schema).validate(added)
    assert set(added) <= set(schema["properties"])
    assert set(schema["required"]) <= set(added)


def test_str_key_and_value_are_sent_as_bytes() -> None:
    """A record whose key and value came as text is sent as UTF-8 bytes."""
    producer = FakeProducer()
    record: Any = FakeRecord(key_=None, value_=None)
    record.key = lambda: "acme/doc-1"
    record.value = lambda: "plain text"
    _dead_letters(producer).send(record, ValueError("x"))
    assert (producer.sent[0].key, producer.sent[0].value) == (b"acme/doc-1", b"plain text")


def test_record_without_timestamp() -> None:
    """A record without a timestamp lets the producer choose one."""
    producer = FakeProducer()
    _dead_letters(producer).send(FakeRecord(timestamp_=(0, 0)), ValueError("x"))
    assert producer.sent[0].timestamp is None


def test_second_failure_replaces_error_headers() -> None:
    """A replayed record that fails again carries one set of error headers, the newest, but
    keeps its first-failed-at and its replay count."""
    first = FakeProducer()
    _dead_letters(first, stage="embed").send(FakeRecord(), _raised(ValueError("first")))
    first_headers = first.sent[0].headers
    first_failed = dict(first_headers)[H_FIRST_FAILED]

    replayed = FakeRecord(topic_="vecpipe.chunks", partition_=0, offset_=7,
                          headers_=[*first_headers, (H_REPLAYS, b"1")])
    second = FakeProducer()
    _dead_letters(second, stage="write").send(replayed, _raised(KeyError("second")),
                                              attempts=2)
    headers = second.sent[0].headers
    names = [k for k, _ in headers]
    for name in (H_TOPIC, H_PARTITION, H_OFFSET, H_CLASS, H_MESSAGE, H_STACK, H_STAGE,
                 H_WORKER, H_ATTEMPTS, H_FIRST_FAILED, H_REPLAYS):
        assert names.count(name) == 1, name
    added = _added(headers)
    assert added[H_MESSAGE] == "'second'"
    assert added[H_CLASS] == "builtins.KeyError"
    assert added[H_OFFSET] == "7"
    assert added[H_STAGE] == "write"
    assert added[H_ATTEMPTS] == "2"
    assert "first" not in added[H_STACK]
    assert added[H_FIRST_FAILED].encode() == first_failed
    assert added[H_REPLAYS] == "1"
    # Headers that were not vecpipe's error headers survive untouched, in order, and the
    # publish time is made explicit (dead-letter topics append with their own time).
    assert [(k, v) for k, v in headers if not k.startswith(ERROR_PREFIXES)
            and k not in (H_REPLAYS, PUBLISHED_HEADER)] == FakeRecord().headers_
    assert dict(headers)[PUBLISHED_HEADER] == b"2024-05-01T12:30:15.123000+00:00"
    Draft202012Validator(load_schema("dead-letter-headers.v1.json")).validate(added)


def test_long_stack_and_message_are_capped() -> None:
    """A huge traceback is cut to its last 8000 characters, a huge message to 2000 and a note
    of its length (an error quoting a 5 MB value back must not make the dead letter huge)."""
    producer = FakeProducer()
    _dead_letters(producer).send(FakeRecord(), _raised(ValueError("x" * 20_000)))
    stack = dict(producer.sent[0].headers)[H_STACK]
    assert len(stack) <= 8000
    assert dict(producer.sent[0].headers)[H_MESSAGE] == b"x" * 2000 + b"... (20000 characters)"


def test_a_dead_letter_larger_than_its_topic_is_cut_to_fit_and_says_so() -> None:
    """A record bigger than the dead-letter topics take (a 12 MB chunk that came compressed) is
    sent with its value cut to fit, the error headers intact, and the cut and the original size
    in headers of its own: the send can never be refused for the record."""
    producer = FakeProducer()
    big = FakeRecord(value_=b"x" * 12_000_000)
    _dead_letters(producer).send(big, _raised(InvalidMessage("too large")))
    [sent] = producer.sent
    size = record_size(sent.key, sent.value, sent.headers)
    assert size <= MAX_DEAD_LETTER_BYTES
    headers = dict(sent.headers)
    assert headers[H_TRUNCATED] == b"value"
    assert int(headers[H_ORIGINAL_BYTES]) > 12_000_000
    assert headers[H_MESSAGE] == b"too large"
    assert sent.value is not None and sent.value == b"x" * len(sent.value)
    assert DeadLetter.of(producer.records()[0]).truncated == "value"


def test_fit_drops_the_records_own_headers_then_cuts_the_key_when_it_must() -> None:
    """Huge headers of the record go after the value; an absurd key is cut last."""
    errors = [(H_MESSAGE, b"why")]
    own = [("big", b"h" * 5000)]
    key, value, headers = fit(b"k" * 100, b"v" * 100, [*own, *errors], 2000)
    assert record_size(key, value, headers) <= 2000
    assert dict(headers)[H_TRUNCATED] == b"value,headers" and "big" not in dict(headers)
    key, value, headers = fit(b"k" * 5000, b"", errors, 1000)
    assert record_size(key, value, headers) <= 1000
    assert dict(headers)[H_TRUNCATED] == b"key"
    assert fit(b"k", b"v", errors, 10_000) == (b"k", b"v", errors)


def test_the_fallback_fits_the_brokers_default_limit() -> None:
    """The smaller form, sent if a dead-letter topic made elsewhere refuses the first one, fits
    under the broker's default max.message.bytes of 1 MiB."""
    whole = (b"key", b"x" * 3_000_000, [(H_MESSAGE, b"why")])
    key, value, headers = fit(*whole, FALLBACK_BYTES)
    assert record_size(key, value, headers) <= FALLBACK_BYTES < 1_048_576


# -- the guard -----------------------------------------------------------------------------------


def test_guard_trips_on_consecutive_failures() -> None:
    """max_consecutive failures in a row stop the worker."""
    guard = DeadLetterGuard(DeadLetterConfig(window=1000, max_ratio=1.0, max_consecutive=3))
    guard.record(True)
    guard.record(True)
    guard.record(False)  # a success resets the run
    guard.record(True)
    guard.record(True)
    with pytest.raises(DeadLetterRateExceeded, match="3 records in a row"):
        guard.record(True)


def test_guard_trips_on_ratio_over_a_full_window() -> None:
    """More than max_ratio failures over a full window stop the worker."""
    guard = DeadLetterGuard(DeadLetterConfig(window=10, max_ratio=0.5, max_consecutive=100))
    outcomes = [True, False] * 4 + [True]  # 5 of 9: the window is not full yet
    for failed in outcomes:
        guard.record(failed)
    with pytest.raises(DeadLetterRateExceeded, match="60% of the last 10 records"):
        guard.record(True)


def test_guard_does_not_trip_below_the_caps() -> None:
    """Exactly max_ratio failures, and runs shorter than max_consecutive, are tolerated."""
    guard = DeadLetterGuard(DeadLetterConfig(window=10, max_ratio=0.5, max_consecutive=3))
    for _ in range(20):
        guard.record(True)
        guard.record(False)
    # Every full window holds exactly half failures, and no run reaches three.
    guard.record(True)


def test_guard_does_not_judge_a_partial_window() -> None:
    """Failures before the window fills are judged only by max_consecutive."""
    guard = DeadLetterGuard(DeadLetterConfig(window=10, max_ratio=0.1, max_consecutive=5))
    for _ in range(4):
        guard.record(True)
    guard.record(False)
    for _ in range(4):
        guard.record(True)
