"""Dead-letter tooling without a broker: reading records, filters, replay headers, CLI flags."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from confluent_kafka import KafkaException
from jsonschema import Draft202012Validator

import workers.replay
from tests.fakes import FakeProducer, FakeRecord
from vecpipe.cli.audit import render_replays
from vecpipe.cli.common import parse_time
from vecpipe.cli.dlq import _filters, render_replay_summary, replay_actor, replay_selection
from vecpipe.cli.main import build_parser
from vecpipe.config import DeadLetterConfig, KafkaConfig, load_config
from vecpipe.deadletter.headers import (
    ERROR_PREFIXES,
    H_CLASS,
    H_FIRST_FAILED,
    H_REPLAYS,
    H_TOPIC,
    H_TRUNCATED,
    DeadLetter,
    replay_headers,
)
from vecpipe.deadletter.inspect import InspectSummary, render_row, render_summary, table_header
from vecpipe.deadletter.select import (
    Decision,
    Filters,
    decide,
    erasure_probe,
    format_age,
    parse_key_pattern,
    parse_offsets,
    source_topic,
)
from vecpipe.deadletter.sender import DeadLetters
from vecpipe.errors import CommandError, ReplayError
from vecpipe.kafka.consumer import StopFlag
from vecpipe.messages import load_schema, published_header
from workers.replay import ReplayOptions, ReplaySummary, _Pacer, _Targets, default_group

NOW = datetime(2024, 5, 1, 3, 0, tzinfo=UTC)
ORIGINAL_HEADERS = [("vecpipe.schema", b"vecpipe.chunk"), ("vecpipe.schema.version", b"1"),
                    ("trace-id", b"abc")]


def chunk_record(**fields: Any) -> FakeRecord:
    """A consumed chunk record with ORIGINAL_HEADERS, as the dead-letter tooling finds it,
    with ``fields`` replaced."""
    record = FakeRecord(key_=b"acme/doc-7", value_=b'{"text": "hello"}',
                        headers_=list(ORIGINAL_HEADERS), timestamp_=(1, 1_714_500_000_000))
    return replace(record, **fields)


def dead_letter_of(record: FakeRecord, exc: BaseException, stage: str = "embed") -> DeadLetter:
    """Send ``record`` through the real DeadLetters and read back what landed on the DLQ."""
    producer = FakeProducer()
    DeadLetters(producer, KafkaConfig(), stage, "w-1").send(record, exc)  # type: ignore[arg-type]
    return DeadLetter.of(producer.records()[0])


def test_dead_letter_reads_every_error_header() -> None:
    """A record written by DeadLetters.send reads back with its origin, error, stage and key."""
    dead = dead_letter_of(chunk_record(), ValueError("the vector has 128 dimensions"))
    assert (dead.topic, dead.original_topic) == ("vecpipe.chunks.dlq", "vecpipe.chunks")
    assert (dead.original_partition, dead.original_offset) == (2, 41)
    assert dead.error_class == "builtins.ValueError"
    assert dead.short_class == "ValueError"
    assert dead.error_message == "the vector has 128 dimensions"
    assert (dead.stage, dead.worker, dead.attempts, dead.replays) == ("embed", "w-1", 1, 0)
    assert dead.key_text == "acme/doc-7"
    assert dead.timestamp_ms == 1_714_500_000_000
    assert dead.first_failed_at is not None
    assert dead.age(dead.first_failed_at + timedelta(minutes=5)) == timedelta(minutes=5)


def test_record_without_error_headers_reads_as_empty_values() -> None:
    """A hand-produced record on a dead-letter topic does not break inspect."""
    dead = DeadLetter.of(chunk_record(headers_=[(H_REPLAYS, b"x")], timestamp_=(0, -1)))
    assert (dead.original_topic, dead.error_class, dead.replays) == (None, "", 0)
    assert dead.failed_at is None and dead.age(NOW) is None
    assert decide(dead, Filters(), 3, None, None) == (Decision.SKIP_NO_ORIGIN, None)
    assert decide(dead, Filters(), 3, "elsewhere", None) == (Decision.REPLAY, "elsewhere")
    assert decide(dead, Filters(), 3, None, "vecpipe.chunks") == (Decision.REPLAY,
                                                                   "vecpipe.chunks")


def test_replay_headers_keep_originals_and_first_failure_and_count_one_more() -> None:
    """Replay drops the last failure's headers, keeps the original ones, first-failed-at, +1."""
    dead = dead_letter_of(chunk_record(), ValueError("boom"))
    headers = replay_headers(dead)
    assert [h for h in headers if h[0] not in (H_FIRST_FAILED, H_REPLAYS)] == [
        *ORIGINAL_HEADERS, ("vecpipe.published_at", b"2024-04-30T18:00:00.000000+00:00")]
    assert dict(headers)[H_FIRST_FAILED] == dict(dead.headers)[H_FIRST_FAILED]
    assert dict(headers)[H_REPLAYS] == b"1"
    assert [k for k, _ in headers if k.startswith(ERROR_PREFIXES)] == [H_FIRST_FAILED]


