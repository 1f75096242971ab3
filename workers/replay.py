"""``dlq replay``: send dead letters back to the topic they came from, once.

The replay is a member of its own consumer group (default ``vecpipe-dlq-replay.<dlq topic>``)
and stores its progress there only after the broker acknowledged the replayed records of a
batch (flush, then commit), so an interrupted replay resumes without sending anything twice.
It reads up to the high watermarks taken when it starts: records that fail again meanwhile
land behind them and wait for the next replay instead of looping at once.

A replayed record is sent anew, with a timestamp of now, so that the target topic's retention
counts from the replay; its original publish time travels in its ``vecpipe.published_at``
header (taken from its Kafka timestamp for a dead letter written before that header existed),
and that is what the writer orders it by against deletes.

Given a :class:`ReplayAudit` (``vecpipe dlq replay`` always gives one), a replay records itself
before it reads or sends anything, and does not run if it cannot; it reports its counts as it
goes and completes the record when it ends, however it ends. A record that cannot be completed
does not undo what was sent: the summary says so (``audit_problem``) and the log holds the counts.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from vecpipe.config import Config
from vecpipe.deadletter.headers import DeadLetter, replay_headers
from vecpipe.deadletter.select import Decision, ErasedCheck, Filters, decide, source_topic
from vecpipe.errors import ReplayError, VecpipeError
from vecpipe.kafka.admin import admin_client, committed_offsets, topic_partitions, watermarks
from vecpipe.kafka.consumer import StopFlag
from vecpipe.kafka.producer import DurableProducer
from vecpipe.kafka.reader import read_range, reader
from vecpipe.retry import call_with_retry

__all__ = [
    "ReplayAudit",
    "ReplayOptions",
    "ReplaySummary",
    "default_group",
    "replay",
]

_ASSIGN_TIMEOUT_S = 60.0
_PROGRESS_EVERY_S = 5.0

OnRecord = Callable[[DeadLetter, Decision, str | None], None]


class ReplayAudit(Protocol):
    """Where a replay records itself (``vecpipe.db.audit.ReplayAuditLog``). Each method raises
    :class:`ReplayError` with a sentence when it cannot write."""

    def started(self, topic: str, group: str, dry_run: bool) -> None:
        """Record the start; raising means the replay must not run."""

    def progress(self, counts: dict[str, Any]) -> None:
        """Record the counts so far (``ReplaySummary.to_json``)."""

    def finished(self, counts: dict[str, Any], ended: str | None, error: str | None) -> None:
        """Record the end: ``error`` is None when it ended well, else the sentence why not."""


def default_group(dlq_topic: str) -> str:
    """The consumer group that keeps a replay's progress through ``dlq_topic``."""
    return f"vecpipe-dlq-replay.{dlq_topic}"


@dataclass(frozen=True)
class ReplayOptions:
    """What to replay, where to, and how fast."""

    filters: Filters = field(default_factory=Filters)
    to: str | None = None
    group: str | None = None
    dry_run: bool = False
    limit: int | None = None
    rate: float | None = None
    from_beginning: bool = False
    # Which records a later deletion covers (asked of the database): they are never sent again,
    # so that erased text does not spread back into the pipeline's topics.
    erased: ErasedCheck | None = None


