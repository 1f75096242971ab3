"""A Kafka producer that makes delivery failures impossible to miss.

Idempotent (``enable.idempotence``, ``acks=all``) and compressed; :meth:`DurableProducer.produce`
waits for room when the local queue is full instead of failing, and :meth:`flush` raises if any
message since the last flush was not acknowledged: :class:`DeliveryFailed` (transient) after
queueing the unacknowledged messages again, so that calling :meth:`flush` again retries those and
only those (retrying a whole batch would duplicate what was delivered), or
:class:`DeliveryRefused` when the broker refused a message for good (too large, not authorized).
A message sent with ``smaller`` (a dead letter) is never refused that way: when the broker or the
client refuses it, the smaller form ``smaller`` gives is sent instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from confluent_kafka import (
    KafkaError,
    KafkaException,
    Message,
    Producer,
)

from vecpipe.config import KafkaConfig
from vecpipe.errors import DeliveryFailed, DeliveryRefused
from vecpipe.kafka.settings import producer_config
from vecpipe.messages import HeaderLike, header_list

__all__ = ["DurableProducer"]

# Refusals that no retry can change: the message itself, or this client's rights, are the cause.
_REFUSALS = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE, KafkaError.INVALID_MSG,
    KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError.INVALID_RECORD,
})


# Refusals of a message's size, which a smaller form of it may pass.
_TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE,
                        KafkaError.RECORD_LIST_TOO_LARGE})

# Gives the smaller (truncated) key, value and headers of a message refused as too large.
Shrink = Callable[[], tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]


@dataclass(frozen=True)
class _Record:
    """What was produced, kept until acknowledged: a failed delivery report carries neither the
    headers nor the timestamp, so a message queued again is rebuilt from this."""

    topic: str
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, str | bytes | None]]
    timestamp: int
    on_delivery: Callable[[KafkaError | None, Message], None] | None
    smaller: Shrink | None = None

    def shrunk(self) -> _Record:
        """The smaller form of a refused message (which has none of its own)."""
        assert self.smaller is not None
        key, value, headers = self.smaller()
        return replace(self, key=key, value=value, headers=list(headers), smaller=None)


class DurableProducer:
    """Wraps ``confluent_kafka.Producer``: backpressure on a full queue, failures surfaced."""

    def __init__(self, cfg: KafkaConfig, **overrides: Any) -> None:
        self._producer = Producer(producer_config(cfg, **overrides))
        self._failed: list[tuple[KafkaError, _Record]] = []
        self._lock = threading.Lock()
        self.delivered = 0

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: HeaderLike = None,
        timestamp: int | None = None,
        on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
        smaller: Shrink | None = None,
    ) -> None:
        """Queue one message; when the local queue is full, serve callbacks until there is room.

        Without ``timestamp`` the message gets the time of this call (Kafka's CreateTime), and
        keeps it if it has to be sent again. With ``smaller``, a refusal of the message for its
        size sends what ``smaller`` returns instead.
        """
        if timestamp is None or timestamp <= 0:
            timestamp = int(time.time() * 1000)
        kept: list[tuple[str, str | bytes | None]] = list(header_list(headers))
        self._send(_Record(topic, value, key, kept, timestamp, on_delivery, smaller))

    def _send(self, record: _Record) -> None:
        def callback(err: KafkaError | None, msg: Message) -> None:
            with self._lock:
                if err is not None:
                    self._failed.append((err, record))
                else:
                    self.delivered += 1
            if record.on_delivery is not None:
                record.on_delivery(err, msg)

        while True:
            try:
                self._producer.produce(record.topic, record.value, key=record.key,
                                       headers=record.headers, timestamp=record.timestamp,
                                       on_delivery=callback)
                break
            except BufferError:
                # Backpressure: the queue is full, so wait for acknowledgements to free room.
                self._producer.poll(0.5)
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if isinstance(err, KafkaError) and err.code() in _REFUSALS:
                    if err.code() in _TOO_LARGE and record.smaller is not None:
                        record = record.shrunk()
                        continue
                    raise DeliveryRefused(
                        f"the producer refused a message of {len(record.value or b'')} bytes to "
                        f"topic {record.topic!r}: {err.str()}; see message.max.bytes "
                        "(kafka.client)."
                    ) from None
                raise
        self._producer.poll(0)

    def poll(self, timeout: float = 0) -> None:
        """Serve delivery callbacks."""
        self._producer.poll(timeout)

    def pending(self) -> int:
        """Messages queued or in flight, not yet acknowledged."""
        return len(self._producer)

    def flush(self, timeout: float = 60.0) -> None:
        """Wait for every queued message; raise if any was not acknowledged (module docstring).

        Messages that failed for a transient reason are queued again before
        :class:`DeliveryFailed` is raised; a message refused for good raises
        :class:`DeliveryRefused` naming the topic and the reason, and is not queued again.
        """
        remaining = self._producer.flush(timeout)
        with self._lock:
            failed, self._failed = self._failed, []
        refused: list[tuple[KafkaError, _Record]] = []
        for err, record in failed:
            if err.code() in _TOO_LARGE and record.smaller is not None:
                self._send(record.shrunk())  # counted below as failed: the caller flushes again
            elif err.code() in _REFUSALS or err.fatal():
                refused.append((err, record))
            else:
                self._send(record)
        if refused:
            err, record = refused[0]
            raise DeliveryRefused(
                f"the broker refused {len(refused)} message(s) for good, first one of "
                f"{len(record.value or b'')} bytes to topic {record.topic!r}: {err.str()}; see "
                "that topic's settings (max.message.bytes, ACLs)."
            )
        if failed:
            raise DeliveryFailed(
                f"{len(failed)} message(s) were not acknowledged by the broker, first: "
                f"{failed[0][0].str()}; they are queued again."
            )
        if remaining:
            raise DeliveryFailed(
                f"{remaining} message(s) still unacknowledged after {timeout:.0f} s; "
                "is the broker reachable?"
            )

    def close(self, timeout: float = 30.0) -> None:
        """Flush what is queued; errors are raised as in :meth:`flush`."""
        self.flush(timeout)