def test_failing_again_after_replay_keeps_first_failure_and_replay_count() -> None:
    """fail -> replay -> fail again: one set of error headers, replay count 1, the first time."""
    first = dead_letter_of(chunk_record(), ValueError("first"))
    replayed = chunk_record(headers_=replay_headers(first), offset_=99)
    second = dead_letter_of(replayed, KeyError("second"), stage="write")
    assert second.replays == 1
    assert second.first_failed_at == first.first_failed_at
    assert (second.error_class, second.stage, second.original_offset) == (
        "builtins.KeyError", "write", 99)
    assert [k for k, _ in second.headers].count(H_CLASS) == 1
    again = replay_headers(second)
    assert dict(again)[H_REPLAYS] == b"2"
    assert [k for k, _ in again].count(H_REPLAYS) == 1
    added = {k: v.decode() for k, v in second.headers if k.startswith(ERROR_PREFIXES)
             or k.startswith("__connect.") or k == H_REPLAYS}
    Draft202012Validator(load_schema("dead-letter-headers.v1.json")).validate(added)


@pytest.mark.parametrize(("text", "expected"), [
    ("2h", NOW - timedelta(hours=2)),
    ("90s", NOW - timedelta(seconds=90)),
    ("1d12h", NOW - timedelta(hours=36)),
    ("1w", NOW - timedelta(days=7)),
    ("1.5h", NOW - timedelta(minutes=90)),
    ("2024-04-30T12:00:00Z", datetime(2024, 4, 30, 12, tzinfo=UTC)),
    ("2024-04-30T12:00:00", datetime(2024, 4, 30, 12, tzinfo=UTC)),
    ("2024-04-30T14:00:00+02:00", datetime(2024, 4, 30, 12, tzinfo=UTC)),
    ("2024-04-30", datetime(2024, 4, 30, tzinfo=UTC)),
])
def test_parse_time_takes_durations_and_iso_times(text: str, expected: datetime) -> None:
    """--since/--until accept a duration back from now or an ISO time (UTC unless stated)."""
    assert parse_time(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "2x", "", "12"])
def test_parse_time_rejects_other_text_with_a_sentence(text: str) -> None:
    """A wrong --since names the flag and shows both accepted forms."""
    with pytest.raises(CommandError, match=r"--since .* ISO 8601 .* duration"):
        parse_time(text, NOW)


def test_parse_offsets() -> None:
    """--offsets takes A-B inclusive, A- open-ended and a single A; refuses B < A and text."""
    assert parse_offsets("100-250") == (100, 250)
    assert parse_offsets(" 7 - 9 ") == (7, 9)
    assert parse_offsets("100-") == (100, None)
    assert parse_offsets("5") == (5, 5)
    with pytest.raises(CommandError, match="ends before it starts"):
        parse_offsets("9-7")
    with pytest.raises(CommandError, match="A-B"):
        parse_offsets("a-b")


