"""Unit tests of the consumer loop (vecpipe.kafka.consumer) over a fake consumer.

The loop carries the pipeline's first invariant: an offset is stored only for a record whose
results the processor reported durable. These tests drive the real ``BatchConsumer`` with a
fake that plays the broker's part: assignments, revocations and lost partitions arrive inside
``consume`` as they do in librdkafka, and every stored offset, commit, pause and resume is kept.
Coordination is by events, never by wall-clock time.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from confluent_kafka import TopicPartition

from tests.fakes import FakeRecord
from vecpipe.config import KafkaConfig
from vecpipe.errors import DeadLetterRateExceeded
from vecpipe.health import Health, Metrics
from vecpipe.kafka.consumer import (
    EXIT_DEAD_LETTER_RATE,
    EXIT_FAILED,
    Batch,
    BatchConsumer,
    BatchLimits,
    StopFlag,
)

TOPIC = "t.chunks"


def record(partition: int, offset: int) -> FakeRecord:
    """A record of TOPIC."""
    return FakeRecord(TOPIC, partition, offset, b"k", b"v")


@dataclass
class FakeConsumer:
    """Plays the broker: hands out queued records of unpaused partitions, runs ``script``."""

    records: list[FakeRecord] = field(default_factory=list)
    script: Callable[[FakeConsumer], None] | None = None
    callbacks: dict[str, Any] = field(default_factory=dict)
    stored: dict[tuple[str, int], int] = field(default_factory=dict)
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    paused: set[int] = field(default_factory=set)
    pause_calls: int = 0
    resume_calls: int = 0
    assigned: set[int] = field(default_factory=set)
    closed: bool = False
    calls: int = 0
    idle: threading.Event = field(default_factory=threading.Event)

    def subscribe(self, topics: list[str], on_assign: Any = None, on_revoke: Any = None,
                  on_lost: Any = None) -> None:
        self.callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}

    def assign(self, *partitions: int) -> None:
        """A rebalance hands these partitions to the consumer."""
        self.assigned.update(partitions)
        self.callbacks["assign"](self, [TopicPartition(TOPIC, p) for p in partitions])

    def revoke(self, *partitions: int) -> None:
        """A cooperative rebalance takes these partitions away."""
        self.callbacks["revoke"](self, [TopicPartition(TOPIC, p) for p in partitions])
        self.assigned.difference_update(partitions)

    def lose(self, *partitions: int) -> None:
        """The group moved on without this consumer."""
        self.callbacks["lost"](self, [TopicPartition(TOPIC, p) for p in partitions])
        self.assigned.difference_update(partitions)

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]:
        self.calls += 1
        if self.script is not None:
            self.script(self)
        ready = [r for r in self.records
                 if r.partition() in self.assigned and r.partition() not in self.paused]
        out = ready[:num_messages]
        for r in out:
            self.records.remove(r)
        if not out:
            self.idle.set()
            # Like librdkafka: nothing to hand out, so the call waits (briefly) for more.
            threading.Event().wait(min(max(timeout, 0), 0.01))
        return out

    def store_offsets(self, message: Any = None,
                      offsets: list[TopicPartition] | None = None) -> None:
        for tp in offsets or []:
            self.stored[(tp.topic, tp.partition)] = tp.offset

    def commit(self, *, asynchronous: bool = True) -> list[TopicPartition]:
        self.committed.update(self.stored)
        return []

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.pause_calls += 1
        self.paused.update(tp.partition for tp in partitions)

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.resume_calls += 1
        self.paused.difference_update(tp.partition for tp in partitions)

    def close(self) -> None:
        self.closed = True


class Processor:
    """Returns what ``durable`` picks of each batch (all of it by default), or raises."""

    def __init__(self, durable: Callable[[Batch], list[Any]] | None = None,
                 error: BaseException | None = None) -> None:
        self.durable = durable or (lambda batch: [m for m in batch.messages if batch.owned(m)])
        self.error = error
        self.batches: list[list[tuple[Any, Any]]] = []

    def weight(self, msg: Any) -> int:
        return 1

    def process(self, batch: Batch) -> list[Any]:
        self.batches.append([(m.partition(), m.offset()) for m in batch.messages])
        if self.error is not None:
            raise self.error
        return self.durable(batch)


def loop(fake: FakeConsumer, processor: Any, *, max_count: int = 10, idle_s: float | None = 0.2,
         grace_s: float = 5.0, stop: StopFlag | None = None) -> BatchConsumer:
    """A BatchConsumer over ``fake``."""
    return BatchConsumer(
        KafkaConfig(), TOPIC, "g", processor, BatchLimits(max_count, max_count, 0.0),
        log=structlog.get_logger(), metrics=Metrics("test"), health=Health(stall_after_s=60),
        stop=stop or StopFlag(), until_idle_s=idle_s, shutdown_grace_s=grace_s,
        make_consumer=lambda conf: fake)


def assign_first(*partitions: int) -> Callable[[FakeConsumer], None]:
    """A script that assigns ``partitions`` on the first consume."""
    def script(fake: FakeConsumer) -> None:
        if fake.calls == 1:
            fake.assign(*partitions)
    return script


def test_offsets_are_stored_only_for_records_the_processor_made_durable() -> None:
    """Only returned records count: partition 1's records were not durable, so nothing of it is
    stored, and partition 0 is stored one past its last durable record."""
    fake = FakeConsumer([record(0, 0), record(0, 1), record(1, 0), record(0, 2)],
                        assign_first(0, 1))

    def durable(batch: Batch) -> list[Any]:
        return [m for m in batch.messages if m.partition() == 0 and (m.offset() or 0) < 2]

    assert loop(fake, Processor(durable)).run() == 0
    assert fake.committed == {(TOPIC, 0): 2}
    assert fake.closed


def test_a_failing_batch_stores_nothing_and_stops_the_worker() -> None:
    """A processor that raises (an outage whose retries were spent) leaves every offset
    unstored: the next owner processes the batch again."""
    fake = FakeConsumer([record(0, 0), record(0, 1)], assign_first(0))
    assert loop(fake, Processor(error=RuntimeError("database gone"))).run() == EXIT_FAILED
    assert fake.stored == {} and fake.committed == {}
    assert fake.closed


def test_dead_letter_cap_exits_three_without_committing_the_batch() -> None:
    """The dead-letter rate cap stops the worker with exit status 3 and commits nothing."""
    fake = FakeConsumer([record(0, 0)], assign_first(0))
    processor = Processor(error=DeadLetterRateExceeded("most records fail"))
    assert loop(fake, processor).run() == EXIT_DEAD_LETTER_RATE
    assert fake.committed == {}


def test_revoked_partition_work_done_is_committed_and_the_rest_dropped() -> None:
    """Revoked while a batch runs: the batch sees the partition revoked, what it finished of it
    is committed at once, and what it drops is left to the partition's new owner."""
    started, revoked = threading.Event(), threading.Event()

    def durable(batch: Batch) -> list[Any]:
        started.set()
        assert revoked.wait(10)
        # The processor drops what it had not produced for partition 1 (its work is not done).
        return [m for m in batch.messages if batch.owned(m)]

    def script(fake: FakeConsumer) -> None:
        if fake.calls == 1:
            fake.assign(0, 1)
        elif started.is_set() and not revoked.is_set():
            # The revoke callback waits for the batch, so release it from another thread.
            threading.Timer(0.05, revoked.set).start()
            fake.revoke(1)

    fake = FakeConsumer([record(0, 0), record(1, 0), record(1, 1)], script)
    assert loop(fake, Processor(durable)).run() == 0
    assert fake.committed == {(TOPIC, 0): 1}