@dataclass
class ReplaySummary:
    """What a replay did (or, dry, would do)."""

    topic: str
    group: str
    dry_run: bool
    max_replays: int
    replayed: int = 0
    skipped_filter: int = 0
    skipped_max_replays: int = 0
    skipped_no_origin: int = 0
    skipped_truncated: int = 0
    skipped_erased: int = 0
    # end: reached the watermarks taken at start; limit: --limit; stopped: SIGINT/SIGTERM;
    # nothing_left: the group had already passed every record; halted: see ``halt_reason``.
    ended: str = "end"
    halt_reason: str = ""
    by_class: Counter[str] = field(default_factory=Counter)
    skipped_max_by_class: Counter[str] = field(default_factory=Counter)
    targets: Counter[str] = field(default_factory=Counter)
    # Why the audit record could not be completed (it stays 'running'), if it could not.
    audit_problem: str = ""

    def count(self, dead: DeadLetter, decision: Decision, target: str | None) -> None:
        """Add one decided record."""
        if decision is Decision.REPLAY:
            self.replayed += 1
            self.by_class[dead.error_class or "?"] += 1
            self.targets[target or "?"] += 1
        elif decision is Decision.SKIP_FILTER:
            self.skipped_filter += 1
        elif decision is Decision.SKIP_MAX_REPLAYS:
            self.skipped_max_replays += 1
            self.skipped_max_by_class[dead.error_class or "?"] += 1
        elif decision is Decision.SKIP_TRUNCATED:
            self.skipped_truncated += 1
        elif decision is Decision.SKIP_ERASED:
            self.skipped_erased += 1
        else:
            self.skipped_no_origin += 1

    def to_json(self) -> dict[str, Any]:
        """The summary as one JSON object (``dlq replay --json``)."""
        return {
            "topic": self.topic, "group": self.group, "dry_run": self.dry_run,
            "ended": self.ended, "halt_reason": self.halt_reason or None,
            "replayed": self.replayed,
            "skipped_by_filter": self.skipped_filter,
            "skipped_max_replays": self.skipped_max_replays,
            "skipped_no_origin": self.skipped_no_origin,
            "skipped_truncated": self.skipped_truncated,
            "skipped_erased": self.skipped_erased, "max_replays": self.max_replays,
            "by_error_class": dict(self.by_class),
            "skipped_max_replays_by_error_class": dict(self.skipped_max_by_class),
            "targets": dict(self.targets),
        }


class _Pacer:
    """At most ``rate`` records a second; waiting is cut short by the stop flag."""

    def __init__(self, rate: float | None, stop: StopFlag) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.stop = stop
        self.next_at = time.monotonic()

    def wait(self) -> None:
        if not self.interval:
            return
        while not self.stop.is_set():
            left = self.next_at - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, 0.2))
        self.next_at = max(self.next_at, time.monotonic()) + self.interval


def _existing_topics(consumer: Consumer) -> set[str]:
    return set(consumer.list_topics(timeout=10).topics)


class _Targets:
    """What replay checks of a target topic before sending there: it exists, and it is not the
    dead-letter topic itself."""

    def __init__(self, consumer: Consumer, source: str) -> None:
        self.consumer = consumer
        self.source = source
        self.existing = _existing_topics(consumer)

    def problem(self, dead: DeadLetter, target: str) -> str | None:
        """Why ``dead`` must not be sent to ``target``, or None."""
        where = f"record {dead.partition}:{dead.offset} of {self.source}"
        if target == self.source:
            return (f"{where} would go back to the dead-letter topic itself; replay it with "
                    "--to TOPIC.")
        if target not in self.existing:
            self.existing = _existing_topics(self.consumer)
            if target not in self.existing:
                return (f"{where} belongs to topic {target!r}, which does not exist any more; "
                        "create it or replay with --to TOPIC.")
        return None


def replay(
    cfg: Config, topic: str, opts: ReplayOptions, *, stop: StopFlag, log: Any,
    on_record: OnRecord | None = None, audit: ReplayAudit | None = None,
) -> ReplaySummary:
    """Replay the records of dead-letter ``topic`` that ``opts`` picks; see the module docstring.

    ``on_record`` hears about every record decided (replayed or skipped), after the decision
    and, for a replayed one, after it was queued for sending. ``audit`` records the replay:
    when its ``started`` raises, nothing is read or sent.
    """
    group = opts.group or default_group(topic)
    if opts.to == topic:
        raise ReplayError(
            f"--to {opts.to!r} is the dead-letter topic being replayed; that would loop the "
            "records forever. Name the topic the records should go back to."
        )
    summary = ReplaySummary(topic, group, opts.dry_run, cfg.dead_letter.max_replays)
    if audit is None:
        return _replay(cfg, topic, opts, summary, stop, log, on_record, lambda: None)
    audit.started(topic, group, opts.dry_run)
    try:
        _replay(cfg, topic, opts, summary, stop, log, on_record,
                lambda: _report(audit, summary, log))
    except BaseException as exc:
        _complete(audit, summary, None, _sentence(exc), log)
        raise
    _complete(audit, summary, summary.ended, summary.halt_reason or None, log)
    return summary