def test_key_pattern_is_a_glob_or_a_marked_regex() -> None:
    """A glob matches the whole key; re:EXPR and /EXPR/ are searched; a bad regex is a sentence."""
    glob = parse_key_pattern("acme/*")
    assert glob("acme/doc-1") and not glob("other/acme/doc-1")
    assert parse_key_pattern("re:doc-[0-9]+$")("acme/doc-12")
    assert not parse_key_pattern("/^doc/")("acme/doc-12")
    with pytest.raises(CommandError, match="not a valid regular expression"):
        parse_key_pattern("re:(")


def test_filters_combine_and_each_one_excludes() -> None:
    """Every filter that is set must match; an unset one lets everything through."""
    dead = DeadLetter.of(chunk_record(
        topic_="vecpipe.chunks.dlq", partition_=1, offset_=10,
        headers_=[(H_CLASS, b"vecpipe.errors.PermanentError"), (H_TOPIC, b"vecpipe.chunks"),
                  (H_FIRST_FAILED, (NOW - timedelta(hours=1)).isoformat().encode())]))
    assert Filters().matches(dead) and not Filters().active
    everything = Filters(error_class="permanenterror", since=NOW - timedelta(hours=2),
                         until=NOW, partitions=frozenset({1}), offsets=(5, 10),
                         key_pattern="acme/*")
    assert everything.active and everything.matches(dead)
    for miss in (Filters(error_class="InvalidMessage"), Filters(since=NOW - timedelta(minutes=5)),
                 Filters(until=NOW - timedelta(hours=3)), Filters(partitions=frozenset({0})),
                 Filters(offsets=(11, None)), Filters(offsets=(0, 9)),
                 Filters(key_pattern="other/*")):
        assert not miss.matches(dead), miss
    assert Filters(offsets=(0, 9)).past_end(1, 10)
    assert not Filters(offsets=(0, None)).past_end(1, 10**9)


def test_decide_stops_loops_at_max_replays() -> None:
    """A record replayed max_replays times stays put; --to overrides the source topic."""
    dead = DeadLetter.of(chunk_record(headers_=[(H_TOPIC, b"vecpipe.chunks"), (H_REPLAYS, b"2")]))
    src = source_topic("vecpipe.chunks.dlq", ".dlq")
    assert decide(dead, Filters(), 3, None, src) == (Decision.REPLAY, "vecpipe.chunks")
    assert decide(dead, Filters(), 3, "scratch", src) == (Decision.REPLAY, "scratch")
    assert decide(dead, Filters(), 2, None, src) == (Decision.SKIP_MAX_REPLAYS, None)
    assert decide(dead, Filters(error_class="nope"), 2, None, src) == (Decision.SKIP_FILTER,
                                                                        None)


def test_a_record_does_not_choose_where_it_is_replayed() -> None:
    """The target is the dead-letter topic's source, whatever topic the record's own headers
    name (a hostile or buggy producer could name any topic)."""
    dead = DeadLetter.of(chunk_record(headers_=[(H_TOPIC, b"payments.ledger")]))
    assert decide(dead, Filters(), 3, None, source_topic("vecpipe.chunks.dlq", ".dlq")) == (
        Decision.REPLAY, "vecpipe.chunks")
    assert source_topic("odd-name", ".dlq") is None
    assert source_topic(".dlq", ".dlq") is None


def test_a_negative_replay_count_counts_as_zero() -> None:
    """A replay count below zero in the headers cannot buy a record more replays than
    max_replays allows."""
    dead = DeadLetter.of(chunk_record(headers_=[(H_REPLAYS, b"-1000")]))
    assert dead.replays == 0
    again = DeadLetter.of(chunk_record(headers_=[(H_REPLAYS, b"3")]))
    assert decide(again, Filters(), 3, None, "vecpipe.chunks")[0] is Decision.SKIP_MAX_REPLAYS


def test_a_truncated_dead_letter_is_never_replayed() -> None:
    """A dead letter cut to fit its topic would publish a broken record: replay skips it."""
    dead = DeadLetter.of(chunk_record(headers_=[(H_TRUNCATED, b"value")]))
    assert dead.truncated == "value"
    assert decide(dead, Filters(), 3, None, "vecpipe.chunks") == (Decision.SKIP_TRUNCATED, None)


