"""librdkafka settings for every client vecpipe makes, with one precedence rule.

Defaults, then the pass-through settings of ``kafka.client`` (SASL, TLS, tuning), then what the
caller overrides, then the bootstrap servers: the same order for consumers, producers and the
admin client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vecpipe.config import KafkaConfig

__all__ = ["MAX_MESSAGE_BYTES", "admin_config", "consumer_config", "producer_config"]

# The largest message (key, value and headers) producers send, and what the embeddings and
# dead-letter topics accept (vecpipe.kafka.admin); the chunks topic keeps the broker's default.
MAX_MESSAGE_BYTES = 10_485_760

_CONSUMER: Mapping[str, Any] = {
    "enable.auto.commit": True,
    "auto.commit.interval.ms": 1000,
    # Offsets are stored by hand, only for records whose results are durable downstream.
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "partition.assignment.strategy": "cooperative-sticky",
    "queued.max.messages.kbytes": 16_384,
    "fetch.max.bytes": 16_777_216,
    "max.poll.interval.ms": 300_000,
    "session.timeout.ms": 45_000,
    "statistics.interval.ms": 5_000,
}

_PRODUCER: Mapping[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "compression.type": "lz4",
    "linger.ms": 20,
    "batch.size": 1_000_000,
    "message.max.bytes": MAX_MESSAGE_BYTES,
    "queue.buffering.max.messages": 100_000,
    "queue.buffering.max.kbytes": 262_144,
    "delivery.timeout.ms": 120_000,
}


def _layered(defaults: Mapping[str, Any], cfg: KafkaConfig,
             overrides: Mapping[str, Any]) -> dict[str, Any]:
    conf = dict(defaults)
    conf.update(cfg.client)
    conf.update(overrides)
    conf["bootstrap.servers"] = cfg.bootstrap
    return conf


def consumer_config(cfg: KafkaConfig, group: str, **overrides: Any) -> dict[str, Any]:
    """Consumer settings: manual offset store, bounded prefetch, cooperative rebalances."""
    return _layered({**_CONSUMER, "group.id": group}, cfg, overrides)


def producer_config(cfg: KafkaConfig, **overrides: Any) -> dict[str, Any]:
    """Producer settings: idempotent, acks=all, compressed, bounded queue."""
    return _layered(_PRODUCER, cfg, overrides)


def admin_config(cfg: KafkaConfig, **overrides: Any) -> dict[str, Any]:
    """Admin client settings: the pass-through ones without producer or consumer-only keys,
    which would make the admin client log warnings."""
    conf = _layered({}, cfg, overrides)
    return {k: v for k, v in conf.items() if not k.startswith(("enable.", "acks"))}