def _sentence(exc: BaseException) -> str:
    """What a failed replay's audit record says about why it failed."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, VecpipeError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _report(audit: ReplayAudit, summary: ReplaySummary, log: Any) -> None:
    """Store the counts so far; a replay does not stop for a progress report that failed."""
    try:
        audit.progress(summary.to_json())
    except ReplayError as exc:
        log.warning("replay_audit_progress_failed", problem=str(exc))


def _complete(audit: ReplayAudit, summary: ReplaySummary, ended: str | None,
              error: str | None, log: Any) -> None:
    """Complete the audit record. What was sent stays sent if that fails: the summary carries
    the problem, and this log line the final counts."""
    counts = summary.to_json()
    try:
        audit.finished(counts, ended, error)
    except ReplayError as exc:
        summary.audit_problem = str(exc)
        log.error("replay_audit_incomplete", problem=str(exc), failure=error, **counts)


def _replay(cfg: Config, topic: str, opts: ReplayOptions, summary: ReplaySummary,
            stop: StopFlag, log: Any, on_record: OnRecord | None,
            report: Callable[[], None]) -> ReplaySummary:
    """The replay proper, into ``summary``; ``report`` stores its progress."""
    group = summary.group
    consumer = reader(cfg.kafka, "dlq-replay", group=group)
    try:
        parts = topic_partitions(consumer, topic)
        if not parts:
            raise ReplayError(f"the dead-letter topic {topic!r} does not exist.")
        selected = sorted(set(parts) & opts.filters.partitions
                          if opts.filters.partitions is not None else parts)
        missing = sorted((opts.filters.partitions or frozenset()) - set(parts))
        if missing:
            raise ReplayError(
                f"--partition {', '.join(map(str, missing))} is not a partition of {topic} "
                f"(it has {len(parts)}: 0 to {len(parts) - 1})."
            )
        targets = _Targets(consumer, topic)
        if opts.to is not None and opts.to not in targets.existing:
            raise ReplayError(f"--to {opts.to!r} names a topic that does not exist; create it "
                              "first or check the name.")
        marks = watermarks(consumer, topic, selected)
        ends = {p: high for p, (_, high) in marks.items()}
        done = committed_offsets(consumer, topic, selected)
        starts = {p: low if opts.from_beginning else max(low, done.get(p, low))
                  for p, (low, _) in marks.items()}
        log.info("replay_started", topic=topic, group=group, dry_run=opts.dry_run,
                 partitions=selected, starts=starts, ends=ends)
        if opts.dry_run:
            _dry_run(consumer, cfg, topic, opts, starts, ends, summary, stop, on_record,
                     targets)
            return summary
        _check_group_idle(cfg, group)
        if opts.from_beginning:
            _reset_group(cfg, group, topic, {p: low for p, (low, _) in marks.items()})
        if all(starts[p] >= ends[p] for p in selected):
            summary.ended = "nothing_left"
            return summary
        _Replayer(consumer, cfg, topic, opts, set(selected), starts, ends, summary, stop,
                  on_record, targets, log, report).run()
        return summary
    finally:
        consumer.close()


def _decisions(deads: list[DeadLetter], cfg: Config, opts: ReplayOptions,
               source: str | None) -> list[tuple[Decision, str | None]]:
    """The decision and target of each record, a later deletion's cover included."""
    gone = opts.erased(deads) if opts.erased is not None and deads else set()
    out: list[tuple[Decision, str | None]] = []
    for i, dead in enumerate(deads):
        decision, target = decide(dead, opts.filters, cfg.dead_letter.max_replays, opts.to,
                                  source)
        if i in gone and decision is Decision.REPLAY:
            decision, target = Decision.SKIP_ERASED, None
        out.append((decision, target))
    return out