def test_lost_partitions_are_forgotten_without_storing_offsets() -> None:
    """Partitions lost to a rebalance the consumer missed: their in-flight results are not
    stored (the group would reject them) and their buffered records are dropped."""
    started, lost = threading.Event(), threading.Event()
    still_owned: list[Any] = []

    def durable(batch: Batch) -> list[Any]:
        started.set()
        assert lost.wait(10)
        still_owned.extend(m for m in batch.messages if batch.owned(m))
        return list(batch.messages)

    def script(fake: FakeConsumer) -> None:
        if fake.calls == 1:
            fake.assign(0)
        elif started.is_set() and not lost.is_set():
            fake.lose(0)
            lost.set()

    fake = FakeConsumer([record(0, 0), record(0, 1)], script)
    assert loop(fake, Processor(durable), max_count=1).run() == 0
    assert still_owned == []
    assert fake.stored == {}


def test_partitions_pause_while_the_next_batch_is_full_and_resume_after() -> None:
    """Backpressure is a signal: with one batch under way and the next one full, the loop
    pauses its partitions (it keeps polling), and resumes them once the batch is done."""
    release = threading.Event()
    processor = Processor(lambda batch: (release.wait(10), list(batch.messages))[1])

    def script(fake: FakeConsumer) -> None:
        if fake.calls == 1:
            fake.assign(0)
        elif fake.paused and not release.is_set():
            release.set()

    fake = FakeConsumer([record(0, i) for i in range(6)], script)
    assert loop(fake, processor, max_count=2).run() == 0
    assert fake.pause_calls >= 1 and fake.resume_calls >= 1
    assert not fake.paused
    assert fake.committed == {(TOPIC, 0): 6}
    assert sorted(o for b in processor.batches for _, o in b) == list(range(6))


def test_a_batch_that_outlasts_the_grace_period_is_abandoned_uncommitted() -> None:
    """Asked to stop, the loop waits for the batch under way up to the grace period; a batch
    still running then is abandoned without storing its offsets, and the worker exits 0."""
    stop, started, finish = StopFlag(), threading.Event(), threading.Event()

    def durable(batch: Batch) -> list[Any]:
        started.set()
        stop.set()
        finish.wait(10)
        return list(batch.messages)

    fake = FakeConsumer([record(0, 0)], assign_first(0))
    try:
        assert loop(fake, Processor(durable), idle_s=None, grace_s=0.2, stop=stop).run() == 0
    finally:
        finish.set()
    assert started.is_set()
    assert fake.stored == {} and fake.committed == {}
    assert fake.closed