def test_format_age() -> None:
    """Ages read at a glance."""
    assert [format_age(timedelta(seconds=s)) for s in (5, 125, 3 * 3600 + 300, 2 * 86_400 + 7200)
            ] == ["5s", "2m", "3h05m", "2d02h"]
    assert format_age(None) == "?"


def test_inspect_row_table_and_json() -> None:
    """A table row shows position, age, stage, class, origin, tries, replays, key, message;
    --json gives every field."""
    dead = dead_letter_of(chunk_record(), ValueError("wrong\ndimension"))
    now = (dead.first_failed_at or NOW) + timedelta(minutes=3)
    line = render_row(dead, now)
    for part in ("0:0", "3m", "embed", "ValueError", "vecpipe.chunks[2]@41", "acme/doc-7",
                 "wrong dimension"):
        assert part in line, part
    assert len(table_header().split("  ")) >= 9
    obj = json.loads(render_row(dead, now, as_json=True))
    assert obj["error_class"] == "builtins.ValueError"
    assert (obj["original_topic"], obj["original_partition"], obj["original_offset"]) == (
        "vecpipe.chunks", 2, 41)
    assert (obj["attempts"], obj["replays"], obj["age_s"]) == (1, 0, 180.0)


def test_control_characters_in_keys_and_errors_cannot_reach_the_terminal() -> None:
    """A key or an error message holding escape sequences, a bell or a right-to-left override
    is shown with those characters escaped: inspect output cannot rewrite the screen."""
    hostile = "a/\x1b[2J\u202ex\x9b"
    dead = dead_letter_of(chunk_record(key_=hostile.encode()), ValueError("bad \x1b]0;owned\x07"))
    line = render_row(dead, NOW)
    assert not any(ch in line for ch in "\x1b\x07\u202e\x9b")
    assert "\\x1b[2J" in line and "\\u202e" in line
    assert json.loads(render_row(dead, NOW, as_json=True))["key"] == hostile


def test_inspect_summary_counts_by_error_class() -> None:
    """The footer counts matching records by error class, most frequent first."""
    s = InspectSummary("t.dlq", on_topic=5, matched=5, listed=2)
    s.by_class.update({"a.Rare": 1, "b.Common": 4})
    s.by_stage.update({"embed": 5})
    s.max_replays_reached = 1
    text = "\n".join(render_summary(s, Filters(), 3, limit=2))
    assert "5 record(s) on t.dlq" in text and "2 listed (--limit 2)" in text
    assert text.index("b.Common") < text.index("a.Rare")
    assert "4  b.Common" in text
    assert "dead_letter.max_replays" in text


def test_replay_summary_reads_for_an_operator() -> None:
    """The replay summary says how it ended and counts every kind of skip."""
    s = ReplaySummary("t.dlq", default_group("t.dlq"), dry_run=True, max_replays=3,
                      replayed=2, skipped_filter=1, skipped_max_replays=1, ended="limit")
    s.by_class["x.Err"] = 2
    s.targets["t"] = 2
    text = "\n".join(render_replay_summary(s))
    assert "DRY RUN" in text and "--limit" in text and "vecpipe-dlq-replay.t.dlq" in text
    assert "already replayed 3 time(s)" in text and "x.Err" in text
    assert s.to_json()["skipped_max_replays"] == 1


def test_cli_flags_parse_into_filters() -> None:
    """Repeated and comma-separated --partition add up; times and offsets parse."""
    args = build_parser().parse_args([
        "dlq", "replay", "chunks", "--partition", "0,2", "--partition", "3", "--since", "2h",
        "--offsets", "4-8", "--error-class", "Permanent", "--rate", "2.5", "--limit", "3"])
    filters = _filters(args)
    assert filters.partitions == frozenset({0, 2, 3})
    assert filters.offsets == (4, 8)
    assert filters.since is not None
    assert (args.rate, args.limit) == (2.5, 3)


