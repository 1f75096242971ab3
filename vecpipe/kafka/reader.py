"""Reading a topic without disturbing it: assigned partitions, a throwaway group, no commits.

Nothing here joins a consumer group or moves anybody's progress, so inspecting a dead-letter
topic or reading a group's committed offsets can run as often as anyone likes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from vecpipe.config import KafkaConfig
from vecpipe.kafka.settings import consumer_config

__all__ = ["StopLike", "read_range", "reader"]


class StopLike(Protocol):
    """Anything that says when to stop (``vecpipe.kafka.consumer.StopFlag``)."""

    def is_set(self) -> bool:
        """True once reading should end."""
        ...


def reader(kafka: KafkaConfig, purpose: str, group: str | None = None) -> Consumer:
    """A consumer that commits nothing; ``group`` only lets it read that group's offsets."""
    return Consumer(consumer_config(
        kafka, group or f"vecpipe-{purpose}-{os.urandom(4).hex()}",
        **{"enable.auto.commit": False, "enable.partition.eof": True,
           "statistics.interval.ms": 0, "partition.assignment.strategy": "range"}))


def read_range(
    consumer: Consumer, topic: str, starts: dict[int, int], ends: dict[int, int], *,
    stop: StopLike, follow: bool = False, poll_s: float = 0.5,
) -> Iterator[Message]:
    """Assign ``starts`` (partition -> first offset) and yield records up to ``ends`` (exclusive).

    With ``follow`` it goes on past the ends until ``stop`` is set.
    """
    consumer.assign([TopicPartition(topic, p, o) for p, o in starts.items()])
    pending = {p for p, o in starts.items() if o < ends.get(p, 0)}
    while not stop.is_set() and (follow or pending):
        for msg in consumer.consume(num_messages=500, timeout=poll_s):
            err = msg.error()
            p = msg.partition() or 0
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    pending.discard(p)
                    continue
                if err.fatal():
                    raise KafkaException(err)
                continue
            offset = msg.offset() or 0
            if not follow and offset >= ends.get(p, 0):
                pending.discard(p)
                continue
            if offset + 1 >= ends.get(p, 0):
                pending.discard(p)
            yield msg
