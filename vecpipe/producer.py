"""A Kafka producer that makes delivery failures impossible to miss.

Idempotent (``enable.idempotence``, ``acks=all``) and compressed; :meth:`DurableProducer.produce`
waits for room when the local queue is full instead of failing, and :meth:`flush` raises
:class:`DeliveryFailed` if any message since the last flush was not acknowledged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from vecpipe.config import KafkaConfig
from vecpipe.faults import DeliveryFailed
from vecpipe.messages import HeaderLike, header_list

__all__ = ["DurableProducer", "producer_config"]



def producer_config(cfg: KafkaConfig, **overrides: Any) -> dict[str, Any]:
    """librdkafka settings for an idempotent, compressed, durable producer."""
    base: dict[str, Any] = {
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": "lz4",
        "linger.ms": 20,
        "batch.size": 1_000_000,
        "message.max.bytes": 10_000_000,
        "queue.buffering.max.messages": 100_000,
        "queue.buffering.max.kbytes": 262_144,
        "delivery.timeout.ms": 120_000,
    }
    # Pass-through settings (SASL, TLS, tuning) override our defaults; explicit overrides win.
    base.update(cfg.client)
    base.update(overrides)
    base["bootstrap.servers"] = cfg.bootstrap
    return base


class DurableProducer:
    """Wraps ``confluent_kafka.Producer``: backpressure on a full queue, failures surfaced."""

    def __init__(self, cfg: KafkaConfig, **overrides: Any) -> None:
        self._producer = Producer(producer_config(cfg, **overrides))
        self._errors: list[KafkaError] = []
        self._lock = threading.Lock()
        self.delivered = 0

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        with self._lock:
            if err is not None:
                self._errors.append(err)
            else:
                self.delivered += 1

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: HeaderLike = None,
        timestamp: int | None = None,
        on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
    ) -> None:
        """Queue one message; when the local queue is full, serve callbacks until there is room."""
        callback = self._on_delivery
        if on_delivery is not None:
            user_cb = on_delivery

            def callback(err: KafkaError | None, msg: Message) -> None:
                self._on_delivery(err, msg)
                user_cb(err, msg)

        kwargs: dict[str, Any] = {"key": key, "headers": header_list(headers),
                                  "on_delivery": callback}
        if timestamp:
            kwargs["timestamp"] = timestamp
        while True:
            try:
                self._producer.produce(topic, value, **kwargs)
                break
            except BufferError:
                # Backpressure: the queue is full, so wait for acknowledgements to free room.
                self._producer.poll(0.5)
        self._producer.poll(0)

    def poll(self, timeout: float = 0) -> None:
        """Serve delivery callbacks."""
        self._producer.poll(timeout)

    def pending(self) -> int:
        """Messages queued or in flight, not yet acknowledged."""
        return len(self._producer)

    def flush(self, timeout: float = 60.0) -> None:
        """Wait for every queued message; raise :class:`DeliveryFailed` if any was refused."""
        remaining = self._producer.flush(timeout)
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise DeliveryFailed(
                f"{len(errors)} message(s) were not acknowledged by the broker, first: "
                f"{errors[0].str()}."
            )
        if remaining:
            raise DeliveryFailed(
                f"{remaining} message(s) still unacknowledged after {timeout:.0f} s; "
                "is the broker reachable?"
            )

    def close(self, timeout: float = 30.0) -> None:
        """Flush what is queued; errors are raised as in :meth:`flush`."""
        self.flush(timeout)