def _dry_run(consumer: Consumer, cfg: Config, topic: str, opts: ReplayOptions,
             starts: dict[int, int], ends: dict[int, int], summary: ReplaySummary,
             stop: StopFlag, on_record: OnRecord | None, targets: _Targets) -> None:
    """Decide like a replay, from the group's progress, but send and commit nothing."""
    if all(starts[p] >= ends[p] for p in starts):
        summary.ended = "nothing_left"
        return
    for msg in read_range(consumer, topic, starts, ends, stop=stop):
        dead = DeadLetter.of(msg)
        [(decision, target)] = _decisions([dead], cfg, opts,
                                          source_topic(topic, cfg.kafka.dlq_suffix))
        problem = targets.problem(dead, target) if target is not None else None
        if problem is not None:
            summary.ended, summary.halt_reason = "halted", problem
            return
        summary.count(dead, decision, target)
        if on_record is not None:
            on_record(dead, decision, target)
        if opts.limit is not None and summary.replayed >= opts.limit:
            summary.ended = "limit"
            return
    if stop.is_set():
        summary.ended = "stopped"


def _check_group_idle(cfg: Config, group: str) -> None:
    """Refuse to start while another replay holds the same group: both would send everything."""
    admin = admin_client(cfg.kafka)
    try:
        desc = admin.describe_consumer_groups([group], request_timeout=15)[group].result(20)
    except KafkaException as exc:
        if exc.args and isinstance(exc.args[0], KafkaError) \
                and exc.args[0].code() == KafkaError.GROUP_ID_NOT_FOUND:
            return
        raise
    if desc.members:
        hosts = ", ".join(sorted({f"{m.client_id}@{m.host}" for m in desc.members}))
        raise ReplayError(
            f"the replay group {group!r} has {len(desc.members)} active member(s) ({hosts}): "
            "another replay of this topic is running. Wait for it to end, or pass --group to "
            "keep separate progress."
        )


def _reset_group(cfg: Config, group: str, topic: str, lows: dict[int, int]) -> None:
    """--from-beginning: move the group back to the start, durably, before reading."""
    admin = admin_client(cfg.kafka)
    request = ConsumerGroupTopicPartitions(
        group, [TopicPartition(topic, p, low) for p, low in lows.items()])
    try:
        admin.alter_consumer_group_offsets([request], request_timeout=15)[group].result(20)
    except KafkaException as exc:
        raise ReplayError(
            f"could not reset the replay group {group!r} to the start of {topic}: "
            f"{exc.args[0]}. Is another replay running with this group?"
        ) from None


