"""Dead-letter topics, inspect and replay against the real broker, database and model."""

from __future__ import annotations

import getpass
import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from producers.publisher import Publisher
from tests.helpers import connect, env_for, read_topic, run_cli, run_stage
from vecpipe.config import with_section
from vecpipe.db.audit import ReplayAuditLog
from vecpipe.db.erase import DeleteRequest
from vecpipe.db.pool import make_pool
from vecpipe.db.store import Store
from vecpipe.deadletter.headers import (
    H_CLASS,
    H_FIRST_FAILED,
    H_MESSAGE,
    H_OFFSET,
    H_REPLAYS,
    H_STAGE,
    H_TOPIC,
    DeadLetter,
)
from vecpipe.deadletter.inspect import inspect
from vecpipe.deadletter.select import Decision, Filters
from vecpipe.deadletter.sender import DeadLetters
from vecpipe.errors import PermanentError
from vecpipe.kafka.admin import admin_client, ensure_topics, offsets_committed
from vecpipe.kafka.consumer import EXIT_DEAD_LETTER_RATE, StopFlag
from vecpipe.kafka.producer import DurableProducer
from vecpipe.logs import get_logger
from vecpipe.messages import (
    CHUNK,
    GAP,
    Chunk,
    Document,
    content_hash,
    encode_chunk,
    header_list,
    header_value,
    published_at,
    schema_headers,
)
from workers.replay import ReplayOptions, default_group, replay

pytestmark = pytest.mark.integration

DOCS = {f"doc{i}": f"Note {i}: the harbour ferry leaves at {i + 6} o'clock sharp."
        for i in range(5)}


@dataclass
class Failed:
    """A record as a worker consumed it, to dead-letter without running the worker."""

    topic_: str
    key_: bytes
    value_: bytes
    offset_: int
    timestamp_ms: int
    headers_: list[tuple[str, bytes]] = field(
        default_factory=lambda: [*schema_headers(CHUNK), ("trace-id", b"t-1")])

    def topic(self) -> str:
        return self.topic_

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self.offset_

    def key(self) -> bytes:
        return self.key_

    def value(self) -> bytes:
        return self.value_

    def headers(self) -> list[tuple[str, bytes]]:
        return self.headers_

    def timestamp(self) -> tuple[int, int]:
        return (1, self.timestamp_ms)


def chunk_of(tenant: str, doc_id: str, text: str) -> Chunk:
    """A one-chunk document."""
    return Chunk(tenant_id=tenant, doc_id=doc_id, version=1, chunk_index=0, chunk_count=1,
                 text=text, content_hash=content_hash(text), char_start=0, char_end=len(text))


def dead_letter(cfg: Any, failures: list[tuple[Failed, BaseException]],
                stage: str = "embed") -> str:
    """Put records on the chunks topic's dead-letter topic the way a worker does."""
    ensure_topics(cfg.kafka)
    producer = DurableProducer(cfg.kafka)
    letters = DeadLetters(producer, cfg.kafka, stage, cfg.ops.worker_id)
    for record, exc in failures:
        letters.send(record, exc)
    producer.flush()
    topic: str = cfg.kafka.dlq_topic(cfg.kafka.chunks_topic)
    return topic


def failed_chunks(cfg: Any, docs: dict[str, str], tenant: str = "default",
                  exc: BaseException | None = None) -> list[tuple[Failed, BaseException]]:
    """One failed chunk record per document."""
    now_ms = int(time.time() * 1000)
    return [(Failed(cfg.kafka.chunks_topic, chunk_of(tenant, d, t).key,
                    encode_chunk(chunk_of(tenant, d, t)), i, now_ms - 60_000 + i),
             exc or PermanentError(f"injected failure of {d}"))
            for i, (d, t) in enumerate(docs.items())]


def replay_cli(cfg: Any, dlq: str, *args: str, **kw: Any) -> dict[str, Any]:
    """Run ``vecpipe dlq replay --json`` and return its summary object."""
    out = run_cli(cfg, "dlq", "replay", dlq, "--json", *args, **kw).stdout.strip().splitlines()
    summary: dict[str, Any] = json.loads(out[-1])["summary"]
    return summary


def stored(cfg: Any) -> list[tuple[Any, ...]]:
    """Every stored chunk with its row version (xmin): equal lists mean nothing was rewritten."""
    with connect(cfg.database) as conn:
        return sorted(conn.execute(
            "SELECT tenant_id, doc_id, chunk_index, doc_version, content_hash, embedded_at, "
            "xmin::text FROM chunks").fetchall())


