"""What a dead-letter record says, which ones an operator picked, and how one is replayed.

Pure functions over consumed records: no broker here, so every rule is unit-tested with fakes.
"""

from __future__ import annotations

import enum
import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from vecpipe.deadletter import (
    ERROR_PREFIXES,
    H_ATTEMPTS,
    H_CLASS,
    H_FIRST_FAILED,
    H_MESSAGE,
    H_OFFSET,
    H_PARTITION,
    H_REPLAYS,
    H_STAGE,
    H_TOPIC,
    H_WORKER,
)
from vecpipe.messages import HeaderLike, Headers, header_list

__all__ = [
    "DeadLetter",
    "Decision",
    "Filters",
    "RecordView",
    "decide",
    "format_age",
    "parse_key_pattern",
    "parse_offsets",
    "parse_time",
    "replay_headers",
]

# Kafka's timestamp type for a record without one (confluent_kafka.TIMESTAMP_NOT_AVAILABLE).
_NO_TIMESTAMP = 0


class RecordView(Protocol):
    """What is read of a consumed dead-letter record (confluent_kafka.Message has it)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> str | bytes | None: ...
    def value(self) -> str | bytes | None: ...
    def headers(self) -> HeaderLike: ...
    def timestamp(self) -> tuple[int, int]: ...


def _last(headers: Headers, name: str) -> str | None:
    found: str | None = None
    for key, value in headers:
        if key == name:
            found = value.decode("utf-8", "replace")
    return found


def _int(text: str | None, default: int | None = None) -> int | None:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _bytes(data: str | bytes | None) -> bytes | None:
    return data.encode() if isinstance(data, str) else data


@dataclass(frozen=True)
class DeadLetter:
    """One record of a dead-letter topic: where it sits, the original record, and its error."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int | None
    original_topic: str | None
    original_partition: int | None
    original_offset: int | None
    error_class: str
    error_message: str
    stage: str
    worker: str
    attempts: int
    replays: int
    first_failed_at: datetime | None

    @classmethod
    def of(cls, record: RecordView) -> DeadLetter:
        """Read a consumed record; missing or garbled error headers become empty values."""
        headers = header_list(record.headers())
        ts_type, ts = record.timestamp()
        return cls(
            topic=record.topic() or "",
            partition=record.partition() or 0,
            offset=record.offset() or 0,
            key=_bytes(record.key()),
            value=_bytes(record.value()),
            headers=headers,
            timestamp_ms=ts if ts_type != _NO_TIMESTAMP and ts > 0 else None,
            original_topic=_last(headers, H_TOPIC) or None,
            original_partition=_int(_last(headers, H_PARTITION)),
            original_offset=_int(_last(headers, H_OFFSET)),
            error_class=_last(headers, H_CLASS) or "",
            error_message=_last(headers, H_MESSAGE) or "",
            stage=_last(headers, H_STAGE) or "",
            worker=_last(headers, H_WORKER) or "",
            attempts=_int(_last(headers, H_ATTEMPTS), 0) or 0,
            replays=_int(_last(headers, H_REPLAYS), 0) or 0,
            first_failed_at=_time(_last(headers, H_FIRST_FAILED)),
        )

    @property
    def failed_at(self) -> datetime | None:
        """When it first failed; for a record without that header, when it was published."""
        if self.first_failed_at is not None:
            return self.first_failed_at
        if self.timestamp_ms is not None:
            return datetime.fromtimestamp(self.timestamp_ms / 1000, UTC)
        return None

    @property
    def short_class(self) -> str:
        """The exception class without its module: ``PermanentError``."""
        return self.error_class.rsplit(".", 1)[-1] or "?"

    @property
    def key_text(self) -> str:
        """The key as text, for display and pattern matching."""
        return (self.key or b"").decode("utf-8", "replace")

    def age(self, now: datetime) -> timedelta | None:
        """Time since it first failed."""
        when = self.failed_at
        return now - when if when is not None else None

    def to_json(self, now: datetime) -> dict[str, Any]:
        """The JSON form that ``dlq inspect --json`` prints, one object per record."""
        age = self.age(now)
        return {
            "dlq_topic": self.topic,
            "dlq_partition": self.partition,
            "dlq_offset": self.offset,
            "key": self.key_text if self.key is not None else None,
            "error_class": self.error_class,
            "error_message": self.error_message,
            "original_topic": self.original_topic,
            "original_partition": self.original_partition,
            "original_offset": self.original_offset,
            "stage": self.stage,
            "worker": self.worker,
            "attempts": self.attempts,
            "replays": self.replays,
            "first_failed_at": self.failed_at.isoformat() if self.failed_at else None,
            "age_s": round(age.total_seconds(), 3) if age is not None else None,
            "timestamp_ms": self.timestamp_ms,
            "value_bytes": len(self.value or b""),
        }


def replay_headers(dead: DeadLetter) -> Headers:
    """The headers of the replayed record: the original ones, first-failed-at, replays + 1.

    Error headers of the last failure go (a new failure writes fresh ones); first-failed-at
    stays, so an operator sees how long a record has been failing across replays.
    """
    kept = [(k, v) for k, v in dead.headers
            if not k.startswith(ERROR_PREFIXES) and k != H_REPLAYS]
    first = next((v for k, v in reversed(dead.headers) if k == H_FIRST_FAILED), None)
    if first is not None:
        kept.append((H_FIRST_FAILED, first))
    kept.append((H_REPLAYS, str(dead.replays + 1).encode()))
    return kept


