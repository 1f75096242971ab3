"""The consumer loop every worker runs: batch, hand the batch to a processor, store offsets after.

The loop owns the Kafka consumer; a processor owns what happens to a batch and returns only
once its results are durable downstream. Offsets are stored (``enable.auto.offset.store=false``)
for exactly the records the processor returned, so nothing is lost when a worker dies at any
instant, and redelivery after a crash is absorbed downstream.

Batches are processed in a background thread while this loop keeps calling ``poll``: the
group heartbeat and ``max.poll.interval.ms`` are served however long a batch takes, and
rebalance callbacks run in time. While one batch is under way the next one fills; once it is full
the partitions are paused (backpressure as a signal, not a sleep), so memory holds at most two
batches plus librdkafka's bounded prefetch (``queued.max.messages.kbytes``). Batches are bounded
in records, in weight and in bytes: a batch of records at the size caps is as bounded as one of
small records (it overshoots its byte limit by at most what one ``consume`` hands over, which
the prefetch bounds).
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Literal, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from vecpipe.config import KafkaConfig
from vecpipe.errors import DeadLetterRateExceeded
from vecpipe.health import Health, Metrics
from vecpipe.kafka.settings import consumer_config

__all__ = [
    "EXIT_DEAD_LETTER_RATE",
    "EXIT_FAILED",
    "Batch",
    "BatchConsumer",
    "BatchLimits",
    "ConsumerLike",
    "Processor",
    "StopFlag",
]

EXIT_FAILED = 1
EXIT_DEAD_LETTER_RATE = 3

TP = tuple[str, int]
# A rebalance callback: (consumer, partitions), run inside ``consume``.
Rebalance = Callable[[Any, list[TopicPartition]], None]


@dataclass
class Batch:
    """Records handed to a processor together; ``revoked`` fills if a rebalance takes some away."""

    messages: list[Message]
    revoked: set[TP] = field(default_factory=set)
    # Called by the processor at each step: liveness watches the batch thread, not only the loop.
    progress: Callable[[], None] = field(default=lambda: None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def owned(self, msg: Message) -> bool:
        """False once ``msg``'s partition was revoked: its new owner will process it."""
        with self._lock:
            return (msg.topic(), msg.partition()) not in self.revoked

    def revoke(self, partitions: Sequence[TP]) -> None:
        """Mark partitions as taken away (called from the rebalance callback)."""
        with self._lock:
            self.revoked.update(partitions)


class ConsumerLike(Protocol):
    """What the loop needs of a consumer (``confluent_kafka.Consumer``, or a fake in tests)."""

    def subscribe(self, topics: list[str], on_assign: Rebalance | None = None,
                  on_revoke: Rebalance | None = None, on_lost: Rebalance | None = None) -> None:
        """Join the group for ``topics``; the callbacks run inside ``consume``."""
        ...

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        """Up to ``num_messages`` records (or events) within ``timeout`` seconds."""
        ...

    def store_offsets(self, message: Message | None = None,
                      offsets: list[TopicPartition] | None = None) -> None:
        """Mark offsets for the next (auto) commit."""
        ...

    def commit(self, *, asynchronous: Literal[False]) -> list[TopicPartition]:
        """Commit the stored offsets now, waiting for the broker."""
        ...

    def pause(self, partitions: list[TopicPartition]) -> None:
        """Stop fetching these partitions."""
        ...

    def resume(self, partitions: list[TopicPartition]) -> None:
        """Fetch these partitions again."""
        ...

    def close(self) -> None:
        """Leave the group."""
        ...


class Processor(Protocol):
    """One stage's work on a batch."""

    def weight(self, msg: Message) -> int:
        """How much of the batch budget ``msg`` uses (tokens for the embedder, 1 otherwise)."""
        ...

    def process(self, batch: Batch) -> list[Message]:
        """Do the work; return the records whose results are durable downstream.

        Records of revoked partitions may be left out (dropped rather than done twice). Raising
        means nothing of the batch is stored, and the worker stops.
        """
        ...


@dataclass(frozen=True)
class BatchLimits:
    """A batch closes at ``max_count`` records, ``max_weight`` units, ``max_bytes`` of keys and
    values, or ``max_wait_s``; it always takes at least one record, however large."""

    max_count: int
    max_weight: int
    max_wait_s: float
    max_bytes: int = 64 * 1024 * 1024


