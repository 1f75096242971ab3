"""Topic administration: check the broker answers and create the pipeline's topics if missing."""

from __future__ import annotations

from collections.abc import Iterable

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from vecpipe.config import KafkaConfig, Unreachable
from vecpipe.producer import MAX_MESSAGE_BYTES

__all__ = ["admin_client", "check_broker", "ensure_topics", "pipeline_topics"]


def admin_client(cfg: KafkaConfig) -> AdminClient:
    """An AdminClient with the pass-through client settings."""
    conf = cfg.client_config()
    # Producer/consumer-only settings would make the admin client log warnings.
    return AdminClient({k: v for k, v in conf.items() if not k.startswith(("enable.", "acks"))})


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
        raise Unreachable(
            f"Cannot reach the Kafka broker at {cfg.bootstrap!r} (kafka.bootstrap, "
            f"VECPIPE_KAFKA_BOOTSTRAP) within {timeout:.0f} s: {exc.args[0]}; start it with "
            "'vecpipe services up' or fix the address."
        ) from None
    return admin


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
    config = {cfg.embeddings_topic: large,
              **{t: {**large, "retention.ms": str(cfg.dlq_retention_ms)} for t in dlqs}}
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
