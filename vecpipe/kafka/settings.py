"""librdkafka settings for every client vecpipe makes, with one precedence rule.

Defaults, then the pass-through settings of ``kafka.client`` (SASL, TLS, tuning), then what the
caller overrides, then the bootstrap servers: the same order for consumers, producers and the
admin client. librdkafka's own log lines go through :data:`LIBRDKAFKA_LOG`, which leaves out
those of conditions librdkafka retries and recovers from by itself.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import structlog

from vecpipe.config import KafkaConfig, redact_text

__all__ = [
    "LIBRDKAFKA_LOG",
    "MAX_MESSAGE_BYTES",
    "admin_config",
    "consumer_config",
    "producer_config",
    "retriable_noise",
]

# Lines of conditions librdkafka waits out and retries on its own: a fresh broker loading its
# group coordinator (COORDINATOR_LOAD_IN_PROGRESS, COORDINATOR_NOT_AVAILABLE, NOT_COORDINATOR),
# a topic created a moment ago that has no leader yet. They say nothing to act on while a client
# starts; one that lasts (a coordinator that never loads, an offline partition) is a real
# problem, so past a process's first minute they are passed on like any line (once a minute).
_RETRIABLE = re.compile(
    r"Coordinator load in progress|Coordinator not available|Not coordinator"
    r"|Leader not available",
    re.IGNORECASE,
)


_STARTED = time.monotonic()
QUIET_START_S = 60.0


def retriable_noise(line: str, now: float | None = None) -> bool:
    """Whether a librdkafka log line tells of a condition that librdkafka retries by itself,
    in the process's first minute (after it, the condition may be one that does not recover)."""
    now = time.monotonic() if now is None else now
    return now - _STARTED < QUIET_START_S and _RETRIABLE.search(line) is not None


# What varies between repeats of one condition: the time since the last state change, a count.
_VARYING = re.compile(
    r" \(after \d+ms in state \w+(?:, \d+ identical error\(s\) suppressed)?\)"
    r"|, \d+ identical error\(s\) suppressed")


class _Forward(logging.Handler):
    """librdkafka's log lines, less the retriable ones and repeats within a minute (a broker
    that is down is said once, not every 50 ms): a ``librdkafka`` event in a process that set
    up structured logging (the workers), else a line on stderr, as librdkafka prints them."""

    REPEAT_AFTER_S = 60.0

    def __init__(self) -> None:
        super().__init__()
        self._said: dict[str, float] = {}
        self._said_lock = threading.Lock()

    def _repeat(self, line: str) -> bool:
        key, now = _VARYING.sub("", line), time.monotonic()
        with self._said_lock:
            if now - self._said.get(key, -self.REPEAT_AFTER_S) < self.REPEAT_AFTER_S:
                return True
            if len(self._said) >= 1000:
                self._said.clear()
            self._said[key] = now
        return False

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        if retriable_noise(line) or self._repeat(line):
            return
        line = redact_text(line)  # a SASL error may quote what it was given
        if structlog.is_configured():
            structlog.get_logger().log(record.levelno, "librdkafka", line=line)
        else:
            # sys.stderr looked up now: a test or a redirect may have replaced it since.
            print(f"librdkafka {record.levelname.lower()}: {line}", file=sys.stderr)


# Every client hands its log lines to this logger while it polls. A client that never polls (the
# admin client, the offset readers of status) prints none: what it fails at is raised instead.
LIBRDKAFKA_LOG = logging.getLogger("vecpipe.librdkafka")
LIBRDKAFKA_LOG.addHandler(_Forward())
LIBRDKAFKA_LOG.setLevel(logging.DEBUG)  # librdkafka's own log_level decides what it sends
LIBRDKAFKA_LOG.propagate = False

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
    conf: dict[str, Any] = {"logger": LIBRDKAFKA_LOG, **defaults}
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