def test_cli_rejects_wrong_values_with_sentences(capsys: pytest.CaptureFixture[str]) -> None:
    """Bad numbers stop argparse; bad times and ranges are CommandErrors naming the flag."""
    parser = build_parser()
    for bad in (["--rate", "0"], ["--limit", "-1"], ["--partition", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["dlq", "replay", "chunks", *bad])
    with pytest.raises(CommandError, match="--until"):
        _filters(parser.parse_args(["dlq", "inspect", "chunks", "--until", "soon"]))
    with pytest.raises(CommandError, match="after --until"):
        _filters(parser.parse_args(["dlq", "inspect", "chunks", "--since", "1h",
                                    "--until", "2h"]))


def test_pacer_holds_the_rate_and_yields_to_stop() -> None:
    """--rate 50 spaces records 20 ms apart; a stop ends the wait at once."""
    stop = StopFlag()
    pacer = _Pacer(50, stop)
    started = time.monotonic()
    for _ in range(6):
        pacer.wait()
    assert time.monotonic() - started >= 0.09
    stop.set()
    slow = _Pacer(0.01, stop)
    slow.wait()
    started = time.monotonic()
    slow.wait()
    assert time.monotonic() - started < 1.0


def test_dead_letter_config_default_allows_replays() -> None:
    """max_replays defaults to a small positive number: loops stop after a few rounds."""
    assert 1 <= DeadLetterConfig().max_replays <= 5


def test_replay_refuses_targets_that_loop_or_are_gone() -> None:
    """Sending a record back to the dead-letter topic itself halts the replay with a sentence;
    a topic that exists is fine."""

    class Known(_Targets):
        def __init__(self) -> None:
            self.source = "t.dlq"
            self.existing = {"t", "short"}

    dead = DeadLetter.of(chunk_record())
    targets = Known()
    assert targets.problem(dead, "t") is None
    assert "itself" in (targets.problem(dead, "t.dlq") or "")


def test_a_replayed_record_keeps_its_publish_time_in_its_header() -> None:
    """A dead letter written before the publish-time header existed (its timestamp was the
    original one) is replayed with that time as its vecpipe.published_at header; one that has
    the header keeps it as it is."""
    old = DeadLetter.of(chunk_record(timestamp_=(1, 1_714_500_000_000)))
    assert ("vecpipe.published_at", b"2024-04-30T18:00:00.000000+00:00") in replay_headers(old)
    stamped = DeadLetter.of(chunk_record(headers_=[
        *ORIGINAL_HEADERS, ("vecpipe.published_at", b"2020-01-01T00:00:00+00:00")]))
    times = [v for k, v in replay_headers(stamped) if k == "vecpipe.published_at"]
    assert times == [b"2020-01-01T00:00:00+00:00"]


def test_a_dead_letter_names_what_a_deletion_would_have_to_cover() -> None:
    """Tenant and document from the key, version from the value when it reads, publish time
    from the header (else the timestamp); a delete, or a key without a tenant, is no content."""
    chunk = DeadLetter.of(chunk_record(value_=b'{"version": 7}', headers_=[
        *ORIGINAL_HEADERS, ("vecpipe.published_at", b"2024-05-01T00:00:00+00:00")]))
    assert erasure_probe(chunk) == ("acme", "doc-7", 7, datetime(2024, 5, 1, tzinfo=UTC))
    garbled = DeadLetter.of(chunk_record(value_=b"{broken"))
    assert erasure_probe(garbled) == ("acme", "doc-7", None,
                                      datetime(2024, 4, 30, 18, 0, tzinfo=UTC))
    delete = DeadLetter.of(chunk_record(headers_=[("vecpipe.schema", b"vecpipe.delete")]))
    assert erasure_probe(delete) is None
    assert erasure_probe(DeadLetter.of(chunk_record(key_=b"no-slash"))) is None


def test_a_dead_letters_value_names_its_document_over_its_key() -> None:
    """A tenant with a slash in its id, or a record keyed by something else, is still found by
    the deletion that covers it: the value's tenant and document win over the key's."""
    def named(key: bytes, value: bytes) -> tuple[str, str | None, int | None] | None:
        probe = erasure_probe(DeadLetter.of(chunk_record(key_=key, value_=value)))
        return None if probe is None else probe[:3]

    assert named(b"org/acme/doc-1", b'{"tenant_id": "org/acme", "doc_id": "doc-1", "version": 2}'
                 ) == ("org/acme", "doc-1", 2)
    assert named(b"", b'{"tenant_id": "acme", "doc_id": "d"}') == ("acme", "d", None)
    assert named(b"acme/doc-7", b'{"tenant_id": "beta"}') == ("beta", None, None)
    assert named(b"acme/doc-7", b'{"version": 3}') == ("acme", "doc-7", 3)


def test_a_dead_letter_refused_for_its_future_time_is_probed_at_that_time() -> None:
    """A record refused because its publish time is ahead of the clock was still published at
    that time: a delete before it does not cover it."""
    ahead = datetime.now(UTC) + timedelta(days=2)
    dead = DeadLetter.of(chunk_record(headers_=[*ORIGINAL_HEADERS, published_header(ahead)]))
    probe = erasure_probe(dead)
    assert probe is not None and probe[3] == ahead


# -- the replay audit ---------------------------------------------------------------------------

class FakeAudit:
    """Records what a replay tells its audit; ``fail`` names the methods that raise."""

    def __init__(self, *fail: str) -> None:
        self.fail = set(fail)
        self.calls: list[tuple[str, Any]] = []

    def _call(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if name in self.fail:
            raise ReplayError(f"{name} could not be written.")

    def started(self, topic: str, group: str, dry_run: bool) -> None:
        self._call("started", topic, group, dry_run)

    def progress(self, counts: dict[str, Any]) -> None:
        self._call("progress", counts)

    def finished(self, counts: dict[str, Any], ended: str | None, error: str | None) -> None:
        self._call("finished", counts, ended, error)


class FakeLog:
    """A structlog stand-in that keeps the events."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.events.append((event, kw))


def _replay_with(monkeypatch: pytest.MonkeyPatch, audit: FakeAudit, body: Any,
                 **opts: Any) -> ReplaySummary:
    """Run ``workers.replay.replay`` with ``body`` standing in for the part that talks to
    the broker."""
    monkeypatch.setattr(workers.replay, "_replay", body)
    return workers.replay.replay(load_config(environ={}), "t.dlq", ReplayOptions(**opts),
                                 stop=StopFlag(), log=FakeLog(), audit=audit)


def test_a_replay_whose_audit_row_cannot_be_written_reads_and_sends_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The start record comes first: when it fails, the replay raises its sentence before it
    opens a consumer or a producer, and there is nothing to complete."""
    def never(*_: Any, **__: Any) -> Any:
        raise AssertionError("the replay touched the broker without an audit record")

    monkeypatch.setattr(workers.replay, "reader", never)
    monkeypatch.setattr(workers.replay, "DurableProducer", never)
    audit = FakeAudit("started")
    with pytest.raises(ReplayError, match="started could not be written"):
        workers.replay.replay(load_config(environ={}), "t.dlq", ReplayOptions(dry_run=True),
                              stop=StopFlag(), log=FakeLog(), audit=audit)
    assert audit.calls == [("started", ("t.dlq", "vecpipe-dlq-replay.t.dlq", True))]


def test_the_audit_record_is_completed_however_the_replay_ends(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Done with its ending and exact counts; failed with the halt reason, or with the error's
    sentence when the replay raised (and the error still reaches the caller)."""
    def ok(cfg: Any, topic: str, opts: Any, summary: ReplaySummary, *rest: Any) -> Any:
        summary.replayed, summary.ended = 2, "limit"
        summary.targets["t"] = 2
        return summary

    audit = FakeAudit()
    summary = _replay_with(monkeypatch, audit, ok)
    (name, (counts, ended, error)) = audit.calls[-1]
    assert (name, ended, error, summary.audit_problem) == ("finished", "limit", None, "")
    assert counts == summary.to_json() and counts["targets"] == {"t": 2}

    def halts(cfg: Any, topic: str, opts: Any, summary: ReplaySummary, *rest: Any) -> Any:
        summary.ended, summary.halt_reason = "halted", "record 0:4 would loop."
        return summary

    audit = FakeAudit()
    _replay_with(monkeypatch, audit, halts)
    assert audit.calls[-1][1][1:] == ("halted", "record 0:4 would loop.")

    def breaks(*_: Any) -> Any:
        raise KafkaException("broker went away")

    audit = FakeAudit()
    with pytest.raises(KafkaException):
        _replay_with(monkeypatch, audit, breaks)
    assert audit.calls[-1][1][1:] == (None, "KafkaException: broker went away")


def test_a_completion_that_cannot_be_written_leaves_the_replay_done_and_says_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What was sent stays sent: the summary carries the problem, and the log line the final
    counts, for the operator to file."""
    def ok(cfg: Any, topic: str, opts: Any, summary: ReplaySummary, stop: Any, log: FakeLog,
           *rest: Any) -> Any:
        summary.replayed = 5
        return summary

    monkeypatch.setattr(workers.replay, "_replay", ok)
    log = FakeLog()
    summary = workers.replay.replay(load_config(environ={}), "t.dlq", ReplayOptions(),
                                    stop=StopFlag(), log=log, audit=FakeAudit("finished"))
    assert summary.audit_problem == "finished could not be written."
    [(_, fields)] = [e for e in log.events if e[0] == "replay_audit_incomplete"]
    assert fields["replayed"] == 5 and fields["problem"] == summary.audit_problem


def test_the_actor_is_the_flag_else_the_environment_else_user_at_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """--actor wins over VECPIPE_ACTOR, which wins over the OS user and host; a blank --actor
    is a sentence, a blank variable is not set."""
    monkeypatch.setattr("getpass.getuser", lambda: "alice")
    monkeypatch.setattr("socket.gethostname", lambda: "bastion")
    assert replay_actor(" bob ", "ci") == "bob"
    assert replay_actor(None, "ticket-42") == "ticket-42"
    assert replay_actor(None, "  ") == "alice@bastion"
    assert replay_actor(None, "") == "alice@bastion"
    with pytest.raises(CommandError, match="--actor"):
        replay_actor("", "")
    args = build_parser().parse_args(["dlq", "replay", "chunks", "--actor", "carol"])
    assert args.actor == "carol"


def test_the_audit_keeps_the_flags_as_given_and_the_instants_they_meant() -> None:
    """Only the flags given, written as given (--since 2h stays 2h, beside the instant it
    meant), partitions merged; never the database or broker address."""
    args = build_parser().parse_args([
        "dlq", "replay", "chunks", "--since", "2h", "--partition", "3,0", "--partition", "3",
        "--error-class", "Permanent", "--limit", "10", "--to", "x.chunks", "--from-beginning",
        "--max-replays", "2", "--database-url", "postgresql://u:secret@db/x",
        "--bootstrap", "kafka:9092"])
    filters = _filters(args)
    picked = replay_selection(args, filters)
    assert filters.since is not None
    assert picked == {"topic": "chunks", "to": "x.chunks", "limit": 10,
                      "error_class": "Permanent", "since": "2h", "partition": [0, 3],
                      "max_replays": 2, "from_beginning": True,
                      "since_at": filters.since.isoformat()}
    assert "secret" not in json.dumps(picked) and "9092" not in json.dumps(picked)
    bare = build_parser().parse_args(["dlq", "replay", "t.dlq", "--dry-run"])
    assert replay_selection(bare, _filters(bare)) == {"topic": "t.dlq"}


def test_audit_replays_refuses_the_deletion_trails_filters() -> None:
    """--replays lists replays: --tenant, --action and --lineage with it are sentences, as is
    a --limit below 1, before any database is asked."""
    parser = build_parser()
    for extra, match in ((["--tenant", "acme"], "--tenant"),
                         (["--action", "delete_tenant"], "--action"),
                         (["--lineage"], "--lineage"), (["--limit", "0"], "--limit")):
        args = parser.parse_args(["audit", "--replays", *extra])
        with pytest.raises(CommandError, match=match):
            args.func(args)


def test_replays_render_who_when_flags_and_where_the_records_went() -> None:
    """One block per replay: outcome (a running one says it may have been killed), actor,
    topic and group, the flags as a command line, targets, skips and the error."""
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    base = {"actor": "alice@bastion", "worker": "bastion-77", "dlq_topic": "v.chunks.dlq",
            "consumer_group": "vecpipe-dlq-replay.v.chunks.dlq", "started_at": at,
            "updated_at": at, "error": None}
    rows = [
        {**base, "id": 3, "status": "running", "finished_at": None, "dry_run": False,
         "ended": None, "filters": {"topic": "chunks"}, "counts": {}},
        {**base, "id": 2, "status": "failed", "finished_at": at, "dry_run": False,
         "ended": None, "error": "the replay group is busy.", "counts": {"replayed": 0},
         "filters": {"topic": "chunks", "since": "2h", "since_at": "2026-01-02T01:04:05+00:00",
                     "partition": [0, 3], "from_beginning": True}},
        {**base, "id": 1, "status": "done", "finished_at": at, "dry_run": True, "ended": "end",
         "filters": {"topic": "chunks", "error_class": "Permanent"},
         "counts": {"replayed": 4, "targets": {"v.chunks": 4}, "skipped_by_filter": 2,
                    "skipped_erased": 1}},
    ]
    text = "\n".join(render_replays(rows))
    assert text.index("#3") < text.index("#2") < text.index("#1")
    assert ("#3  2026-01-02 03:04:05  running (last report 2026-01-02 03:04:05: still going, "
            "or killed)") in text and "replayed 0 so far" in text
    assert "flags: (none: every record)" in text
    assert "flags: --since 2h (2026-01-02 01:04:05) --partition 0,3 --from-beginning" in text
    assert "error: the replay group is busy." in text
    assert "DRY RUN  done (end)" in text and "would replay 4 to v.chunks 4" in text
    assert "skipped 2 by filter, 1 erased by a later delete" in text
    assert "by alice@bastion (bastion-77) on v.chunks.dlq" in text
    assert render_replays([]) == ["no replays recorded"]


def test_a_batch_whose_flush_fails_counts_nothing_as_replayed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The summary (and so the audit row of the failed replay) counts a record only once the
    broker acknowledged it: a flush that fails leaves the batch uncounted and uncommitted."""
    class Refusing(FakeProducer):
        def flush(self, timeout: float = 60.0) -> None:
            raise ReplayError("the broker did not acknowledge the batch.")

    class Clear:
        def problem(self, dead: DeadLetter, target: str) -> None:
            return None

    producer = Refusing()
    monkeypatch.setattr(workers.replay, "DurableProducer", lambda kafka: producer)
    dead = dead_letter_of(chunk_record(), ValueError("bad"))
    record = FakeRecord("vecpipe.chunks.dlq", 0, 0, dead.key, dead.value, list(dead.headers),
                        (1, dead.timestamp_ms or 0))
    cfg = load_config(environ={})
    summary = ReplaySummary("vecpipe.chunks.dlq", "g", dry_run=False,
                            max_replays=cfg.dead_letter.max_replays)
    no_consumer: Any = None  # the flush fails before _batch would commit through it
    replayer = workers.replay._Replayer(
        no_consumer, cfg, "vecpipe.chunks.dlq", ReplayOptions(), {0}, {0: 0}, {0: 5}, summary,
        StopFlag(), None, Clear(), FakeLog(), lambda: None)  # type: ignore[arg-type]
    with pytest.raises(ReplayError, match="did not acknowledge"):
        replayer._batch([record])
    assert len(producer.sent) == 1
    assert (summary.replayed, dict(summary.targets)) == (0, {})
