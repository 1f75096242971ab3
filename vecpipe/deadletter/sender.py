"""Sending a failed record to its dead-letter topic, with the error that sent it there."""

from __future__ import annotations

from vecpipe.config import KafkaConfig
from vecpipe.deadletter.headers import RecordLike, error_headers
from vecpipe.kafka.producer import DurableProducer

__all__ = ["DeadLetters"]


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
        headers = error_headers(record, exc, stage=self.stage, worker=self.worker_id,
                                attempts=attempts)
        dlq = self.kafka.dlq_topic(topic)
        key = record.key()
        value = record.value()
        self.producer.produce(
            dlq,
            value.encode() if isinstance(value, str) else value,
            key=key.encode() if isinstance(key, str) else key,
            headers=headers,
            timestamp=record.timestamp()[1] or None,
        )
        return dlq
