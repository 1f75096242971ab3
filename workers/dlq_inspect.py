"""Reading a dead-letter topic without disturbing it, and ``dlq inspect``'s table.

The reader assigns partitions itself under a throwaway group id and never commits: no consumer
group is created, no worker's or replay's progress moves.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, TopicPartition

from vecpipe.config import KafkaConfig
from vecpipe.consumer import StopFlag, consumer_config
from workers.dlq_records import DeadLetter, Filters, format_age

__all__ = [
    "InspectSummary",
    "Watermarks",
    "committed_offsets",
    "inspect",
    "now_utc",
    "read_dead_letters",
    "reader",
    "render_row",
    "render_summary",
    "table_header",
    "topic_partitions",
    "watermarks",
]

Watermarks = dict[int, tuple[int, int]]


def topic_partitions(consumer: Consumer, topic: str, timeout: float = 10.0) -> list[int]:
    """The partition ids of ``topic``; empty when the topic does not exist."""
    meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
    if meta is None or meta.error is not None:
        return []
    return sorted(meta.partitions)


def watermarks(consumer: Consumer, topic: str, partitions: list[int],
               timeout: float = 10.0) -> Watermarks:
    """(low, high) offsets of each partition now; reading stops at ``high``."""
    out: Watermarks = {}
    for p in partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
        out[p] = (int(low), int(high))
    return out


def reader(kafka: KafkaConfig, purpose: str, group: str | None = None) -> Consumer:
    """A consumer that commits nothing; ``group`` only lets it read that group's offsets."""
    return Consumer(consumer_config(
        kafka, group or f"vecpipe-dlq-{purpose}-{os.urandom(4).hex()}",
        **{"enable.auto.commit": False, "enable.partition.eof": True,
           "statistics.interval.ms": 0, "partition.assignment.strategy": "range"}))


def read_dead_letters(
    consumer: Consumer, topic: str, starts: dict[int, int], ends: dict[int, int], *,
    stop: StopFlag, follow: bool = False, poll_s: float = 0.5,
) -> Iterator[DeadLetter]:
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
            yield DeadLetter.of(msg)


@dataclass
class InspectSummary:
    """What ``dlq inspect`` saw."""

    topic: str
    on_topic: int = 0
    matched: int = 0
    listed: int = 0
    by_class: Counter[str] = field(default_factory=Counter)
    by_stage: Counter[str] = field(default_factory=Counter)
    max_replays_reached: int = 0


def inspect(
    kafka: KafkaConfig, topic: str, *, filters: Filters, limit: int | None, follow: bool,
    max_replays: int, stop: StopFlag, emit: Callable[[DeadLetter], None],
) -> InspectSummary:
    """Read ``topic`` from its start to its current end (or on, with ``follow``).

    ``emit`` gets the records that pass ``filters``, at most ``limit`` of them; the counts cover
    every matching record up to the end. With ``follow``, ``limit`` ends the command instead.
    """
    consumer = reader(kafka, "inspect")
    try:
        parts = topic_partitions(consumer, topic)
        marks = watermarks(consumer, topic, parts)
        if filters.partitions is not None:
            marks = {p: m for p, m in marks.items() if p in filters.partitions}
        summary = InspectSummary(topic, on_topic=sum(h - lo for lo, h in marks.values()))
        starts = {p: max(lo, filters.offsets[0]) if filters.offsets else lo
                  for p, (lo, _) in marks.items()}
        ends = {p: h for p, (_, h) in marks.items()}
        for dead in read_dead_letters(consumer, topic, starts, ends, stop=stop, follow=follow):
            if not filters.matches(dead):
                continue
            summary.matched += 1
            summary.by_class[dead.error_class or "?"] += 1
            summary.by_stage[dead.stage or "?"] += 1
            summary.max_replays_reached += dead.replays >= max_replays
            if limit is None or summary.listed < limit:
                summary.listed += 1
                emit(dead)
            elif follow:
                break
        return summary
    finally:
        consumer.close()


# -- rendering -------------------------------------------------------------------------------

_COLUMNS = (("DLQ P:OFFSET", 12), ("AGE", 6), ("STAGE", 5), ("ERROR CLASS", 20),
            ("ORIGIN TOPIC[P]@OFFSET", 30), ("TRIES", 5), ("REPLAYS", 7), ("KEY", 24))


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table_header() -> str:
    """The column titles of the inspect table."""
    return "  ".join(name.ljust(w) for name, w in _COLUMNS) + "  MESSAGE"


def render_row(dead: DeadLetter, now: datetime, as_json: bool = False) -> str:
    """One record as a table line, or as one JSON object."""
    if as_json:
        return json.dumps(dead.to_json(now), ensure_ascii=False)
    origin = (f"{dead.original_topic}[{dead.original_partition}]@{dead.original_offset}"
              if dead.original_topic else "-")
    cells = (f"{dead.partition}:{dead.offset}", format_age(dead.age(now)), dead.stage or "-",
             dead.short_class, origin, str(dead.attempts), str(dead.replays), dead.key_text)
    line = "  ".join(_cut(c, w).ljust(w) for c, (_, w) in zip(cells, _COLUMNS, strict=True))
    return f"{line}  {_cut(dead.error_message, 120)}"


def render_summary(s: InspectSummary, filters: Filters, max_replays: int,
                   limit: int | None) -> list[str]:
    """Counts by error class (and stage) after the table."""
    lines = [""]
    what = "matching record(s)" if filters.active else "record(s)"
    lines.append(f"{s.matched} {what} on {s.topic} ({s.on_topic} on the topic when the scan "
                 f"began)" + (f", {s.listed} listed (--limit {limit})"
                              if limit is not None and s.listed < s.matched else ""))
    if s.by_class:
        lines.append("by error class:")
        width = max(len(str(n)) for n in s.by_class.values())
        for cls, n in s.by_class.most_common():
            lines.append(f"  {str(n).rjust(width)}  {cls}")
        lines.append("by stage: " + ", ".join(f"{st} {n}" for st, n in s.by_stage.most_common()))
    if s.max_replays_reached:
        lines.append(f"{s.max_replays_reached} record(s) were already replayed {max_replays} "
                     "time(s) (dead_letter.max_replays); replay skips them, fix their cause "
                     "first.")
    return lines


def now_utc() -> datetime:
    """The current time, in UTC."""
    return datetime.now(UTC)


def committed_offsets(consumer: Consumer, topic: str, partitions: list[int]) -> dict[int, int]:
    """The committed offset of each partition for the consumer's group, where there is one."""
    tps = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
    return {tp.partition: tp.offset for tp in tps if tp.offset != OFFSET_INVALID}