# -- filters -------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(w|d|h|m|s)", re.I)
_UNIT_S = {"w": 604_800, "d": 86_400, "h": 3600, "m": 60, "s": 1}


def parse_time(text: str, now: datetime, flag: str = "--since") -> datetime:
    """An ISO 8601 time (UTC unless it says otherwise) or a duration back from ``now``: 2h, 1d12h.

    Raises ValueError with a sentence naming ``flag`` when it is neither.
    """
    raw = text.strip()
    compact = raw.replace(" ", "")
    if compact and _DURATION.sub("", compact) == "":
        seconds = sum(float(n) * _UNIT_S[u.lower()] for n, u in _DURATION.findall(compact))
        return now - timedelta(seconds=seconds)
    when = _time(raw.replace("Z", "+00:00") if raw.endswith("Z") else raw)
    if when is None:
        raise ValueError(
            f"{flag} {text!r} is neither an ISO 8601 time (2024-05-01T03:00:00Z) nor a "
            "duration back from now (90s, 15m, 2h, 1d12h, 1w)."
        )
    return when


def parse_offsets(text: str) -> tuple[int, int | None]:
    """``A-B`` (inclusive), ``A-`` (A to the end) or ``A`` (one offset) of the dead-letter topic."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:(-)\s*(\d+)?)?\s*", text)
    if match is None:
        raise ValueError(
            f"--offsets {text!r} is not a range of dead-letter offsets; write A-B (inclusive), "
            "A- (from A to the end) or A (one offset), e.g. 100-250."
        )
    start = int(match.group(1))
    end: int | None
    if match.group(2) is None:
        end = start
    else:
        end = int(match.group(3)) if match.group(3) is not None else None
    if end is not None and end < start:
        raise ValueError(f"--offsets {text!r} ends before it starts; write the lower offset first.")
    return start, end


def parse_key_pattern(text: str) -> Callable[[str], bool]:
    """A glob matched against the whole key (``tenant-a/*``), or a regex written ``re:EXPR`` or
    ``/EXPR/`` that is searched in the key."""
    if text.startswith("re:") or (len(text) > 1 and text.startswith("/") and text.endswith("/")):
        expr = text[3:] if text.startswith("re:") else text[1:-1]
        try:
            regex = re.compile(expr)
        except re.error as exc:
            raise ValueError(f"--key-pattern {text!r} is not a valid regular expression: "
                             f"{exc}.") from None
        return lambda key: regex.search(key) is not None
    return lambda key: fnmatch.fnmatchcase(key, text)


@dataclass(frozen=True)
class Filters:
    """Which dead-letter records an operator picked; an unset filter lets everything through.

    ``partitions`` and ``offsets`` are positions on the dead-letter topic (the first column of
    ``dlq inspect``); ``since``/``until`` compare with the time a record first failed.
    """

    error_class: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    partitions: frozenset[int] | None = None
    offsets: tuple[int, int | None] | None = None
    key_pattern: str | None = None

    def __post_init__(self) -> None:
        if self.key_pattern is not None:
            parse_key_pattern(self.key_pattern)  # fail at start, not on the first record

    @property
    def active(self) -> bool:
        """True when any filter is set."""
        return any(v is not None for v in (self.error_class, self.since, self.until,
                                           self.partitions, self.offsets, self.key_pattern))

    def past_end(self, partition: int, offset: int) -> bool:
        """True once ``offset`` is beyond ``--offsets``: the rest of the partition cannot match."""
        return self.offsets is not None and self.offsets[1] is not None \
            and offset > self.offsets[1]

    def matches(self, dead: DeadLetter) -> bool:
        """True when ``dead`` passes every filter that is set."""
        if self.partitions is not None and dead.partition not in self.partitions:
            return False
        if self.offsets is not None:
            start, end = self.offsets
            if dead.offset < start or (end is not None and dead.offset > end):
                return False
        if self.error_class is not None \
                and self.error_class.lower() not in dead.error_class.lower():
            return False
        if self.since is not None or self.until is not None:
            when = dead.failed_at
            if when is None:
                return False
            if self.since is not None and when < self.since:
                return False
            if self.until is not None and when > self.until:
                return False
        return self.key_pattern is None or parse_key_pattern(self.key_pattern)(dead.key_text)


class Decision(enum.Enum):
    """What replay does with one dead-letter record."""

    REPLAY = "replay"
    SKIP_FILTER = "skipped_by_filter"
    SKIP_MAX_REPLAYS = "skipped_max_replays"
    SKIP_NO_ORIGIN = "skipped_no_origin"


def decide(dead: DeadLetter, filters: Filters, max_replays: int,
           to: str | None) -> tuple[Decision, str | None]:
    """The decision for ``dead`` and, when it is replayed, the topic it goes to.

    A record already replayed ``max_replays`` times stays on the dead-letter topic: replaying it
    again would only loop it through the same failure.
    """
    if not filters.matches(dead):
        return Decision.SKIP_FILTER, None
    if dead.replays >= max_replays:
        return Decision.SKIP_MAX_REPLAYS, None
    target = to or dead.original_topic
    if not target:
        return Decision.SKIP_NO_ORIGIN, None
    return Decision.REPLAY, target


def format_age(age: timedelta | None) -> str:
    """A short age for a table: 45s, 12m, 3h05m, 2d04h."""
    if age is None:
        return "?"
    s = max(0, int(age.total_seconds()))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86_400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86_400}d{s % 86_400 // 3600:02d}h"
