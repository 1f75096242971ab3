"""Unit tests of vecpipe.stages and vecpipe.db.schema: what every stage shares, written once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import pytest
import structlog

from tests.fakes import FakeProducer, FakeRecord
from vecpipe.config import DeadLetterConfig, KafkaConfig, RetryConfig, VectorConfig
from vecpipe.db import plan, schema
from vecpipe.db.store import Row
from vecpipe.deadletter.guard import DeadLetterGuard
from vecpipe.deadletter.headers import H_MESSAGE
from vecpipe.deadletter.sender import DeadLetters
from vecpipe.errors import DeadLetterRateExceeded, DeliveryFailed, InvalidMessage
from vecpipe.health import Metrics
from vecpipe.messages import CHUNK, Chunk, content_hash, encode_chunk, header_value, schema_headers
from vecpipe.stages.bisect import isolate
from vecpipe.stages.decode import decode_batch
from vecpipe.stages.settle import Failure, Settle

# -- isolate ------------------------------------------------------------------------------------


class Poison(Exception):
    """What the fake run raises when its part holds a poison item."""


def _runner(poison: set[int], calls: list[list[int]]) -> Any:
    def run(part: Sequence[int]) -> int:
        calls.append(list(part))
        if poison & set(part):
            raise Poison(f"{sorted(poison & set(part))}")
        return len(part)
    return run


def test_isolate_finds_each_poison_item_and_keeps_the_rest() -> None:
    """Two bad items in eight: both end up alone, every good one succeeds, in order."""
    calls: list[list[int]] = []
    bad: list[int] = []
    splits: list[int] = []
    results = isolate(list(range(8)), _runner({2, 5}, calls),
                      poison=lambda e: isinstance(e, Poison),
                      on_poison=lambda item, exc: bad.append(item),
                      on_split=lambda part, exc: splits.append(len(part)))
    assert bad == [2, 5]
    assert sum(results) == 6
    assert calls[0] == list(range(8))
    assert splits[0] == 8
    done = [i for c in calls for i in c if not ({2, 5} & set(c))]
    assert sorted(done) == [0, 1, 3, 4, 6, 7]


def test_isolate_lets_other_errors_through_at_once() -> None:
    """An error that is not poison (an outage) fails the whole batch without halving."""
    calls: list[list[int]] = []

    def run(part: Sequence[int]) -> int:
        calls.append(list(part))
        raise ConnectionError("database gone")

    with pytest.raises(ConnectionError):
        isolate([1, 2, 3], run, poison=lambda e: isinstance(e, Poison),
                on_poison=lambda item, exc: None)
    assert calls == [[1, 2, 3]]


def test_isolate_of_nothing_runs_nothing() -> None:
    """An empty batch makes no call."""
    calls: list[list[int]] = []
    assert isolate([], _runner(set(), calls), poison=lambda e: True,
                   on_poison=lambda item, exc: None) == []
    assert calls == []


# -- settle -------------------------------------------------------------------------------------


class FlakyProducer(FakeProducer):
    """Fails its first flush the way the broker does when it is briefly away."""

    def flush(self, timeout: float = 60.0) -> None:
        super().flush(timeout)
        if self.flushes == 1:
            raise DeliveryFailed("not acknowledged")


def _settle(producer: FakeProducer, metrics: Metrics, window: int = 200) -> Settle:
    dead = DeadLetters(producer, KafkaConfig(), "embed", "w-1")  # type: ignore[arg-type]
    guard = DeadLetterGuard(DeadLetterConfig(window=window, max_consecutive=3))
    return Settle(RetryConfig(attempts=3, initial_wait_s=0, max_wait_s=0), producer, dead, guard,
                  metrics, structlog.get_logger())


def test_settle_dead_letters_flushes_with_counted_retries_and_counts_outcomes() -> None:
    """Failures go to the dead-letter topic with their reason; a transient flush failure is
    retried and counted; ok, dead_letter and dropped are counted per stage."""
    producer, metrics = FlakyProducer(), Metrics("embed")
    records: list[Any] = [FakeRecord(offset_=i) for i in range(4)]
    done = records[:3]  # the fourth was dropped with its revoked partition
    settle = _settle(producer, metrics)
    assert settle(records, done, [Failure(records[1], InvalidMessage("bad record"))]) == done
    [dead] = producer.to("vecpipe.chunks.dlq")
    assert header_value(dead.headers, H_MESSAGE) == "bad record"
    assert producer.flushes == 2
    sample = metrics.registry.get_sample_value
    assert sample("vecpipe_retries_total", {"stage": "embed", "kind": "produce"}) == 1
    assert sample("vecpipe_messages_total", {"stage": "embed", "outcome": "ok"}) == 2
    assert sample("vecpipe_messages_total", {"stage": "embed", "outcome": "dead_letter"}) == 1
    assert sample("vecpipe_messages_total", {"stage": "embed", "outcome": "dropped"}) == 1
    assert sample("vecpipe_dead_letters_total", {"stage": "embed"}) == 1


def test_settle_without_output_or_failures_does_not_flush() -> None:
    """A stage that produced nothing (the writer, all rows merged) waits for no broker."""
    producer = FakeProducer()
    records: list[Any] = [FakeRecord(offset_=i) for i in range(2)]
    assert _settle(producer, Metrics("write"))(records, records, [], produced=False) == records
    assert producer.flushes == 0


def test_settle_feeds_the_dead_letter_guard_before_it_sends_anything() -> None:
    """Three failures in a row trip max_consecutive=3: the worker must stop, and it sends none
    of the batch's dead letters (a restart would send them a second time)."""
    records: list[Any] = [FakeRecord(offset_=i) for i in range(3)]
    producer = FakeProducer()
    with pytest.raises(DeadLetterRateExceeded):
        _settle(producer, Metrics("embed"))(
            records, records, [Failure(r, InvalidMessage("x")) for r in records])
    # Nothing of the batch went out: the restarted worker meets the same records, and stops
    # again, without a second copy of any dead letter.
    assert producer.sent == []