def replay_rows(cfg: Any) -> list[dict[str, Any]]:
    """The replay audit's rows, oldest first."""
    with connect(cfg.database) as conn:
        cur = conn.execute("SELECT * FROM replay_audit ORDER BY id")
        names = [c.name for c in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def publish(cfg: Any, docs: dict[str, str]) -> None:
    """Publish ``docs`` through the Python API."""
    with Publisher(cfg) as pub:
        for doc_id, text in docs.items():
            pub.publish(Document(cfg.produce.tenant, doc_id, text, version=1))


def test_wrong_dimension_dead_letters_every_chunk_and_after_the_fix_replay_lands_them_once(
    migrated: Any, encoder: Any,
) -> None:
    """A misconfigured embed worker dead-letters every chunk with the precise error and the
    original record; after the fix, replay + embed + write store each chunk exactly once."""
    cfg = migrated
    dlq = cfg.kafka.dlq_topic(cfg.kafka.chunks_topic)
    publish(cfg, DOCS)
    originals = {m.key(): m for m in read_topic(cfg, cfg.kafka.chunks_topic)}
    assert len(originals) == len(DOCS)

    wrong = with_section(cfg, "vector", dimension=128)
    assert run_stage("embed", wrong, until_idle_s=2.0, encoder=encoder) == 0
    # Only the gaps the dead-lettered chunks leave reach the embeddings topic.
    assert {header_value(m.headers(), "vecpipe.schema")
            for m in read_topic(cfg, cfg.kafka.embeddings_topic, timeout=3)} <= {GAP}
    dead = read_topic(cfg, dlq)
    assert sorted(m.key() for m in dead) == sorted(originals)
    for m in dead:
        original = originals[m.key()]
        assert m.value() == original.value()
        # Dead-letter topics append with their own time; the publish time is in a header.
        assert published_at(m.headers(), (0, 0)) == published_at(original.headers(),
                                                                   original.timestamp())
        headers = m.headers()
        kept = header_list(original.headers())
        assert header_list(headers)[:len(kept)] == kept
        assert header_value(headers, H_CLASS) == "vecpipe.errors.PermanentError"
        assert "384 dimensions but vector.dimension is 128" in (
            header_value(headers, H_MESSAGE) or "")
        assert header_value(headers, H_TOPIC) == cfg.kafka.chunks_topic
        assert header_value(headers, H_OFFSET) == str(original.offset())
        assert header_value(headers, H_STAGE) == "embed"

    summary = replay_cli(cfg, "chunks")
    assert (summary["replayed"], summary["ended"]) == (len(DOCS), "end")
    assert summary["by_error_class"] == {"vecpipe.errors.PermanentError": len(DOCS)}
    replayed = [m for m in read_topic(cfg, cfg.kafka.chunks_topic)
                if header_value(m.headers(), H_REPLAYS) is not None]
    assert len(replayed) == len(DOCS)
    for m in replayed:
        assert header_value(m.headers(), H_REPLAYS) == "1"
        assert header_value(m.headers(), H_CLASS) is None
        assert header_value(m.headers(), H_FIRST_FAILED) is not None
        assert m.value() == originals[m.key()].value()
        original = originals[m.key()]
        assert published_at(m.headers(), (0, 0)) == published_at(original.headers(),
                                                                   original.timestamp())

    assert run_stage("embed", cfg, until_idle_s=2.0, encoder=encoder) == 0
    assert run_stage("write", cfg, until_idle_s=2.0) == 0
    # The embeddings topic holds the first attempt's gaps, then the replay's embeddings.
    kinds = Counter(header_value(m.headers(), "vecpipe.schema")
                    for m in read_topic(cfg, cfg.kafka.embeddings_topic))
    assert kinds == {GAP: len(DOCS), "vecpipe.embedding": len(DOCS)}
    rows = stored(cfg)
    assert sorted(r[1] for r in rows) == sorted(DOCS)


def test_replaying_the_same_records_twice_leaves_the_database_as_once(
    migrated: Any, encoder: Any,
) -> None:
    """A second replay of the same dead letters sends them again, and the merge changes no row."""
    cfg = migrated
    docs = dict(list(DOCS.items())[:3])
    dlq = dead_letter(cfg, failed_chunks(cfg, docs))

    assert replay_cli(cfg, dlq)["replayed"] == 3
    assert run_stage("embed", cfg, until_idle_s=2.0, encoder=encoder) == 0
    assert run_stage("write", cfg, until_idle_s=2.0) == 0
    once = stored(cfg)
    assert [r[1] for r in once] == sorted(docs)

    assert replay_cli(cfg, dlq, "--from-beginning")["replayed"] == 3
    assert run_stage("embed", cfg, until_idle_s=2.0, encoder=encoder) == 0
    assert run_stage("write", cfg, until_idle_s=2.0) == 0
    assert len(read_topic(cfg, cfg.kafka.chunks_topic)) == 6
    assert len(read_topic(cfg, cfg.kafka.embeddings_topic)) == 6
    assert stored(cfg) == once


def test_a_record_failing_again_returns_with_a_higher_replay_count_until_max_replays(
    migrated: Any, encoder: Any,
) -> None:
    """Still broken after a replay: the record is dead-lettered again with replay count 1 and
    its first-failed-at, and once at dead_letter.max_replays replay skips it."""
    cfg = migrated
    wrong = with_section(cfg, "vector", dimension=128)
    dlq = cfg.kafka.dlq_topic(cfg.kafka.chunks_topic)
    publish(cfg, dict(list(DOCS.items())[:2]))
    assert run_stage("embed", wrong, until_idle_s=2.0, encoder=encoder) == 0
    first = {m.key(): m for m in read_topic(cfg, dlq)}

    assert replay_cli(cfg, dlq, "--max-replays", "1")["replayed"] == 2
    assert run_stage("embed", wrong, until_idle_s=2.0, encoder=encoder) == 0
    again = [m for m in read_topic(cfg, dlq) if header_value(m.headers(), H_REPLAYS)]
    assert len(again) == 2
    for m in again:
        assert header_value(m.headers(), H_REPLAYS) == "1"
        assert header_value(m.headers(), H_FIRST_FAILED) == header_value(
            first[m.key()].headers(), H_FIRST_FAILED)
        assert [k for k, _ in header_list(m.headers())].count(H_CLASS) == 1

    summary = replay_cli(cfg, dlq, "--max-replays", "1")
    assert (summary["replayed"], summary["skipped_max_replays"]) == (0, 2)
    assert len(read_topic(cfg, cfg.kafka.chunks_topic)) == 4
    out = run_cli(cfg, "dlq", "inspect", dlq, "--max-replays", "1").stdout
    assert "2 record(s) were already replayed 1 time(s)" in out


def test_interrupted_replay_resumes_without_sending_anything_twice(migrated: Any) -> None:
    """A replay stopped mid-way (StopFlag, then --limit) resumes where the acknowledged records
    end: the target gets every record exactly once, with its key, value and publish time."""
    cfg = migrated
    docs = {f"d{i:02d}": f"text number {i}" for i in range(10)}
    failures = failed_chunks(cfg, docs)
    dlq = dead_letter(cfg, failures)
    target = f"{cfg.kafka.chunks_topic}.replayed"
    ensure_topics(cfg.kafka, [target])

    stop = StopFlag()
    seen: list[Decision] = []

    def stop_after_three(dead: Any, decision: Decision, to: str | None) -> None:
        seen.append(decision)
        if len(seen) == 3:
            stop.set()

    summary = replay(cfg, dlq, ReplayOptions(to=target), stop=stop, log=get_logger(),
                     on_record=stop_after_three)
    assert (summary.ended, summary.replayed) == ("stopped", 3)
    assert sum(offsets_committed(cfg.kafka, default_group(dlq), dlq).values()) == 3

    limited = replay_cli(cfg, dlq, "--to", target, "--limit", "4")
    assert (limited["ended"], limited["replayed"]) == ("limit", 4)
    rest = replay_cli(cfg, dlq, "--to", target)
    assert (rest["ended"], rest["replayed"]) == ("end", 3)
    assert replay_cli(cfg, dlq, "--to", target)["ended"] == "nothing_left"

    out = read_topic(cfg, target)
    assert Counter(m.key() for m in out) == Counter(r.key() for r, _ in failures)
    by_key = {r.key(): r for r, _ in failures}
    for m in out:
        assert m.value() == by_key[m.key()].value()
        assert published_at(m.headers(), (0, 0)) == datetime.fromtimestamp(
            by_key[m.key()].timestamp_ms / 1000, UTC)
        assert header_value(m.headers(), "trace-id") == "t-1"


def test_dry_run_sends_nothing_and_filters_pick_the_records(migrated: Any) -> None:
    """--dry-run lists what would go and stores no progress; --error-class and --key-pattern
    then replay exactly the records they name."""
    cfg = migrated
    dlq = dead_letter(cfg, [
        *failed_chunks(cfg, {"a1": "x one", "a2": "x two"}, tenant="tenant-a",
                       exc=PermanentError("bad a")),
        *failed_chunks(cfg, {"b1": "y one"}, tenant="tenant-b", exc=PermanentError("bad b")),
        *failed_chunks(cfg, {"a3": "z three"}, tenant="tenant-a", exc=KeyError("other")),
    ])
    target = f"{cfg.kafka.chunks_topic}.replayed"
    ensure_topics(cfg.kafka, [target])
    picks = ("--error-class", "permanent", "--key-pattern", "tenant-a/*")

    proc = run_cli(cfg, "dlq", "replay", dlq, "--to", target, "--dry-run", *picks)
    would = [ln for ln in proc.stdout.splitlines() if ln.startswith("would replay")]
    assert len(would) == 2 and all("tenant-a/a" in ln for ln in would)
    assert "DRY RUN" in proc.stdout
    assert offsets_committed(cfg.kafka, default_group(dlq), dlq) == {}
    assert read_topic(cfg, target, timeout=3) == []

    first = read_topic(cfg, dlq)[0]
    proc = run_cli(cfg, "dlq", "replay", dlq, "--to", target, "--dry-run", "--json",
                   "--partition", str(first.partition()), "--offsets",
                   f"{first.offset()}-{first.offset()}")
    lines = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert [ln["key"] for ln in lines[:-1]] == [first.key().decode()]
    assert lines[-1]["summary"]["dry_run"] is True

    summary = replay_cli(cfg, dlq, "--to", target, *picks)
    assert (summary["replayed"], summary["skipped_by_filter"]) == (2, 2)
    assert sorted(m.key() for m in read_topic(cfg, target)) == [b"tenant-a/a1", b"tenant-a/a2"]


def test_inspect_lists_errors_with_counts_and_moves_no_offsets(cfg: Any) -> None:
    """inspect shows each record's error, origin, stage and replays and counts them by error
    class, in a table or as JSON, without creating a consumer group."""
    dlq = dead_letter(cfg, [
        *failed_chunks(cfg, {f"p{i}": f"p text {i}" for i in range(3)}),
        *failed_chunks(cfg, {f"k{i}": f"k text {i}" for i in range(2)}, exc=KeyError("k")),
        *failed_chunks(cfg, {"v0": "v text"}, exc=ValueError("v")),
    ])
    admin = admin_client(cfg.kafka)
    groups_before = {g.group_id for g in admin.list_consumer_groups().result(10).valid}

    table = run_cli(cfg, "dlq", "inspect", "chunks").stdout
    assert "6 record(s) on " + dlq in table
    for count, cls in ((3, "vecpipe.errors.PermanentError"), (2, "builtins.KeyError"),
                       (1, "builtins.ValueError")):
        assert f"{count}  {cls}" in table
    assert table.index("PermanentError  ") < table.index("builtins.ValueError")
    assert f"{cfg.kafka.chunks_topic}[0]@" in table

    proc = run_cli(cfg, "dlq", "inspect", dlq, "--json", "--limit", "4")
    objs = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert len(objs) == 4
    assert {o["stage"] for o in objs} == {"embed"}
    assert all(o["original_topic"] == cfg.kafka.chunks_topic and o["replays"] == 0
               and o["age_s"] is not None for o in objs)
    assert "3  vecpipe.errors.PermanentError" in proc.stderr

    filtered = run_cli(cfg, "dlq", "inspect", dlq, "--error-class", "KeyError").stdout
    assert "2 matching record(s)" in filtered

    groups_after = {g.group_id for g in admin.list_consumer_groups().result(10).valid}
    assert not {g for g in groups_after - groups_before if "dlq" in g}
    assert offsets_committed(cfg.kafka, default_group(dlq), dlq) == {}

    missing = run_cli(cfg, "dlq", "inspect", "no-such-topic.dlq", check=False)
    assert missing.returncode == 2 and dlq in missing.stderr
    assert "Traceback" not in missing.stderr


def test_dead_letter_rate_cap_stops_a_worker_fed_mostly_bad_messages(
    migrated: Any, encoder: Any,
) -> None:
    """A run of bad records trips the cap: the worker exits 3 without draining the topic into
    the dead letters, and the good records before them are stored. Restarted on the same
    records, it stops again without sending any dead letter a second time."""
    cfg = with_section(with_section(with_section(migrated, "kafka", partitions=1),
                                    "dead_letter", max_consecutive=5),
                       "embed", batch_size=4)
    good = dict(list(DOCS.items())[:4])
    publish(cfg, good)
    producer = DurableProducer(cfg.kafka)
    for i in range(20):
        producer.produce(cfg.kafka.chunks_topic, b"{broken", key=f"default/bad{i}".encode(),
                         headers=schema_headers(CHUNK))
    producer.flush()

    assert run_stage("embed", cfg, until_idle_s=2.0, encoder=encoder) == EXIT_DEAD_LETTER_RATE
    dead = read_topic(cfg, cfg.kafka.dlq_topic(cfg.kafka.chunks_topic))
    assert 0 < len(dead) < 20
    assert run_stage("embed", cfg, until_idle_s=2.0, encoder=encoder) == EXIT_DEAD_LETTER_RATE
    again = read_topic(cfg, cfg.kafka.dlq_topic(cfg.kafka.chunks_topic))
    origins = [header_value(m.headers(), H_OFFSET) for m in again]
    assert len(origins) == len(set(origins)), "a dead letter was sent twice"
    assert sum(offsets_committed(cfg.kafka, cfg.kafka.embed_group,
                                 cfg.kafka.chunks_topic).values()) < 24
    assert run_stage("write", cfg, until_idle_s=2.0) == 0
    assert [r[1] for r in stored(cfg)] == sorted(good)


def test_a_second_replay_of_the_same_topic_is_refused_while_one_runs(migrated: Any) -> None:
    """Two operators replaying the same topic at once would send everything twice: the second
    one is refused with a sentence (and audited as failed with it), and the first one's records
    arrive once."""
    cfg = migrated
    docs = {f"r{i}": f"rate text {i}" for i in range(6)}
    failures = failed_chunks(cfg, docs)
    dlq = dead_letter(cfg, failures)
    target = f"{cfg.kafka.chunks_topic}.replayed"
    ensure_topics(cfg.kafka, [target])
    stop = StopFlag()
    started = threading.Event()
    results: list[Any] = []

    def first_replay() -> None:
        results.append(replay(cfg, dlq, ReplayOptions(to=target, rate=1.0), stop=stop,
                              log=get_logger(), on_record=lambda *_: started.set()))

    thread = threading.Thread(target=first_replay, daemon=True)
    thread.start()
    try:
        assert started.wait(30)
        second = run_cli(cfg, "dlq", "replay", dlq, "--to", target, check=False)
        assert second.returncode == 2, second.stdout
        assert "another replay of this topic is running" in second.stderr
        assert "Traceback" not in second.stderr
        [refused] = replay_rows(cfg)
        assert refused["status"] == "failed" and refused["finished_at"] is not None
        assert "another replay of this topic is running" in refused["error"]
    finally:
        stop.set()
        thread.join(60)
    assert results and results[0].ended == "stopped"
    replay_cli(cfg, dlq, "--to", target)
    assert Counter(m.key() for m in read_topic(cfg, target)) == Counter(
        r.key() for r, _ in failures)


def test_inspect_follow_shows_new_dead_letters_as_they_arrive(cfg: Any) -> None:
    """inspect --follow lists what is there, then each new dead letter, until stopped."""
    dlq = dead_letter(cfg, failed_chunks(cfg, {"old": "old text"}))
    stop = StopFlag()
    seen: list[DeadLetter] = []
    arrived = threading.Event()

    def emit(dead: DeadLetter) -> None:
        seen.append(dead)
        if len(seen) == 2:
            arrived.set()

    thread = threading.Thread(target=lambda: inspect(
        cfg.kafka, dlq, filters=Filters(), limit=None, follow=True, max_replays=3, stop=stop,
        emit=emit), daemon=True)
    thread.start()
    try:
        dead_letter(cfg, failed_chunks(cfg, {"new": "new text"}))
        assert arrived.wait(30)
    finally:
        stop.set()
        thread.join(30)
    assert [d.key_text for d in seen] == ["default/old", "default/new"]


def test_a_replay_is_sent_anew_and_keeps_the_publish_time_in_its_header(migrated: Any) -> None:
    """A replayed record gets a timestamp of now, so that a target with a short retention keeps
    it however old it is, and carries its original publish time in vecpipe.published_at (from
    its timestamp, for a dead letter written before that header existed)."""
    cfg = migrated
    from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

    now_ms = int(time.time() * 1000)
    texts = {"fresh one": now_ms - 60_000, "three hours old": now_ms - 3 * 3_600_000}
    dlq = dead_letter(cfg, [
        (Failed(cfg.kafka.chunks_topic, b"default/same-doc", encode_chunk(
            chunk_of("default", "same-doc", text)), i, ts), PermanentError(text))
        for i, (text, ts) in enumerate(texts.items())])
    target = f"{cfg.kafka.chunks_topic}.short"
    admin = admin_client(cfg.kafka)
    for fut in admin.create_topics([NewTopic(target, num_partitions=1, replication_factor=1,
                                             config={"retention.ms": "7200000"})]).values():
        fut.result(30)
    assert replay_cli(cfg, dlq, "--to", target)["replayed"] == 2
    out = read_topic(cfg, target)
    assert sorted(int(published_at(m.headers(), (0, 0)).timestamp() * 1000) for m in out) == (
        sorted(texts.values()))
    assert all(m.timestamp()[1] >= now_ms for m in out)


def test_dead_letters_a_later_deletion_covers_are_neither_shown_nor_replayed(
        migrated: Any) -> None:
    """Erasure reaches the dead-letter topics: a record of a document deleted after it failed is
    left out of dlq inspect (only counted) and skipped by dlq replay, so that deleted text is not
    spread back into the pipeline; the others are listed and replayed as usual."""
    cfg = migrated
    dlq = dead_letter(cfg, failed_chunks(cfg, {"kept": "text to keep", "erased": "erase me"}))
    pool = make_pool(cfg.database)
    try:
        Store(cfg, pool).apply([], [DeleteRequest("default", "erased", None, datetime.now(UTC),
                                                  {"reason": "gdpr"})])
    finally:
        pool.close()
    proc = run_cli(cfg, "dlq", "inspect", "chunks", "--json")
    assert [json.loads(line)["key"] for line in proc.stdout.splitlines()] == ["default/kept"]
    assert "1 record(s) are covered by a later deletion" in proc.stderr
    summary = replay_cli(cfg, dlq)
    assert (summary["replayed"], summary["skipped_erased"]) == (1, 1)
    replayed = [m for m in read_topic(cfg, cfg.kafka.chunks_topic)
                if header_value(m.headers(), H_REPLAYS) is not None]
    assert [m.key() for m in replayed] == [b"default/kept"]


# -- the replay audit ---------------------------------------------------------------------------

def mixed_dead_letters(cfg: Any) -> str:
    """Three PermanentErrors and one KeyError on the chunks topic's dead-letter topic."""
    return dead_letter(cfg, [
        *failed_chunks(cfg, {f"m{i}": f"mixed text {i}" for i in range(3)}),
        *failed_chunks(cfg, {"k0": "key error text"}, exc=KeyError("k")),
    ])


def test_a_replay_records_who_ran_it_with_which_flags_and_what_went_where(
        migrated: Any) -> None:
    """One replay_audit row per replay: the actor (--actor, else VECPIPE_ACTOR, else user@host),
    the flags as given, status done, and counts equal to what reached the target topic."""
    cfg = migrated
    dlq = mixed_dead_letters(cfg)
    target = f"{cfg.kafka.chunks_topic}.replayed"
    ensure_topics(cfg.kafka, [target])

    out = run_cli(cfg, "dlq", "replay", "chunks", "--json", "--to", target, "--error-class",
                  "permanent", "--since", "1h", "--limit", "2", "--actor", "alice (INC-7)",
                  extra_env={"VECPIPE_ACTOR": "not-me"}).stdout.strip().splitlines()
    printed = json.loads(out[-1])
    [row] = replay_rows(cfg)
    assert printed["audit"] == {"id": row["id"], "actor": "alice (INC-7)", "complete": True}
    sent = read_topic(cfg, target)
    assert (row["actor"], row["status"], row["ended"], row["dry_run"], row["error"]) == (
        "alice (INC-7)", "done", "limit", False, None)
    assert (row["dlq_topic"], row["consumer_group"]) == (dlq, default_group(dlq))
    assert row["worker"].startswith(socket.gethostname())  # the CLI process's ops.worker_id
    assert row["started_at"] <= row["finished_at"]
    since_at = datetime.fromisoformat(row["filters"].pop("since_at"))
    assert abs((datetime.now(UTC) - since_at).total_seconds() - 3600) < 600
    assert row["filters"] == {"topic": "chunks", "to": target, "error_class": "permanent",
                              "since": "1h", "limit": 2}
    assert row["counts"] == printed["summary"]
    assert row["counts"]["replayed"] == len(sent) == 2
    assert row["counts"]["targets"] == {target: len(sent)}
    assert row["counts"]["by_error_class"] == {"vecpipe.errors.PermanentError": 2}

    rest = replay_cli(cfg, dlq, "--to", target, extra_env={"VECPIPE_ACTOR": "ci-job-9"})
    second = replay_rows(cfg)[-1]
    assert second["actor"] == "ci-job-9" and second["filters"] == {"topic": dlq, "to": target}
    assert second["counts"]["replayed"] == rest["replayed"] == len(read_topic(cfg, target)) - 2
    assert second["counts"]["skipped_by_filter"] == 0

    run_cli(cfg, "dlq", "replay", dlq, "--to", target)
    third = replay_rows(cfg)[-1]
    assert third["actor"] == f"{getpass.getuser()}@{socket.gethostname()}"
    assert (third["ended"], third["counts"]["replayed"]) == ("nothing_left", 0)


def test_a_dry_run_is_recorded_as_one(migrated: Any) -> None:
    """A dry run leaves a row marked dry_run, with what it would have replayed, and nothing on
    the target topic."""
    cfg = migrated
    dlq = mixed_dead_letters(cfg)
    target = f"{cfg.kafka.chunks_topic}.replayed"
    ensure_topics(cfg.kafka, [target])
    summary = replay_cli(cfg, dlq, "--to", target, "--dry-run", "--key-pattern", "default/m*")
    [row] = replay_rows(cfg)
    assert (row["dry_run"], row["status"], row["ended"]) == (True, "done", "end")
    assert row["filters"] == {"topic": dlq, "to": target, "key_pattern": "default/m*"}
    assert row["counts"]["replayed"] == summary["replayed"] == 3
    assert row["counts"]["skipped_by_filter"] == 1
    assert read_topic(cfg, target, timeout=3) == []


def test_a_replay_whose_audit_row_cannot_be_written_sends_nothing(migrated: Any) -> None:
    """A schema without replay_audit (not migrated since this version) cannot record the
    replay, so the replay refuses in one sentence: nothing sent, no progress stored."""
    cfg = migrated
    dlq = mixed_dead_letters(cfg)
    target = f"{cfg.kafka.chunks_topic}.replayed"
    ensure_topics(cfg.kafka, [target])
    with connect(cfg.database) as conn:
        conn.execute("DROP TABLE replay_audit")
        conn.commit()
    proc = run_cli(cfg, "dlq", "replay", dlq, "--to", target, check=False)
    assert proc.returncode == 2, proc.stdout
    assert "no replay_audit table; run 'vecpipe migrate' first" in proc.stderr
    assert "the replay did not run" in proc.stderr and "Traceback" not in proc.stderr
    assert read_topic(cfg, target, timeout=3) == []
    assert offsets_committed(cfg.kafka, default_group(dlq), dlq) == {}

    proc = run_cli(cfg, "dlq", "replay", dlq, "--to", target, "--dry-run", check=False)
    assert proc.returncode == 2 and "would replay" not in proc.stdout


def test_the_audit_row_exists_before_the_first_record_is_sent_and_outlives_a_kill(
        migrated: Any) -> None:
    """The row is written (running) before anything is sent, so a replay killed mid-way (kill
    -9) leaves it running, with no finish time, for `vecpipe audit --replays` to show."""
    cfg = migrated
    dlq = dead_letter(cfg, failed_chunks(cfg, {f"s{i}": f"slow text {i}" for i in range(10)}))
    target = f"{cfg.kafka.chunks_topic}.replayed"
    ensure_topics(cfg.kafka, [target])
    group = default_group(dlq)
    proc = subprocess.Popen([sys.executable, "-m", "vecpipe.cli", "dlq", "replay", dlq,
                             "--to", target, "--rate", "1"], env=env_for(cfg),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        # The first record acknowledged and its progress stored (one record a batch at --rate 1).
        while not sum(offsets_committed(cfg.kafka, group, dlq).values()):
            assert proc.poll() is None and time.monotonic() < deadline, "nothing was replayed"
            time.sleep(0.2)
        [row] = replay_rows(cfg)
        assert row["status"] == "running" and row["finished_at"] is None
    finally:
        proc.kill()
        proc.wait(30)
    assert sum(offsets_committed(cfg.kafka, group, dlq).values()) < 10, (
        "the replay finished before it was killed")
    [row] = replay_rows(cfg)
    assert (row["status"], row["finished_at"], row["ended"]) == ("running", None, None)
    listing = run_cli(cfg, "audit", "--replays").stdout
    assert f"#{row['id']}" in listing and "still going, or killed" in listing


def test_a_completion_that_fails_after_records_were_sent_keeps_them_and_says_so(
        migrated: Any) -> None:
    """The audit row can no longer be completed once records are out (here: its table goes
    away mid-replay): the replay still delivers everything and stores its progress, and its
    summary names the problem instead of pretending it was recorded."""
    cfg = migrated
    docs = {f"c{i}": f"completion text {i}" for i in range(3)}
    dlq = dead_letter(cfg, failed_chunks(cfg, docs))
    target = f"{cfg.kafka.chunks_topic}.replayed"
    ensure_topics(cfg.kafka, [target])
    audit = ReplayAuditLog(cfg, actor="tester", filters={"topic": dlq})
    states: list[str] = []

    def drop_the_table(*_: Any) -> None:
        if not states:
            states.append(replay_rows(cfg)[0]["status"])
            with connect(cfg.database) as conn:
                conn.execute("DROP TABLE replay_audit")
                conn.commit()

    summary = replay(cfg, dlq, ReplayOptions(to=target), stop=StopFlag(), log=get_logger(),
                     on_record=drop_the_table, audit=audit)
    assert states == ["running"]
    assert summary.replayed == 3 and summary.ended == "end"
    assert f"could not complete replay #{audit.row_id}" in summary.audit_problem
    assert len(read_topic(cfg, target)) == 3
    assert sum(offsets_committed(cfg.kafka, default_group(dlq), dlq).values()) == 3


def test_audit_replays_lists_them_newest_first_with_json_and_time_bounds(
        migrated: Any) -> None:
    """`vecpipe audit --replays --json` shows the recorded replays newest first, the same rows
    the replays reported; --limit, --since and --until bound the list."""
    cfg = migrated
    dlq = mixed_dead_letters(cfg)
    target = f"{cfg.kafka.chunks_topic}.replayed"
    ensure_topics(cfg.kafka, [target])
    dry = json.loads(run_cli(cfg, "dlq", "replay", dlq, "--json", "--to", target,
                             "--dry-run").stdout.splitlines()[-1])
    real = json.loads(run_cli(cfg, "dlq", "replay", dlq, "--json", "--to", target, "--actor",
                              "bob").stdout.splitlines()[-1])

    listed = json.loads(run_cli(cfg, "audit", "--replays", "--json").stdout)
    assert [r["id"] for r in listed] == [real["audit"]["id"], dry["audit"]["id"]]
    newest = listed[0]
    assert (newest["actor"], newest["status"], newest["dry_run"]) == ("bob", "done", False)
    assert newest["counts"] == real["summary"]
    assert newest["counts"]["replayed"] == len(read_topic(cfg, target)) == 4
    assert listed[1]["dry_run"] is True and listed[1]["counts"] == dry["summary"]
    datetime.fromisoformat(newest["started_at"])

    limited = json.loads(run_cli(cfg, "audit", "--replays", "--json", "--limit", "1").stdout)
    assert [r["id"] for r in limited] == [real["audit"]["id"]]
    first_at = datetime.fromisoformat(listed[1]["started_at"])
    before = (first_at - timedelta(seconds=1)).isoformat()
    assert json.loads(run_cli(cfg, "audit", "--replays", "--json", "--until",
                              before).stdout) == []
    assert len(json.loads(run_cli(cfg, "audit", "--replays", "--json", "--since",
                                  before).stdout)) == 2

    table = run_cli(cfg, "audit", "--replays").stdout
    assert table.index(f"#{real['audit']['id']}") < table.index(f"#{dry['audit']['id']}")
    assert "by bob (" in table and f"replayed 4 to {target} 4" in table
    assert "DRY RUN" in table and f"would replay 4 to {target} 4" in table
