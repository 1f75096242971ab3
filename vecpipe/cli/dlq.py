"""``vecpipe dlq inspect`` and ``vecpipe dlq replay``: what failed and why, then send it back.

inspect reads a dead-letter topic without moving any consumer group; replay sends the records an
operator picked back to their original topic (see ``workers.replay`` for its guarantees), and
records who ran it, with which flags and to what effect, in the database's replay_audit
(``vecpipe audit --replays``) before it sends anything.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from vecpipe.cli.common import (
    add_db_flags,
    add_kafka_flags,
    config_from_args,
    parse_time,
    partition_list,
    positive_float,
    positive_int,
)
from vecpipe.config import Config
from vecpipe.errors import CommandError, Unreachable

if TYPE_CHECKING:
    from vecpipe.deadletter.headers import DeadLetter
    from vecpipe.deadletter.select import Decision, ErasedCheck, Filters
    from vecpipe.kafka.consumer import StopFlag
    from workers.replay import ReplaySummary

# Only argparse work happens at import: every ``vecpipe`` command builds this parser, so the
# Kafka client, numpy and friends load in the handlers, when a dlq command actually runs.

__all__ = [
    "cmd_inspect",
    "cmd_replay",
    "register",
    "render_replay_summary",
    "replay_actor",
    "replay_selection",
    "resolve_topic",
]

EXIT_INTERRUPTED = 130
# The replay ran and its records were delivered, but its audit record could not be completed.
EXIT_AUDIT_INCOMPLETE = 4


# -- arguments ------------------------------------------------------------------------------

def _add_filter_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (all that are given must match)")
    g.add_argument("--error-class", metavar="TEXT",
                   help="exception class contains TEXT (case-insensitive), e.g. PermanentError")
    g.add_argument("--since", metavar="WHEN",
                   help="first failed at or after WHEN: ISO 8601 time or a duration back "
                        "from now (30m, 2h, 1d)")
    g.add_argument("--until", metavar="WHEN", help="first failed at or before WHEN (as --since)")
    g.add_argument("--partition", type=partition_list, action="extend", metavar="P[,P...]",
                   help="partition(s) of the dead-letter topic (repeatable)")
    g.add_argument("--offsets", metavar="A-B",
                   help="offsets of the dead-letter topic: A-B inclusive, A- or A")
    g.add_argument("--key-pattern", metavar="PATTERN",
                   help="record key matches a glob (tenant-a/*) or a regex written re:EXPR "
                        "or /EXPR/")
    p.add_argument("--max-replays", type=positive_int, metavar="N",
                   help="records already replayed N times are not replayed again "
                        "(dead_letter.max_replays, VECPIPE_DEAD_LETTER_MAX_REPLAYS)")


def register(subparsers: Any) -> None:
    """Add ``dlq inspect`` and ``dlq replay`` to the ``vecpipe`` command."""
    dlq = subparsers.add_parser(
        "dlq", help="inspect and replay dead-letter topics",
        description="See what failed and why, then send it back once the cause is fixed. "
                    "TOPIC is a dead-letter topic, or 'chunks' / 'embeddings' for the "
                    "configured stages' own.")
    actions = dlq.add_subparsers(dest="dlq_action", required=True, metavar="ACTION")

    p = actions.add_parser(
        "inspect", help="list dead-letter records with their errors; moves no offsets",
        description="List the records of a dead-letter topic with error class and message, "
                    "origin, stage, attempts, replays and age, then counts by error class. "
                    "Reads without a consumer group: nothing is committed or disturbed.")
    p.add_argument("topic", metavar="TOPIC")
    add_kafka_flags(p)
    add_db_flags(p)
    p.add_argument("--json", action="store_true",
                   help="one JSON object per record on stdout; the counts go to stderr")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep listing new records until interrupted")
    p.add_argument("--limit", type=positive_int, metavar="N",
                   help="list at most N records (the counts still cover the whole topic; "
                        "with --follow, stop after N)")
    _add_filter_flags(p)
    p.set_defaults(func=cmd_inspect)

    p = actions.add_parser(
        "replay", help="send dead-letter records back to their original topic",
        description="Send the records picked by the filters back to the topic they failed on "
                    "(or --to TOPIC), with their key, value, headers and timestamp and a "
                    "replay count one higher. Progress is kept in a consumer group only after "
                    "the broker acknowledged the records: run the same command again to "
                    "resume. Stops at the end of the topic as of the start.")
    p.add_argument("topic", metavar="TOPIC")
    add_kafka_flags(p)
    add_db_flags(p)
    p.add_argument("--to", metavar="TOPIC", help="send here instead of the original topic")
    p.add_argument("--group", help="consumer group keeping the progress "
                                   "(default vecpipe-dlq-replay.<dead-letter topic>)")
    p.add_argument("--from-beginning", action="store_true",
                   help="reset the group and scan the whole topic again")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be sent; send and store nothing")
    p.add_argument("--limit", type=positive_int, metavar="N", help="replay at most N records")
    p.add_argument("--rate", type=positive_float, metavar="N",
                   help="at most N records a second")
    p.add_argument("--json", action="store_true",
                   help="JSON lines: printed records, then a summary object")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print every replayed record, not only the skipped ones")
    p.add_argument("--actor", metavar="NAME",
                   help="who runs this replay, for its audit record (default VECPIPE_ACTOR, "
                        "else the OS user and host, user@host)")
    _add_filter_flags(p)
    p.set_defaults(func=cmd_replay)


def _config(args: argparse.Namespace) -> Config:
    from vecpipe.logs import configure_logging

    cfg = config_from_args(args, dead_letter={"max_replays": args.max_replays})
    configure_logging(cfg.ops.log_format, cfg.ops.log_level, stage="dlq",
                      worker_id=cfg.ops.worker_id)
    return cfg


def _filters(args: argparse.Namespace) -> Filters:
    from vecpipe.deadletter.select import Filters, parse_offsets

    now = datetime.now(UTC)
    filters = Filters(
        error_class=args.error_class or None,
        since=parse_time(args.since, now, "--since") if args.since else None,
        until=parse_time(args.until, now, "--until") if args.until else None,
        partitions=frozenset(args.partition) if args.partition else None,
        offsets=parse_offsets(args.offsets) if args.offsets else None,
        key_pattern=args.key_pattern,
    )
    if filters.since and filters.until and filters.since > filters.until:
        raise CommandError(f"--since {args.since!r} is after --until {args.until!r}; nothing "
                           "can match.")
    return filters


def replay_actor(given: str | None, configured: str) -> str:
    """Who runs a replay, for its audit record: ``--actor``, else ``ops.actor``
    (``VECPIPE_ACTOR``), else the OS user and host (``user@host``)."""
    if given is not None:
        if not given.strip():
            raise CommandError("--actor is empty; name who runs the replay (a person or a "
                               "ticket), or leave it out to record VECPIPE_ACTOR or user@host.")
        return given.strip()
    if configured.strip():
        return configured.strip()
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (a bare container)
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def replay_selection(args: argparse.Namespace, filters: Filters) -> dict[str, Any]:
    """The replay's selection and destination flags as given (only those given), for its audit
    record, with the instants that --since and --until meant; never an address."""
    given: dict[str, Any] = {"topic": args.topic}
    for name in ("to", "group", "limit", "rate", "error_class", "since", "until", "partition",
                 "offsets", "key_pattern", "max_replays"):
        value = getattr(args, name, None)
        if value is not None:
            given[name] = sorted(set(value)) if name == "partition" else value
    if args.from_beginning:
        given["from_beginning"] = True
    if filters.since is not None:
        given["since_at"] = filters.since.isoformat()
    if filters.until is not None:
        given["until_at"] = filters.until.isoformat()
    return given


def resolve_topic(cfg: Config, name: str) -> str:
    """The dead-letter topic that ``name`` means; a sentence when it is not one that exists."""
    from vecpipe.kafka.admin import check_broker

    k = cfg.kafka
    aliases = {"chunks": k.dlq_topic(k.chunks_topic), "embeddings": k.dlq_topic(k.embeddings_topic)}
    topic = aliases.get(name, name)
    existing = set(check_broker(k).list_topics(timeout=15).topics)
    dead_topics = sorted(t for t in existing if t.endswith(k.dlq_suffix))
    if topic not in existing:
        known = ", ".join(dead_topics) or "none yet"
        raise CommandError(f"there is no topic {topic!r} on {k.bootstrap}; the dead-letter "
                           f"topics there are: {known}.")
    if not topic.endswith(k.dlq_suffix) and k.dlq_topic(topic) in existing:
        raise CommandError(f"{topic!r} is a pipeline topic, not a dead-letter topic; did you "
                           f"mean {k.dlq_topic(topic)!r}?")
    return topic


def _out(line: str) -> None:
    print(line, flush=True)


def _stop_flag() -> StopFlag:
    from vecpipe.kafka.consumer import StopFlag

    stop = StopFlag()
    stop.install_signal_handlers()
    return stop


@contextlib.contextmanager
def _erasure_check(cfg: Config, *, required: bool) -> Iterator[ErasedCheck | None]:
    """Which dead letters a later deletion covers, asked of the pipeline's database. Without
    the database, inspect says so and shows everything; replay refuses (it must not send
    erased text back into the topics)."""
    import psycopg

    from vecpipe.db.erase import erased
    from vecpipe.db.pool import connect
    from vecpipe.deadletter.select import erasure_probe

    try:
        conn = connect(cfg.database, vector_types=False, autocommit=True)
    except Unreachable as exc:
        if required:
            raise Unreachable(f"{exc} Replay checks deletions there before it sends a record."
                              ) from None
        print(f"vecpipe dlq: {exc} Records a later deletion covers are shown too.",
              file=sys.stderr)
        yield None
        return

    unmigrated: list[bool] = []

    def check(deads: Sequence[DeadLetter]) -> set[int]:
        probes = [(i, p) for i, d in enumerate(deads) if (p := erasure_probe(d)) is not None]
        if unmigrated:
            return set()
        try:
            hits = erased(conn, cfg.database.schema, [p for _, p in probes])
        except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
            # No tables, so no deletion was ever recorded there: nothing is covered.
            print(f"vecpipe dlq: schema {cfg.database.schema!r} (VECPIPE_DB_SCHEMA) has no "
                  "pipeline tables, so no deletions to check.", file=sys.stderr)
            unmigrated.append(True)
            return set()
        except psycopg.Error as exc:
            raise CommandError(
                f"cannot read the deletions of schema {cfg.database.schema!r} "
                f"(database.schema, VECPIPE_DB_SCHEMA): {str(exc).strip().splitlines()[0]}"
            ) from None
        return {probes[j][0] for j in hits}

    try:
        yield check
    finally:
        conn.close()


def _quiet_broken_pipe(run: Callable[[], int]) -> int:
    """``vecpipe dlq inspect ... | head`` ends quietly when the reader goes away."""
    try:
        return run()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


# -- inspect ----------------------------------------------------------------------------------

def cmd_inspect(args: argparse.Namespace) -> int:
    """``vecpipe dlq inspect TOPIC``."""
    from vecpipe.deadletter.inspect import inspect, render_row, render_summary, table_header

    cfg = _config(args)
    now = datetime.now(UTC)

    def emit(dead: DeadLetter) -> None:
        _out(render_row(dead, datetime.now(UTC) if args.follow else now, as_json=args.json))

    def run() -> int:
        filters = _filters(args)
        topic = resolve_topic(cfg, args.topic)
        stop = _stop_flag()
        if not args.json:
            _out(table_header())
        with _erasure_check(cfg, required=False) as erased:
            summary = inspect(cfg.kafka, topic, filters=filters, limit=args.limit,
                              follow=args.follow, max_replays=cfg.dead_letter.max_replays,
                              stop=stop, emit=emit, erased=erased)
        lines = render_summary(summary, filters, cfg.dead_letter.max_replays, args.limit)
        for line in lines if not args.json else lines[1:]:
            print(line, file=sys.stderr if args.json else sys.stdout, flush=True)
        return 0

    return _quiet_broken_pipe(run)


# -- replay -----------------------------------------------------------------------------------

_ENDED = {
    "end": "reached the end of the topic as it was when the replay started",
    "limit": "stopped at --limit; run the same command again to go on",
    "stopped": "interrupted; everything acknowledged is kept, run the same command again "
               "to resume",
    "nothing_left": "nothing left: this group already went past every record (add "
                    "--from-beginning to scan the whole topic again)",
    "halted": "halted before a record it must not send (the reason follows); the records "
              "before it were replayed and their progress kept",
}


def _record_line(dead: DeadLetter, decision: Decision, target: str | None, dry_run: bool,
                 as_json: bool) -> str:
    from vecpipe.deadletter.inspect import printable
    from vecpipe.deadletter.select import Decision, format_age

    if as_json:
        return json.dumps({
            "action": decision.value, "dlq_partition": dead.partition,
            "dlq_offset": dead.offset, "target": target, "key": dead.key_text,
            "error_class": dead.error_class, "replays": dead.replays,
        }, ensure_ascii=False)
    where = f"{dead.partition}:{dead.offset}"
    age = format_age(dead.age(datetime.now(UTC)))
    about = printable(f"{dead.short_class}  key={dead.key_text}  age={age}")
    if decision is Decision.REPLAY:
        verb = "would replay" if dry_run else "replayed"
        return (f"{verb:<12} {where:<10} -> {target}  replays {dead.replays}->"
                f"{dead.replays + 1}  {about}")
    why = {Decision.SKIP_MAX_REPLAYS: f"already replayed {dead.replays} time(s)",
           Decision.SKIP_TRUNCATED: f"cut to fit the dead-letter topic ({dead.truncated})",
           Decision.SKIP_ERASED: "erased by a later delete",
           }.get(decision, "no original topic; use --to")
    return f"{'skip':<12} {where:<10} {why}  {about}"


def render_replay_summary(s: ReplaySummary) -> list[str]:
    """The human summary printed at the end of a replay."""
    lines = [""]
    if s.dry_run:
        lines.append("DRY RUN: nothing was sent and no progress was stored.")
    lines.append(f"replay of {s.topic} (group {s.group}): {_ENDED[s.ended]}")
    targets = ", ".join(f"{t} {n}" for t, n in s.targets.most_common())
    rows = [
        ("would replay" if s.dry_run else "replayed", s.replayed,
         f"to {targets}" if targets else ""),
        ("skipped by filter", s.skipped_filter, ""),
        (f"skipped, already replayed {s.max_replays} time(s)", s.skipped_max_replays,
         "dead_letter.max_replays: fix the cause, they keep failing" if s.skipped_max_replays
         else ""),
        ("skipped, no original topic", s.skipped_no_origin,
         "replay them with --to TOPIC" if s.skipped_no_origin else ""),
        ("skipped, cut to fit the topic", s.skipped_truncated,
         "their originals are on the source topic" if s.skipped_truncated else ""),
        ("skipped, erased by a later delete", s.skipped_erased, ""),
    ]
    for label, n, note in rows:
        lines.append(f"  {label:<36}{n:>8}  {note}".rstrip())
    if s.by_class:
        lines.append("by error class:")
        for cls, n in s.by_class.most_common():
            lines.append(f"  {n:>8}  {cls}")
    return lines


def cmd_replay(args: argparse.Namespace) -> int:
    """``vecpipe dlq replay TOPIC``."""
    from vecpipe.db.audit import ReplayAuditLog
    from vecpipe.deadletter.select import Decision
    from vecpipe.logs import get_logger
    from workers.replay import ReplayOptions, default_group, replay

    cfg = _config(args)
    actor = replay_actor(args.actor, cfg.ops.actor)

    def on_record(dead: DeadLetter, decision: Decision, target: str | None) -> None:
        if decision is Decision.SKIP_FILTER:
            return
        if decision is Decision.REPLAY and not (args.dry_run or args.verbose):
            return
        _out(_record_line(dead, decision, target, args.dry_run, args.json))

    def run() -> int:
        topic = resolve_topic(cfg, args.topic)
        filters = _filters(args)
        audit = ReplayAuditLog(cfg, actor=actor, filters=replay_selection(args, filters))
        with _erasure_check(cfg, required=True) as erased:
            opts = ReplayOptions(filters=filters, to=args.to,
                                 group=args.group or default_group(topic),
                                 dry_run=args.dry_run, limit=args.limit, rate=args.rate,
                                 from_beginning=args.from_beginning, erased=erased)
            summary = replay(cfg, topic, opts, stop=_stop_flag(), log=get_logger(),
                             on_record=on_record, audit=audit)
        if args.json:
            _out(json.dumps({"summary": summary.to_json(), "audit": {
                "id": audit.row_id, "actor": actor, "complete": not summary.audit_problem}}))
        else:
            for line in render_replay_summary(summary):
                _out(line)
            if not summary.audit_problem:
                _out(f"recorded as replay #{audit.row_id} by {actor} (vecpipe audit --replays)")
        if summary.audit_problem:
            print(f"vecpipe dlq: {summary.audit_problem}", file=sys.stderr, flush=True)
        if summary.ended == "halted":
            raise CommandError(summary.halt_reason)
        if summary.audit_problem:
            return EXIT_AUDIT_INCOMPLETE
        return EXIT_INTERRUPTED if summary.ended == "stopped" else 0

    return _quiet_broken_pipe(run)
