"""Dead letters: send a failed record on with its error, and stop a worker that fails too often.

A dead-letter record keeps the original key, value, headers and timestamp, and adds Kafka
Connect's ``__connect.errors.*`` headers plus vecpipe's stage, worker, attempts and
first-failed-at (see ``schemas/dead-letter-headers.v1.json``).
"""

from __future__ import annotations

import traceback
from collections import deque
from datetime import UTC, datetime
from typing import Protocol

from vecpipe.config import DeadLetterConfig, KafkaConfig
from vecpipe.messages import HeaderLike, header_list
from vecpipe.producer import DurableProducer

__all__ = [
    "ERROR_PREFIXES",
    "H_ATTEMPTS",
    "H_CLASS",
    "H_FIRST_FAILED",
    "H_MESSAGE",
    "H_OFFSET",
    "H_PARTITION",
    "H_REPLAYS",
    "H_STACK",
    "H_STAGE",
    "H_TOPIC",
    "H_WORKER",
    "DeadLetterGuard",
    "DeadLetterRateExceeded",
    "DeadLetters",
    "RecordLike",
]

H_TOPIC = "__connect.errors.topic"
H_PARTITION = "__connect.errors.partition"
H_OFFSET = "__connect.errors.offset"
H_CLASS = "__connect.errors.exception.class.name"
H_MESSAGE = "__connect.errors.exception.message"
H_STACK = "__connect.errors.exception.stacktrace"
H_STAGE = "__connect.errors.stage"
H_WORKER = "vecpipe.errors.worker"
H_ATTEMPTS = "vecpipe.errors.attempts"
H_FIRST_FAILED = "vecpipe.errors.first.failed.at"
H_REPLAYS = "vecpipe.replay.count"
ERROR_PREFIXES = ("__connect.errors.", "vecpipe.errors.")
_MAX_STACK = 8000
# An error message quoting its input (a database error echoing a 5 MB value) is cut to this.
_MAX_MESSAGE = 2000


def _capped(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class RecordLike(Protocol):
    """What a dead letter needs of a consumed record (confluent_kafka.Message has it)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> str | bytes | None: ...
    def value(self) -> str | bytes | None: ...
    def headers(self) -> HeaderLike: ...
    def timestamp(self) -> tuple[int, int]: ...


class DeadLetterRateExceeded(RuntimeError):
    """Too much of the input is failing: most likely a bad deploy, not bad records."""


def _first(headers: list[tuple[str, bytes]], name: str) -> bytes | None:
    return next((v for k, v in headers if k == name), None)


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
        original = header_list(record.headers())
        kept = [(k, v) for k, v in original if not k.startswith(ERROR_PREFIXES)]
        first_failed = _first(original, H_FIRST_FAILED) or datetime.now(UTC).isoformat().encode()
        stack = "".join(traceback.format_exception(exc))[-_MAX_STACK:]
        headers = [
            *kept,
            (H_TOPIC, topic.encode()),
            (H_PARTITION, str(record.partition()).encode()),
            (H_OFFSET, str(record.offset()).encode()),
            (H_CLASS, f"{type(exc).__module__}.{type(exc).__qualname__}".encode()),
            (H_MESSAGE, _capped(str(exc), _MAX_MESSAGE).encode("utf-8", "replace")),
            (H_STACK, stack.encode("utf-8", "replace")),
            (H_STAGE, self.stage.encode()),
            (H_WORKER, self.worker_id.encode()),
            (H_ATTEMPTS, str(attempts).encode()),
            (H_FIRST_FAILED, first_failed),
        ]
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


class DeadLetterGuard:
    """Trips when more than ``max_ratio`` of the last ``window`` records, or ``max_consecutive``
    records in a row, went to the dead-letter topic."""

    def __init__(self, cfg: DeadLetterConfig) -> None:
        self.cfg = cfg
        self._recent: deque[bool] = deque(maxlen=cfg.window)
        self._consecutive = 0

    def record(self, failed: bool) -> None:
        """Note one record's outcome; raise :class:`DeadLetterRateExceeded` when over the cap."""
        self._recent.append(failed)
        self._consecutive = self._consecutive + 1 if failed else 0
        if self._consecutive >= self.cfg.max_consecutive:
            raise DeadLetterRateExceeded(
                f"{self._consecutive} records in a row went to the dead-letter topic "
                f"(dead_letter.max_consecutive={self.cfg.max_consecutive}); stopping so that a "
                "bad deploy does not drain the topic. Inspect with 'vecpipe dlq inspect'."
            )
        if len(self._recent) == self._recent.maxlen:
            ratio = sum(self._recent) / len(self._recent)
            if ratio > self.cfg.max_ratio:
                raise DeadLetterRateExceeded(
                    f"{ratio:.0%} of the last {len(self._recent)} records went to the dead-letter "
                    f"topic (dead_letter.max_ratio={self.cfg.max_ratio}); stopping so that a bad "
                    "deploy does not drain the topic. Inspect with 'vecpipe dlq inspect'."
                )
