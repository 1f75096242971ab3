"""Topics and offsets: check the broker, create the pipeline's topics, read watermarks and lag.

The one copy of every offset question the tools ask: a topic's partitions, its low and high
watermarks, a group's committed offsets, and so a group's lag and a topic's depth.
"""

from __future__ import annotations

from collections.abc import Iterable

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from vecpipe.config import KafkaConfig
from vecpipe.errors import Unreachable
from vecpipe.kafka.reader import reader
from vecpipe.kafka.settings import MAX_MESSAGE_BYTES, admin_config

__all__ = [
    "Watermarks",
    "admin_client",
    "check_broker",
    "committed_offsets",
    "ensure_topics",
    "group_lag",
    "offsets_committed",
    "pipeline_topics",
    "topic_depth",
    "topic_partitions",
    "unreachable",
    "watermarks",
]

Watermarks = dict[int, tuple[int, int]]


def admin_client(cfg: KafkaConfig) -> AdminClient:
    """An AdminClient with the pass-through client settings."""
    return AdminClient(admin_config(cfg))


def pipeline_topics(cfg: KafkaConfig) -> list[str]:
    """The chunks and embeddings topics and their dead-letter topics."""
    base = [cfg.chunks_topic, cfg.embeddings_topic]
    return base + [cfg.dlq_topic(t) for t in base]


def check_broker(cfg: KafkaConfig, timeout: float = 15.0) -> AdminClient:
    """Return an admin client after the broker answered a metadata request, else raise."""
    admin = admin_client(cfg)
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        admin.poll(0)  # hands over librdkafka's log lines, which say why (refused, TLS, SASL)
        raise unreachable(cfg, timeout, exc) from None
    return admin


def unreachable(cfg: KafkaConfig, timeout: float, exc: KafkaException) -> Unreachable:
    """The error that says the broker did not answer, and which setting names it."""
    return Unreachable(
        f"Cannot reach the Kafka broker at {cfg.bootstrap!r} (kafka.bootstrap, "
        f"VECPIPE_KAFKA_BOOTSTRAP) within {timeout:.0f} s: {exc.args[0]}; start it with "
        "'vecpipe services up' or fix the address."
    )


def ensure_topics(
    cfg: KafkaConfig, topics: Iterable[str] | None = None, timeout: float = 30.0
) -> None:
    """Create ``topics`` (default: the pipeline's) with the configured partitions if missing."""
    admin = check_broker(cfg)
    wanted = list(topics) if topics is not None else pipeline_topics(cfg)
    existing = set(admin.list_topics(timeout=timeout).topics)
    missing = [t for t in dict.fromkeys(wanted) if t not in existing]
    if not missing:
        return
    dlqs = {cfg.dlq_topic(t) for t in (cfg.chunks_topic, cfg.embeddings_topic)}
    # A record grows on its way: an embedding is its chunk plus the vector, a dead letter its
    # record plus error headers. So a chunk that just fit the chunks topic (the broker's default
    # limit, 1 MiB) must still fit the topics after it: those take what producers send.
    large = {"max.message.bytes": str(MAX_MESSAGE_BYTES)}
    # Dead letters append with the broker's time, so that their retention counts from the
    # failure, not from the original publish (which travels in vecpipe.published_at).
    dead = {**large, "retention.ms": str(cfg.dlq_retention_ms),
            "message.timestamp.type": "LogAppendTime"}
    config = {cfg.embeddings_topic: large, **{t: dead for t in dlqs}}
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=cfg.partitions, replication_factor=cfg.replication_factor,
                  config=config.get(t, {}))
         for t in missing],
        operation_timeout=timeout,
    )
    for fut in futures.values():
        try:
            fut.result(timeout)
        except KafkaException as exc:
            # Another pod may have created it a moment ago: that is what we wanted.
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise


# -- offsets ------------------------------------------------------------------------------------

def topic_partitions(consumer: Consumer, topic: str, timeout: float = 10.0) -> list[int]:
    """The partition ids of ``topic``; empty when the topic does not exist."""
    meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
    if meta is None or meta.error is not None:
        return []
    return sorted(meta.partitions)


def _partitions_or_unreachable(kafka: KafkaConfig, consumer: Consumer, topic: str,
                               timeout: float = 10.0) -> list[int]:
    try:
        return topic_partitions(consumer, topic, timeout)
    except KafkaException as exc:
        consumer.poll(0)  # hands over librdkafka's log lines, which say why
        raise unreachable(kafka, timeout, exc) from None


def watermarks(consumer: Consumer, topic: str, partitions: list[int],
               timeout: float = 10.0) -> Watermarks:
    """(low, high) offsets of each partition now."""
    out: Watermarks = {}
    for p in partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
        out[p] = (int(low), int(high))
    return out


def committed_offsets(consumer: Consumer, topic: str, partitions: list[int],
                      timeout: float = 10.0) -> dict[int, int]:
    """The committed offset of each partition for the consumer's group, where there is one."""
    tps = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=timeout)
    return {tp.partition: tp.offset for tp in tps if tp.offset != OFFSET_INVALID}


def offsets_committed(kafka: KafkaConfig, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset for each partition of ``topic`` (for status and tests).

    Read by a consumer that never subscribes, so the group is not joined.
    """
    consumer = reader(kafka, "offsets", group=group)
    try:
        return committed_offsets(consumer, topic, topic_partitions(consumer, topic))
    finally:
        consumer.close()


def group_lag(kafka: KafkaConfig, group: str, topic: str) -> dict[int, int]:
    """Records of each partition of ``topic`` that ``group`` has not committed yet."""
    consumer = reader(kafka, "lag", group=group)
    try:
        parts = _partitions_or_unreachable(kafka, consumer, topic)
        done = committed_offsets(consumer, topic, parts)
        return {p: high - done.get(p, low)
                for p, (low, high) in watermarks(consumer, topic, parts).items()}
    finally:
        consumer.close()


def topic_depth(kafka: KafkaConfig, topic: str) -> int:
    """Records ``topic`` holds now (high minus low watermarks); 0 when it does not exist."""
    consumer = reader(kafka, "depth")
    try:
        marks = watermarks(consumer, topic, _partitions_or_unreachable(kafka, consumer, topic))
        return sum(high - low for low, high in marks.values())
    finally:
        consumer.close()