class _Replayer:
    """The replay loop proper: consume a batch, produce, flush, commit, until the ends."""

    def __init__(self, consumer: Consumer, cfg: Config, topic: str, opts: ReplayOptions,
                 selected: set[int], starts: dict[int, int], ends: dict[int, int],
                 summary: ReplaySummary, stop: StopFlag, on_record: OnRecord | None,
                 targets: _Targets, log: Any, report: Callable[[], None]) -> None:
        self.consumer = consumer
        self.cfg = cfg
        self.topic = topic
        self.opts = opts
        self.selected = selected
        self.ends = ends
        self.summary = summary
        self.stop = stop
        self.on_record = on_record
        self.targets = targets
        self.log = log
        self.report = report
        self.assigned: set[int] = set()
        self.done = {p for p in selected if starts[p] >= ends[p]}
        self.source = source_topic(topic, cfg.kafka.dlq_suffix)
        self.producer = DurableProducer(cfg.kafka)
        self.pacer = _Pacer(opts.rate, stop)
        self.batch_size = max(1, min(500, int(opts.rate))) if opts.rate else 500

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.assign(partitions)
        others = [tp for tp in partitions if tp.partition not in self.selected]
        if others:
            consumer.pause(others)
        self.assigned.update(tp.partition for tp in partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Nothing is in flight here: every batch was flushed and committed before this poll.
        self.assigned.difference_update(tp.partition for tp in partitions)

    def _finished(self) -> bool:
        mine = self.assigned & self.selected
        return bool(self.assigned) and mine <= self.done

    def run(self) -> None:
        self.consumer.subscribe([self.topic], on_assign=self._on_assign,
                                on_revoke=self._on_revoke)
        waiting_since = time.monotonic()
        last_report = time.monotonic()
        try:
            while True:
                if self.stop.is_set():
                    self.summary.ended = "stopped"
                    break
                if self._finished():
                    self.summary.ended = "end"
                    break
                if self._limit_reached():
                    self.summary.ended = "limit"
                    break
                if not self.assigned and time.monotonic() - waiting_since > _ASSIGN_TIMEOUT_S:
                    raise ReplayError(
                        f"no partition of {self.topic} was assigned to the replay group "
                        f"{self.summary.group!r} within {_ASSIGN_TIMEOUT_S:.0f} s; is another "
                        "replay holding it?"
                    )
                msgs = self.consumer.consume(num_messages=self._room(), timeout=0.5)
                halt = self._batch(msgs)
                if halt is not None:
                    self.summary.ended, self.summary.halt_reason = "halted", halt
                    break
                if time.monotonic() - last_report >= _PROGRESS_EVERY_S:
                    last_report = time.monotonic()
                    self.log.info("replay_progress", **self.summary.to_json())
                    self.report()  # after the commit: these counts were all acknowledged
        finally:
            self.producer.close()

    def _limit_reached(self, pending: int = 0) -> bool:
        return (self.opts.limit is not None
                and self.summary.replayed + pending >= self.opts.limit)

    def _room(self) -> int:
        if self.opts.limit is None:
            return self.batch_size
        return max(1, min(self.batch_size, self.opts.limit - self.summary.replayed))

    def _batch(self, msgs: list[Any]) -> str | None:
        """Decide and send one batch, flush, then commit; return why it must halt, if it must."""
        progress: dict[int, int] = {}
        # Counted into the summary only once the broker has acknowledged them: the audit row
        # of a replay that fails at a flush must not claim records that were never delivered.
        decided_here: list[tuple[DeadLetter, Decision, str | None]] = []
        halt: str | None = None
        deads = {id(m): DeadLetter.of(m) for m in msgs if m.error() is None}
        decided = dict(zip(deads, _decisions(list(deads.values()), self.cfg, self.opts,
                                             self.source), strict=True))
        for msg in msgs:
            err = msg.error()
            p = msg.partition() or 0
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self.done.add(p)
                elif err.fatal():
                    raise KafkaException(err)
                else:
                    self.log.warning("consume_error", error=err.str())
                continue
            if p not in self.selected or p in self.done:
                continue
            offset = msg.offset() or 0
            if offset >= self.ends[p]:
                self.done.add(p)  # arrived after the replay started: the next replay's work
                continue
            pending = sum(1 for _, d, _ in decided_here if d is Decision.REPLAY)
            if self.stop.is_set() or self._limit_reached(pending):
                break
            dead = deads[id(msg)]
            decision, target = decided[id(msg)]
            if target is not None:
                halt = self.targets.problem(dead, target)
                if halt is not None:
                    break
                self.pacer.wait()
                # Sent anew (a timestamp of now); the publish time travels in its header.
                self.producer.produce(target, dead.value, key=dead.key,
                                      headers=replay_headers(dead))
            decided_here.append((dead, decision, target))
            if self.on_record is not None:
                self.on_record(dead, decision, target)
            progress[p] = offset + 1
            if offset + 1 >= self.ends[p] or self.opts.filters.past_end(p, offset + 1):
                self.done.add(p)
        self._flush_and_commit(progress, decided_here)
        return halt

    def _flush_and_commit(self, progress: dict[int, int],
                          decided: list[tuple[DeadLetter, Decision, str | None]]) -> None:
        """Only acknowledged records count as done: flush first, count, then store the
        progress."""
        if not progress:
            return
        call_with_retry(self.cfg.retry, self.producer.flush)
        for dead, decision, target in decided:
            self.summary.count(dead, decision, target)
        offsets = [TopicPartition(self.topic, p, o) for p, o in sorted(progress.items())]

        def commit() -> None:
            self.consumer.commit(offsets=offsets, asynchronous=False)

        try:
            call_with_retry(self.cfg.retry, commit)
        except KafkaException as exc:
            raise ReplayError(
                f"the replayed records were delivered but the replay group "
                f"{self.summary.group!r} could not store its progress ({exc.args[0]}); a new "
                "replay may send some of them again, which the database absorbs."
            ) from None