class StopFlag:
    """Set by SIGTERM/SIGINT (or a test); the loop then drains and exits 0."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        """Ask the loop to stop."""
        self._event.set()

    def is_set(self) -> bool:
        """True once a stop was asked for."""
        return self._event.is_set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT set the flag instead of killing the process."""

        def handler(signum: int, frame: FrameType | None) -> None:
            self.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


class BatchConsumer:
    """Runs the poll loop of one worker until stopped, idle, or failed."""

    def __init__(
        self,
        kafka: KafkaConfig,
        topic: str,
        group: str,
        processor: Processor,
        limits: BatchLimits,
        *,
        log: Any,
        metrics: Metrics,
        health: Health,
        stop: StopFlag,
        until_idle_s: float | None = None,
        shutdown_grace_s: float = 30.0,
        on_fatal: Callable[[BaseException], None] | None = None,
        make_consumer: Callable[[dict[str, Any]], ConsumerLike] | None = None,
    ) -> None:
        self.topic = topic
        self.processor = processor
        self.limits = limits
        self.log = log.bind(topic=topic, group=group)
        self.metrics = metrics
        self.health = health
        self.stop = stop
        self.until_idle_s = until_idle_s
        self.grace_s = shutdown_grace_s
        self.on_fatal = on_fatal
        conf = consumer_config(kafka, group, stats_cb=self._on_stats, error_cb=self._on_error)
        # ``make_consumer``: tests drive the loop over a fake consumer.
        self.consumer: ConsumerLike = make_consumer(conf) if make_consumer else Consumer(conf)
        # --until-idle: a first join may wait for a killed member's session to expire.
        self._first_join_wait_s = int(conf.get("session.timeout.ms", 45_000)) / 1000 + 15.0
        self._inflight: tuple[Batch, Future[list[Message]], float] | None = None
        self._pending: list[Message] = []
        self._pending_weight = 0
        self._pending_bytes = 0
        self._pending_since: float | None = None
        self._assigned: set[TP] = set()
        self._paused = False
        self._drained = False
        self._last_message_at = time.monotonic()
        self._joined = False

    # -- callbacks (run inside poll, on this thread) ----------------------------------------

    def _on_error(self, err: KafkaError) -> None:
        # librdkafka reconnects by itself; say so once per error so outages are visible.
        self.log.warning("kafka_error", error=err.str(), fatal=err.fatal())

    def _on_stats(self, stats_json: str) -> None:
        stats = json.loads(stats_json)
        for tname, topic in stats.get("topics", {}).items():
            for pid, part in topic.get("partitions", {}).items():
                lag = part.get("consumer_lag", -1)
                # librdkafka goes on reporting partitions this member no longer owns (their
                # last lag, frozen): only the owner's figure is the partition's lag.
                owned = pid != "-1" and (tname, int(pid)) in self._assigned
                if owned and lag >= 0:
                    self.metrics.lag.labels(self.metrics.stage, tname, pid).set(lag)

    def _on_assign(self, consumer: ConsumerLike, partitions: list[TopicPartition]) -> None:
        self._assigned.update((p.topic, p.partition) for p in partitions)
        self._joined = True
        self.health.set_ready(bool(self._assigned))
        # --until-idle counts from when there is something to read, not from the group join.
        self._last_message_at = time.monotonic()
        self.log.info("partitions_assigned", partitions=[p.partition for p in partitions])
        if self._paused:
            # New partitions join paused if the loop is applying backpressure right now.
            consumer.pause(partitions)

    def _on_revoke(self, consumer: ConsumerLike, partitions: list[TopicPartition]) -> None:
        gone = [(p.topic, p.partition) for p in partitions]
        self.log.info("partitions_revoked", partitions=[p.partition for p in partitions])
        if self._inflight is not None:
            batch, _, _ = self._inflight
            batch.revoke(gone)
            # Completed work of revoked partitions is stored and committed now; what the
            # processor had not produced yet is dropped, and the new owner does it once.
            self._finish_inflight(wait=True)
        gone_set = set(gone)
        self._pending = [m for m in self._pending if (m.topic(), m.partition()) not in gone_set]
        self._recount()
        self._commit()
        self._forget(gone)

    def _on_lost(self, consumer: ConsumerLike, partitions: list[TopicPartition]) -> None:
        # The group moved on without us: our offsets would be rejected, so only drop state.
        gone = {(p.topic, p.partition) for p in partitions}
        self.log.warning("partitions_lost", partitions=[p.partition for p in partitions])
        if self._inflight is not None:
            self._inflight[0].revoke(list(gone))
        self._pending = [m for m in self._pending if (m.topic(), m.partition()) not in gone]
        self._recount()
        self._forget(gone)

    def _forget(self, gone: Iterable[TP]) -> None:
        """Partitions no longer ours: not assigned, and their lag is no longer ours to report
        (a frozen figure would read as lag after the new owner caught up)."""
        for tp in gone:
            self._assigned.discard(tp)
            with contextlib.suppress(KeyError):  # KeyError: never reported
                self.metrics.lag.remove(self.metrics.stage, tp[0], str(tp[1]))
        self.health.set_ready(bool(self._assigned))

    # -- offsets ------------------------------------------------------------------------------

    def _store(self, done: list[Message]) -> None:
        top: dict[TP, int] = {}
        for m in done:
            tp = (m.topic() or "", m.partition() or 0)
            top[tp] = max(top.get(tp, -1), m.offset() or 0)
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in top.items()
                   if (t, p) in self._assigned]
        if offsets:
            self.consumer.store_offsets(offsets=offsets)

    def _commit(self) -> None:
        try:
            self.consumer.commit(asynchronous=False)
        except KafkaException as exc:
            # _NO_OFFSET: nothing stored since the last commit, which is fine.
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                self.log.warning("commit_failed", error=str(exc.args[0]))

    # -- batches --------------------------------------------------------------------------------

    def _finish_inflight(self, wait: bool, timeout: float | None = None) -> bool:
        """Collect the batch under way; True when there is none left."""
        if self._inflight is None:
            return True
        batch, fut, started = self._inflight
        if not wait and not fut.done():
            return False
        try:
            done = fut.result(timeout=timeout)  # re-raises the processor's failure
        finally:
            # Failed or abandoned, the batch is over: nothing of it is stored, so a later
            # rebalance or close must not collect it again.
            if fut.done() or timeout is not None:
                self._inflight = None
                self.health.batch_done()
        self._store(done)
        elapsed = time.monotonic() - started
        self.metrics.batch_seconds.labels(self.metrics.stage).observe(elapsed)
        self.metrics.batch_size.labels(self.metrics.stage).observe(len(batch.messages))
        self.log.debug("batch_done", records=len(batch.messages), done=len(done),
                       seconds=round(elapsed, 3))
        return True

    def _submit(self) -> None:
        taken, rest = self._split()
        batch = Batch(taken, progress=self.health.batch_progress)
        self.health.batch_progress()
        self._pending = rest
        self._pending_since = time.monotonic() if rest else None
        self._recount()
        self.metrics.queue_depth.labels(self.metrics.stage).set(len(batch.messages))
        self._inflight = (batch, _in_daemon_thread(self.processor.process, batch),
                          time.monotonic())

    def _split(self) -> tuple[list[Message], list[Message]]:
        """The pending records that fit one batch's limits (at least one), and the rest."""
        count = weight = size = 0
        lim = self.limits
        for i, m in enumerate(self._pending):
            w, b = self.processor.weight(m), _size(m)
            if i and (count + 1 > lim.max_count or weight + w > lim.max_weight
                      or size + b > lim.max_bytes):
                return self._pending[:i], self._pending[i:]
            count, weight, size = count + 1, weight + w, size + b
        return self._pending, []

    def _recount(self) -> None:
        self._pending_weight = sum(self.processor.weight(m) for m in self._pending)
        self._pending_bytes = sum(_size(m) for m in self._pending)

    def _batch_full(self) -> bool:
        return (len(self._pending) >= self.limits.max_count
                or self._pending_weight >= self.limits.max_weight
                or self._pending_bytes >= self.limits.max_bytes)

    def _batch_due(self) -> bool:
        if not self._pending:
            return False
        waited = time.monotonic() - (self._pending_since or time.monotonic())
        return (self._batch_full() or self._drained or waited >= self.limits.max_wait_s
                or self.stop.is_set())

    def _set_paused(self, paused: bool) -> None:
        if paused == self._paused:
            return
        parts = [TopicPartition(t, p) for t, p in self._assigned]
        if parts:
            (self.consumer.pause if paused else self.consumer.resume)(parts)
        self._paused = paused

    def _take(self, msgs: list[Message]) -> None:
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                self.log.warning("consume_error", error=err.str())
                continue
            if self._pending_since is None:
                self._pending_since = time.monotonic()
            self._pending.append(m)
            self._pending_weight += self.processor.weight(m)
            self._pending_bytes += _size(m)
            self._last_message_at = time.monotonic()

    def _idle(self) -> bool:
        if self.until_idle_s is None or self._pending or self._inflight is not None:
            return False
        # A slow first join is not idleness: the broker may be creating __consumer_offsets, or
        # the group waiting for a killed member's session to expire. Once joined (with
        # partitions or, more workers than partitions, without), idle time counts.
        wait = self.until_idle_s if self._joined else max(self.until_idle_s,
                                                           self._first_join_wait_s)
        return time.monotonic() - self._last_message_at >= wait

    def run(self) -> int:
        """Consume until stopped (exit 0), idle for ``until_idle_s`` (0), or failed (non-zero)."""
        self.consumer.subscribe(
            [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self.log.info("worker_started")
        code = 0
        try:
            while True:
                self.health.beat()
                self._finish_inflight(wait=False)
                if self.stop.is_set() or self._idle():
                    break
                if self._inflight is None and self._batch_due():
                    self._submit()
                # Backpressure: stop fetching while the next batch is full and one is under way.
                full = self._inflight is not None and self._batch_full()
                self._set_paused(full)
                if full:
                    assert self._inflight is not None
                    # Paused: wake as soon as the batch is done; consume() still serves the
                    # group protocol and keeps max.poll.interval.ms from expiring.
                    wait([self._inflight[1]], timeout=0.1)
                    self._take(self.consumer.consume(num_messages=1, timeout=0))
                    continue
                room = max(1, self.limits.max_count - len(self._pending))
                asked = min(room, 500)
                got = self.consumer.consume(num_messages=asked,
                                            timeout=0.02 if self._inflight else 0.1)
                self._take(got)
                # Nothing more arrived: waiting longer for a fuller batch only adds latency.
                self._drained = not got
            code = self._drain()
        except DeadLetterRateExceeded as exc:
            self.log.error("dead_letter_rate_exceeded", error=str(exc))
            code = EXIT_DEAD_LETTER_RATE
        except Exception as exc:
            self.log.exception("worker_failed", error=str(exc))
            if self.on_fatal is not None:
                self.on_fatal(exc)
            code = EXIT_FAILED
        finally:
            self.health.set_ready(False)
            self._close(commit=code == 0)
        self.log.info("worker_stopped", exit_code=code)
        return code

    def _drain(self) -> int:
        """Finish the batch under way and whatever is pending, within the grace period.

        A batch that outlasts the grace period is abandoned: its offsets are not stored, so the
        next owner of its partitions processes it again, and the process still exits 0.
        """
        deadline = time.monotonic() + self.grace_s
        try:
            self._finish_inflight(wait=True, timeout=max(0.1, deadline - time.monotonic()))
            if self._pending and time.monotonic() < deadline:
                self._submit()
                self._finish_inflight(wait=True, timeout=max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            self.log.warning("batch_abandoned", grace_s=self.grace_s)
        return 0

    def _close(self, commit: bool) -> None:
        try:
            if commit:
                self._commit()
        finally:
            try:
                self.consumer.close()
            except Exception as exc:
                self.log.warning("consumer_close_failed", error=str(exc))


def _size(msg: Message) -> int:
    """What a record holds in memory, near enough: its key and value."""
    return len(msg.value() or b"") + len(msg.key() or b"")


def _in_daemon_thread(fn: Callable[[Batch], list[Message]], batch: Batch) -> Future[list[Message]]:
    """Run ``fn(batch)`` in a daemon thread: an abandoned batch must not hold the exit."""
    fut: Future[list[Message]] = Future()

    def run() -> None:
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn(batch))
            except BaseException as exc:
                fut.set_exception(exc)

    threading.Thread(target=run, name="vecpipe-batch", daemon=True).start()
    return fut
