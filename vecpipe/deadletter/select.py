"""Which dead-letter records an operator picked, and what replay does with each.

Pure functions over consumed records: no broker here, so every rule is unit-tested with fakes.
"""

from __future__ import annotations

import enum
import fnmatch
import json
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from vecpipe.deadletter.headers import DeadLetter
from vecpipe.errors import CommandError, InvalidMessage
from vecpipe.messages import DELETE, SCHEMA_HEADER, header_value, published_at

__all__ = [
    "Decision",
    "ErasedCheck",
    "Filters",
    "decide",
    "erasure_probe",
    "format_age",
    "parse_key_pattern",
    "parse_offsets",
    "source_topic",
]

# -- filters -------------------------------------------------------------------------------

def parse_offsets(text: str) -> tuple[int, int | None]:
    """``A-B`` (inclusive), ``A-`` (A to the end) or ``A`` (one offset) of the dead-letter topic."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:(-)\s*(\d+)?)?\s*", text)
    if match is None:
        raise CommandError(
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
        raise CommandError(
            f"--offsets {text!r} ends before it starts; write the lower offset first.")
    return start, end


def parse_key_pattern(text: str) -> Callable[[str], bool]:
    """A glob matched against the whole key (``tenant-a/*``), or a regex written ``re:EXPR`` or
    ``/EXPR/`` that is searched in the key."""
    if text.startswith("re:") or (len(text) > 1 and text.startswith("/") and text.endswith("/")):
        expr = text[3:] if text.startswith("re:") else text[1:-1]
        try:
            regex = re.compile(expr)
        except re.error as exc:
            raise CommandError(f"--key-pattern {text!r} is not a valid regular expression: "
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
    SKIP_TRUNCATED = "skipped_truncated"
    SKIP_ERASED = "skipped_erased"


# Told the records of a batch, a checker answers which positions a later deletion covers.
ErasedCheck = Callable[[Sequence[DeadLetter]], set[int]]


def erasure_probe(dead: DeadLetter) -> tuple[str, str | None, int | None, datetime] | None:
    """What a deletion would have to cover to erase ``dead``: its tenant, document and version
    (from the value when it can be read, else tenant and document from the key) and its publish
    time; None for a record that is no document's content (a delete, a key without a tenant)."""
    if header_value(dead.headers, SCHEMA_HEADER) == DELETE:
        return None
    tenant, doc, version = _identity_of(dead.value)
    key_tenant, slash, key_doc = dead.key_text.partition("/") if dead.key else ("", "", "")
    if not slash:
        key_tenant = key_doc = ""
    if tenant is None:
        tenant = key_tenant or None
    if tenant is None:
        return None
    doc = doc or (key_doc if tenant == key_tenant else "") or None
    try:
        # A time ahead of the clock (why the record may be here) is still when it was published.
        published = published_at(dead.headers, (1, dead.timestamp_ms or 0), check_clock=False)
    except InvalidMessage:
        published = datetime.fromtimestamp((dead.timestamp_ms or 0) / 1000, UTC)
    return tenant, doc, version, published


def _identity_of(value: bytes | None) -> tuple[str | None, str | None, int | None]:
    """The ``tenant_id``, ``doc_id`` and ``version`` of a chunk or embedding value, each None
    where it does not read as one."""
    if not value:
        return None, None, None
    try:
        if value[:1] != b"{":  # an embedding: a length-prefixed JSON block, then the vector
            (size,) = struct.unpack_from(">I", value)
            value = value[4:4 + size]
        obj = json.loads(value)
    except Exception:  # a dead letter is often unreadable: that is why it is here
        return None, None, None
    if not isinstance(obj, dict):
        return None, None, None
    tenant, doc, version = obj.get("tenant_id"), obj.get("doc_id"), obj.get("version")
    return (tenant if isinstance(tenant, str) and tenant else None,
            doc if isinstance(doc, str) and doc else None,
            version if isinstance(version, int) and 0 <= version < 2**63 else None)


def source_topic(dlq_topic: str, suffix: str) -> str | None:
    """The topic a dead-letter topic belongs to (``vecpipe.chunks`` for ``vecpipe.chunks.dlq``),
    or None when its name does not say."""
    if suffix and dlq_topic.endswith(suffix) and len(dlq_topic) > len(suffix):
        return dlq_topic[: -len(suffix)]
    return None


def decide(dead: DeadLetter, filters: Filters, max_replays: int, to: str | None,
           source: str | None) -> tuple[Decision, str | None]:
    """The decision for ``dead`` and, when it is replayed, the topic it goes to: ``to`` (the
    operator's ``--to``), else ``source``, the topic the dead-letter topic belongs to. Never the
    topic a record's own headers name: a record does not choose where it is sent.

    A record already replayed ``max_replays`` times stays on the dead-letter topic: replaying it
    again would only loop it through the same failure.
    """
    if not filters.matches(dead):
        return Decision.SKIP_FILTER, None
    if dead.truncated:
        # Cut to fit its dead-letter topic: sending it on would publish a broken record. The
        # original is still on its source topic (partition and offset in the headers).
        return Decision.SKIP_TRUNCATED, None
    if dead.replays >= max_replays:
        return Decision.SKIP_MAX_REPLAYS, None
    target = to or source
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