# -- decode ---------------------------------------------------------------------------------------


def test_decode_batch_turns_bad_records_into_their_own_failures() -> None:
    """A record that does not decode fails alone; the batch's order is kept for the rest."""
    good: Any = FakeRecord(offset_=1, value_=b"{}")
    bad: Any = FakeRecord(offset_=2)
    out = decode_batch([good, bad], lambda msg, obj: obj)
    # b"{}" is valid JSON but not a chunk: both fail, each with its own reason.
    assert [f.msg for f in out.failures] == [good, bad]
    assert all(isinstance(f.error, InvalidMessage) for f in out.failures)
    assert out.inputs == []


# -- the column list ------------------------------------------------------------------------------


def test_row_fields_follow_the_staging_columns() -> None:
    """The writer's COPY rows are built from Row in staging-column order."""
    names = [f.name for f in fields(Row)]
    assert names[: len(schema.STAGING)] == list(schema.STAGING)


def test_plan_lays_out_the_columns_of_the_table() -> None:
    """The capacity plan sizes exactly the chunks table's columns, in order."""
    work = plan.Workload(rows=1, dimension=4)
    assert tuple(name for name, *_ in plan._columns(work)) == schema.TABLE_COLUMNS


def test_copy_types_follow_the_vector_type() -> None:
    """The embedding column is COPYed as the configured vector type."""
    types = schema.copy_types(VectorConfig(column_type="halfvec"))
    assert types[schema.STAGING.index("embedding")] == "halfvec"
    assert len(types) == len(schema.STAGING)


def test_anything_raised_while_converting_a_record_is_that_records_fault() -> None:
    """A conversion that raises something unforeseen (a KeyError, an OverflowError) fails that
    record alone, as an InvalidMessage naming what was raised; the next record goes on."""

    def chunk_record(offset: int) -> Any:
        c = Chunk("acme", f"d{offset}", 1, 0, 1, "text", content_hash("text"), 0, 4)
        return FakeRecord(offset_=offset, value_=encode_chunk(c), headers_=schema_headers(CHUNK))

    def convert(msg: Any, obj: Any) -> Any:
        if msg.offset() == 1:
            raise OverflowError("int too big to convert")
        return obj

    out = decode_batch([chunk_record(0), chunk_record(1), chunk_record(2)], convert)
    assert [m.offset() for m, _ in out.inputs] == [0, 2]
    [failure] = out.failures
    assert isinstance(failure.error, InvalidMessage)
    assert "OverflowError: int too big to convert" in str(failure.error)
    assert isinstance(failure.error.__cause__, OverflowError)
