"""Reading a dead-letter topic without disturbing it: what ``dlq inspect`` lists and counts,
and how it prints them.

The reader assigns partitions itself under a throwaway group id and never commits: no consumer
group is created, no worker's or replay's progress moves.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from vecpipe.config import KafkaConfig
from vecpipe.deadletter.headers import DeadLetter
from vecpipe.deadletter.select import ErasedCheck, Filters, format_age
from vecpipe.kafka.admin import topic_partitions, watermarks
from vecpipe.kafka.reader import StopLike, read_range, reader

__all__ = [
    "InspectSummary",
    "inspect",
    "printable",
    "render_row",
    "render_summary",
    "table_header",
]


# Records asked of the database at once, whether a later deletion covers them.
_ERASED_BATCH = 200


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
    # Covered by a later deletion: neither listed nor counted above.
    erased: int = 0


def inspect(
    kafka: KafkaConfig, topic: str, *, filters: Filters, limit: int | None, follow: bool,
    max_replays: int, stop: StopLike, emit: Callable[[DeadLetter], None],
    erased: ErasedCheck | None = None,
) -> InspectSummary:
    """Read ``topic`` from its start to its current end (or on, with ``follow``).

    ``emit`` gets the records that pass ``filters``, at most ``limit`` of them; the counts cover
    every matching record up to the end. With ``follow``, ``limit`` ends the command instead.
    Records that ``erased`` says a later deletion covers are only counted (``erased``): their
    text is not shown again.
    """
    consumer = reader(kafka, "dlq-inspect")
    try:
        parts = topic_partitions(consumer, topic)
        marks = watermarks(consumer, topic, parts)
        if filters.partitions is not None:
            marks = {p: m for p, m in marks.items() if p in filters.partitions}
        summary = InspectSummary(topic, on_topic=sum(h - lo for lo, h in marks.values()))
        starts = {p: max(lo, filters.offsets[0]) if filters.offsets else lo
                  for p, (lo, _) in marks.items()}
        ends = {p: h for p, (_, h) in marks.items()}
        batch: list[DeadLetter] = []

        def settle() -> bool:
            """Count and list the batch; False once --limit ends a --follow."""
            gone = erased(batch) if erased is not None and batch else set()
            for i, dead in enumerate(batch):
                if i in gone:
                    summary.erased += 1
                    continue
                summary.matched += 1
                summary.by_class[dead.error_class or "?"] += 1
                summary.by_stage[dead.stage or "?"] += 1
                summary.max_replays_reached += dead.replays >= max_replays
                if limit is None or summary.listed < limit:
                    summary.listed += 1
                    emit(dead)
                elif follow:
                    return False
            batch.clear()
            return True

        for msg in read_range(consumer, topic, starts, ends, stop=stop, follow=follow):
            dead = DeadLetter.of(msg)
            if filters.matches(dead):
                batch.append(dead)
            # Asked in batches, so that checking deletions costs one query per few hundred;
            # a --follow shows each record as it arrives.
            if (follow or len(batch) >= _ERASED_BATCH) and not settle():
                return summary
        settle()
        return summary
    finally:
        consumer.close()


# -- rendering -------------------------------------------------------------------------------

_COLUMNS = (("DLQ P:OFFSET", 12), ("AGE", 6), ("STAGE", 5), ("ERROR CLASS", 20),
            ("ORIGIN TOPIC[P]@OFFSET", 30), ("TRIES", 5), ("REPLAYS", 7), ("KEY", 24))


def printable(text: str) -> str:
    """``text`` safe for a terminal: whitespace runs folded to one space, and every control or
    format character (an escape sequence, a bell, a right-to-left override) shown as its escape,
    so that a key or an error message cannot rewrite the operator's screen."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in " ".join(text.split()))


def _cut(text: str, width: int) -> str:
    text = printable(text)
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
    if s.erased:
        lines.append(f"{s.erased} record(s) are covered by a later deletion and not shown; "
                     "replay skips them, and the topic's retention removes them.")
    if s.max_replays_reached:
        lines.append(f"{s.max_replays_reached} record(s) were already replayed {max_replays} "
                     "time(s) (dead_letter.max_replays); replay skips them, fix their cause "
                     "first.")
    return lines