def test_stop_drains_the_batch_under_way_and_commits_it() -> None:
    """SIGTERM (the stop flag) during a batch: the batch finishes within the grace period, its
    offsets are committed, and the worker exits 0."""
    stop = StopFlag()

    def durable(batch: Batch) -> list[Any]:
        stop.set()
        return list(batch.messages)

    fake = FakeConsumer([record(0, 0), record(0, 1)], assign_first(0))
    assert loop(fake, Processor(durable), idle_s=None, stop=stop).run() == 0
    assert fake.committed == {(TOPIC, 0): 2}


def test_until_idle_waits_for_the_first_assignment() -> None:
    """--until-idle counts from the first assignment, not from the start: a slow group join
    is not idleness."""
    fake = FakeConsumer([record(0, 0)])

    def script(f: FakeConsumer) -> None:
        if f.calls == 20:
            f.assign(0)

    fake.script = script
    processor = Processor()
    assert loop(fake, processor, idle_s=0.05).run() == 0
    assert processor.batches == [[(0, 0)]]


def test_batches_are_bounded_in_bytes_as_well_as_records() -> None:
    """Large records close a batch by their bytes long before its record count: four records
    of 400 kB with a 1 MB limit make batches of three at most, never of ten."""
    fake = FakeConsumer([FakeRecord(TOPIC, 0, i, b"k", b"x" * 400_000) for i in range(4)],
                        assign_first(0))
    processor = Processor()
    consumer = BatchConsumer(
        KafkaConfig(), TOPIC, "g", processor, BatchLimits(10, 10, 0.0, max_bytes=1_000_000),
        log=structlog.get_logger(), metrics=Metrics("test"), health=Health(stall_after_s=60),
        stop=StopFlag(), until_idle_s=0.2, make_consumer=lambda conf: fake)
    assert consumer.run() == 0
    assert max(len(b) for b in processor.batches) <= 3
    assert sum(len(b) for b in processor.batches) == 4


def test_a_batch_stuck_in_one_call_turns_liveness_off_while_the_loop_still_polls() -> None:
    """A black-holed connection holds the batch thread while the poll loop turns: /healthz must
    say so (503), so that Kubernetes restarts the pod and its partitions move on."""
    release, stuck = threading.Event(), threading.Event()
    health = Health(stall_after_s=0.2)

    def durable(batch: Batch) -> list[Any]:
        batch.progress()
        stuck.set()
        release.wait(10)  # the call that never returns, until the test lets it
        return list(batch.messages)

    def script(fake: FakeConsumer) -> None:
        if fake.calls == 1:
            fake.assign(0)
        elif stuck.is_set() and not health.live:
            release.set()

    fake = FakeConsumer([record(0, 0)], script)
    consumer = BatchConsumer(
        KafkaConfig(), TOPIC, "g", Processor(durable), BatchLimits(10, 10, 0.0),
        log=structlog.get_logger(), metrics=Metrics("test"), health=health, stop=StopFlag(),
        until_idle_s=0.2, make_consumer=lambda conf: fake)
    assert consumer.run() == 0
    assert release.is_set(), "liveness never turned off while the batch was stuck"
    assert fake.committed == {(TOPIC, 0): 1}


def test_a_batch_that_keeps_making_progress_stays_live() -> None:
    """A long batch that does its steps (encode passes, database calls) is not stuck."""
    health = Health(stall_after_s=60)
    health.batch_progress()
    assert health.live
    health.batch_done()
    assert health.live


def test_lag_is_reported_only_for_partitions_this_member_owns() -> None:
    """librdkafka keeps reporting a partition's last lag after a rebalance took it away: a frozen
    figure would read as lag long after the new owner caught up (and keep a lag alert firing)."""
    fake = FakeConsumer([], lambda fake: None)
    consumer = loop(fake, Processor())
    metrics = consumer.metrics

    def lag(partition: int) -> float | None:
        return metrics.registry.get_sample_value(
            "vecpipe_consumer_lag", {"stage": "test", "topic": TOPIC, "partition": str(partition)})

    def stats(**lags: int) -> str:
        parts = {p.removeprefix("p"): {"consumer_lag": v} for p, v in lags.items()}
        return json.dumps({"topics": {TOPIC: {"partitions": {"-1": {"consumer_lag": 9}, **parts}}}})

    consumer._on_assign(fake, [TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)])
    consumer._on_stats(stats(p0=5, p1=7))
    assert (lag(0), lag(1)) == (5, 7)
    consumer._on_revoke(fake, [TopicPartition(TOPIC, 1)])
    consumer._on_stats(stats(p0=3, p1=5000))
    assert (lag(0), lag(1)) == (3, None)
    consumer._on_lost(fake, [TopicPartition(TOPIC, 0)])
    assert lag(0) is None
