"""What every stage does after its own step, written once: dead letters, flush, guard, metrics.

A stage hands over the records it finished and the failures among them. Settling feeds the
dead-letter rate guard (which stops a worker whose input mostly fails, before it sends any of
the batch's dead letters), sends each failure to its dead-letter topic, waits until the broker
acknowledged everything the stage produced (its output and the dead letters, retrying a
transient failure, and counting it), and counts outcomes (the dead letters on the batch span
too). Only then are the records returned to the consumer loop, which stores their offsets: a
crash before that redoes the batch, never loses it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import Message

from vecpipe.config import RetryConfig
from vecpipe.deadletter.guard import DeadLetterGuard
from vecpipe.deadletter.sender import DeadLetters
from vecpipe.health import Metrics
from vecpipe.retry import call_with_retry
from vecpipe.tracing import count_dead_letters

__all__ = ["Failure", "Flushable", "Settle", "retry_counter"]


@dataclass(frozen=True)
class Failure:
    """One record that goes to the dead-letter topic, and why."""

    msg: Message
    error: BaseException


class Flushable(Protocol):
    """What settling needs of the stage's producer (``vecpipe.kafka.producer.DurableProducer``)."""

    def flush(self, timeout: float = 60.0) -> None:
        """Wait for every queued message; raise if one was not acknowledged."""
        ...


def retry_counter(metrics: Metrics, log: Any, kind: str) -> Any:
    """An ``on_retry`` callback for ``vecpipe.retry``: counts and logs each retry of ``kind``."""

    def on_retry(exc: BaseException, attempt: int) -> None:
        metrics.retries.labels(metrics.stage, kind).inc()
        log.warning("retrying", kind=kind, attempt=attempt, error=str(exc))

    return on_retry


class Settle:
    """The tail of every stage's batch (see the module docstring)."""

    def __init__(self, retry: RetryConfig, producer: Flushable, dead_letters: DeadLetters,
                 guard: DeadLetterGuard, metrics: Metrics, log: Any) -> None:
        self.retry = retry
        self.producer = producer
        self.dead_letters = dead_letters
        self.guard = guard
        self.metrics = metrics
        self.log = log

    def __call__(self, batch: Sequence[Message], done: list[Message],
                 failures: Sequence[Failure], *, produced: bool = True,
                 progress: Callable[[], None] = lambda: None) -> list[Message]:
        """Settle ``done`` (records of ``batch`` the stage finished; the rest were dropped with
        their revoked partitions), of which ``failures`` go to the dead-letter topics.

        ``produced``: the stage queued output of its own, which the flush must wait for too.
        """
        failed = {id(f.msg) for f in failures}
        # The guard first: a batch that trips it sends none of its dead letters, so a worker
        # that stops there and restarts on the same records never sends them twice.
        for msg in done:
            self.guard.record(id(msg) in failed)
        for f in failures:
            self.dead_letters.send(f.msg, f.error)
            self.log.warning("dead_lettered", partition=f.msg.partition(),
                             offset=f.msg.offset(), error_class=type(f.error).__name__,
                             error=str(f.error))
        progress()
        if produced or failures:
            # A failed flush queues what was not acknowledged again: a retry resends only that.
            call_with_retry(self.retry, self.producer.flush,
                            on_retry=retry_counter(self.metrics, self.log, "produce"))
        dead = sum(1 for msg in done if id(msg) in failed)
        self.metrics.count("ok", len(done) - dead)
        self.metrics.count("dead_letter", dead)
        self.metrics.dead_letters.labels(self.metrics.stage).inc(dead)
        count_dead_letters(dead)
        self.metrics.count("dropped", len(batch) - len(done))
        return done
