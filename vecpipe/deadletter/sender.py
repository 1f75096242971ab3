"""Sending a failed record to its dead-letter topic, with the error that sent it there.

A dead letter is never refused because of its record: one larger than the dead-letter topics
take (``MAX_MESSAGE_BYTES``, as ``vecpipe.kafka.admin`` creates them) is cut to fit before it is
sent, and one that a smaller topic (created some other way) refuses anyway is sent again cut to
``FALLBACK_BYTES``, which the broker's default limit takes. Both say so in their headers.
"""

from __future__ import annotations

from vecpipe.config import KafkaConfig
from vecpipe.deadletter.headers import RecordLike, error_headers, fit
from vecpipe.kafka.producer import DurableProducer
from vecpipe.kafka.settings import MAX_MESSAGE_BYTES

__all__ = ["FALLBACK_BYTES", "MAX_DEAD_LETTER_BYTES", "DeadLetters"]

# Room under the topics' limit for what the producer adds around the record (batch framing).
MAX_DEAD_LETTER_BYTES = MAX_MESSAGE_BYTES - 65_536
# Under the broker's default max.message.bytes (1 MiB), for dead-letter topics made elsewhere.
FALLBACK_BYTES = 512 * 1024


def _as_bytes(data: str | bytes | None) -> bytes | None:
    return data.encode() if isinstance(data, str) else data


class DeadLetters:
    """Publishes failed records to ``<source topic><dlq_suffix>`` through a durable producer."""

    def __init__(
        self, producer: DurableProducer, kafka: KafkaConfig, stage: str, worker_id: str
    ) -> None:
        self.producer = producer
        self.kafka = kafka
        self.stage = stage
        self.worker_id = worker_id

    def send(self, record: RecordLike, exc: BaseException, attempts: int = 1) -> str:
        """Queue ``record`` on its dead-letter topic with the error headers; return the topic.

        The caller flushes the producer before it stores the record's offset.
        """
        topic = record.topic() or ""
        dlq = self.kafka.dlq_topic(topic)
        headers = error_headers(record, exc, stage=self.stage, worker=self.worker_id,
                                attempts=attempts)
        whole = (_as_bytes(record.key()), _as_bytes(record.value()), headers)
        key, value, headers = fit(*whole, MAX_DEAD_LETTER_BYTES)
        self.producer.produce(
            dlq, value, key=key, headers=headers, timestamp=record.timestamp()[1] or None,
            smaller=lambda: fit(*whole, FALLBACK_BYTES),
        )
        return dlq
