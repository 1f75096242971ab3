"""Fault injection and bad input against the real broker, database and model.

Workers are killed with SIGKILL at random moments, PostgreSQL and the broker are restarted under
load, consumer groups rebalance mid-ingest, a corpus of malformed and hostile messages is
published raw, and dead letters are replayed twice. After each scenario the database must hold
exactly the expected rows: nothing lost, nothing duplicated, the newest version of every document,
deletes applied. The figures of every scenario are printed at the end and written as JSON to
``$VECPIPE_FAULTS_REPORT`` (default: ``faults-report.json`` in pytest's base temp folder).

Sizes are bounded so that the file runs in a few minutes on two cores; ``VECPIPE_SOAK=1`` adds the
long soak variant (``VECPIPE_SOAK_DOCS`` documents per tenant, default 2,500).
``VECPIPE_FAULTS_SEED`` repeats a run's kill schedule.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import random
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from confluent_kafka import Producer

from producers.chunking import MAX_CHUNK_CHARS
from producers.publisher import Publisher
from tests.faultlib import (
    FAST_GROUP_CLIENT,
    Corpus,
    FaultLog,
    LockedEncoder,
    ThreadWorker,
    WorkerExited,
    WorkerProcess,
    committed_lag,
    line_chunker,
    native_home,
    restart_kafka,
    restart_postgres,
    services_restored,
    stored_documents,
    stored_rows,
    stored_vectors,
    summary_lines,
    topic_count,
    wait_until,
)
from tests.helpers import connect, read_topic, run_cli, run_stage
from vecpipe.deadletter.headers import (
    H_ATTEMPTS,
    H_CLASS,
    H_MESSAGE,
    H_OFFSET,
    H_ORIGINAL_BYTES,
    H_PARTITION,
    H_STACK,
    H_STAGE,
    H_TOPIC,
    H_TRUNCATED,
    H_WORKER,
)
from vecpipe.errors import Unreachable
from vecpipe.kafka.admin import ensure_topics
from vecpipe.kafka.producer import DurableProducer
from vecpipe.messages import (
    CHUNK,
    DELETE,
    DOCUMENT,
    EMBEDDING,
    Chunk,
    Delete,
    Document,
    Embedding,
    content_hash,
    document_key,
    encode_chunk,
    encode_delete,
    encode_embedding,
    header_value,
    published_header,
    schema_headers,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SEED = int(os.environ.get("VECPIPE_FAULTS_SEED", str(random.SystemRandom().randrange(10**6))))
SOAK = os.environ.get("VECPIPE_SOAK") == "1"
_ENTRIES: list[FaultLog] = []


# -- the summary ------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def fault_summary(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the module: print the figures of every scenario and write them as JSON."""
    yield
    if not _ENTRIES:
        return
    path = Path(os.environ.get("VECPIPE_FAULTS_REPORT")
                or tmp_path_factory.getbasetemp() / "faults-report.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seed": SEED, "scenarios": [e.as_dict() for e in _ENTRIES]},
                               indent=2, ensure_ascii=False) + "\n")
    lines = ["", f"fault-injection summary (seed {SEED})", *summary_lines(_ENTRIES),
             f"report: {path}"]
    # Shown whether the tests passed or not: outside pytest's output capture.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n".join(lines), flush=True)


@pytest.fixture
def fault_log(request: pytest.FixtureRequest) -> Iterator[FaultLog]:
    """This test's entry in the summary."""
    entry = FaultLog(request.node.name)
    yield entry
    entry.finish()
    _ENTRIES.append(entry)


def fast_group(cfg: Any) -> Any:
    """``cfg`` with short consumer sessions, as the worker processes get them."""
    return replace(cfg, kafka=replace(cfg.kafka, client={**cfg.kafka.client, **FAST_GROUP_CLIENT}))


# -- the final assertion ---------------------------------------------------------------------------

def assert_exactly(cfg: Any, corpus: Corpus, log: FaultLog, encoder: Any = None) -> None:
    """The database holds exactly the corpus's rows and documents, every offset is committed,
    and nothing went to a dead-letter topic."""
    rows = stored_rows(cfg)
    expected = corpus.expected_rows()
    found = set(rows)
    k = cfg.kafka
    dead = {t: topic_count(cfg, k.dlq_topic(t)) for t in (k.chunks_topic, k.embeddings_topic)}
    log.note(messages_in=topic_count(cfg, k.chunks_topic),
             messages_out=topic_count(cfg, k.embeddings_topic),
             rows_expected=len(expected), rows_found=len(rows),
             dead_letters=sum(dead.values()))
    assert len(rows) == len(found), "a (tenant, doc, chunk) key is stored twice"
    missing, extra = sorted(expected - found), sorted(found - expected)
    assert not missing and not extra, (
        f"{len(missing)} expected row(s) missing, e.g. {missing[:3]}; {len(extra)} unexpected "
        f"row(s), e.g. {extra[:3]}")
    docs, want = stored_documents(cfg), corpus.expected_documents()
    wrong = sorted((key, docs.get(key), state) for key, state in want.items()
                   if docs.get(key) != state)
    assert not wrong and len(docs) == len(want), (
        f"{len(wrong)} document row(s) differ (key, stored, expected): {wrong[:3]}")
    assert dead == {k.chunks_topic: 0, k.embeddings_topic: 0}, f"dead letters: {dead}"
    for group, topic in ((k.embed_group, k.chunks_topic), (k.write_group, k.embeddings_topic)):
        assert committed_lag(cfg, group, topic) == 0, f"{group} left records uncommitted"
    if encoder is not None:
        # The stored vector is the model's vector of the stored text: no mix-up under redelivery.
        texts = corpus.texts()
        sample = random.Random(SEED).sample(sorted({(t, d, i) for t, d, i, _, _ in found}),
                                            min(24, len(found)))
        vectors = stored_vectors(cfg, sample)
        fresh = encoder.encode([texts[key] for key in sample])
        for key, vec in zip(sample, fresh, strict=True):
            assert float(np.dot(vectors[key], vec)) > 0.999, f"vector of {key} is not its text's"
    log.note(verdict="exact")


# -- kill -9 ---------------------------------------------------------------------------------------

def kill_campaign(cfg: Any, corpus: Corpus, kills: int, log: FaultLog, logs: Path,
                  max_delay_s: tuple[float, float] = (0.5, 0.5), drain_idle_s: float = 15.0,
                  more_faults: Callable[[threading.Event], None] | None = None) -> None:
    """Ingest ``corpus`` while each stage is killed with SIGKILL ``kills`` times at random
    moments, a replacement joining its group each time; then drain with ``--until-idle``. An
    embed worker dies once a random share of the wave sent just before was embedded, a writer
    once records wait for it; each up to ``max_delay_s`` (embed, write) later.

    The corpus goes out in ``kills + 1`` waves, one just before each embed kill, so that every
    kill finds work under way however fast the machine is. ``more_faults`` runs alongside until
    the event it gets is set (when the kills are over, before the drain).
    """
    ensure_topics(cfg.kafka)
    errors: list[BaseException] = []
    done = threading.Event()
    embed_killed = threading.Event()
    embed_drained = threading.Event()
    k = cfg.kafka
    groups = {"embed": (k.embed_group, k.chunks_topic),
              "write": (k.write_group, k.embeddings_topic)}
    size = -(-len(corpus.actions) // (kills + 1))
    waves = [Corpus(corpus.actions[i:i + size]) for i in range(0, len(corpus.actions), size)]
    started: list[WorkerProcess] = []

    def start(stage: str, *args: str) -> WorkerProcess:
        started.append(WorkerProcess.start(cfg, stage, logs, *args))
        return started[-1]

    def start_assigned(stage: str, *args: str) -> WorkerProcess:
        # A worker that finds a service down at start exits 2 with a sentence, as it should;
        # with services restarting alongside, start it again, as Kubernetes would.
        for _ in range(10):
            worker = start(stage, *args)
            try:
                worker.wait_assigned(600)
                return worker
            except WorkerExited as exc:
                if more_faults is None or exc.returncode != 2:
                    raise
                log.fault(f"{stage} start refused (service down)")
                time.sleep(3)
        raise AssertionError(f"the {stage} worker could not start ten times in a row")

    def publish_wave() -> int:
        if not waves:
            return 0
        wave = waves.pop(0)
        for attempt in range(60):
            try:
                sent = wave.publish(cfg)
                log.add("published", sent)
                return sent
            except Unreachable:  # the broker is being restarted (soak): publish once it is back
                if attempt == 59:
                    raise
                time.sleep(3)
        return 0

    def embedded_at_least(n: int) -> bool:
        return topic_count(cfg, k.embeddings_topic) >= n

    def has_work(stage: str) -> Callable[[], bool]:
        # A kill while idle proves little: wait until the group has records not yet committed.
        return lambda: committed_lag(cfg, *groups[stage]) > 0 or embed_drained.is_set()

    def chaos(stage: str, rng: random.Random) -> None:
        # The replacement starts (and loads its model) while the doomed worker works on; once
        # it joined the group, the doomed one is killed at a random moment: work goes on through
        # every model load, and each kill also forces a rebalance. The embed stage's last
        # replacement runs with --until-idle and is the drain.
        current: WorkerProcess | None = None
        try:
            if stage == "embed":
                publish_wave()
            current = start_assigned(stage)
            for n in range(kills):
                last = stage == "embed" and n == kills - 1
                drain = ["--until-idle", str(drain_idle_s)] if last else []
                replacement = start_assigned(stage, *drain)
                if stage == "embed":
                    # Killed at a random point of the wave's progress, whatever the machine's
                    # speed: after a random share of it was embedded and acknowledged.
                    before = topic_count(cfg, k.embeddings_topic)
                    share = rng.uniform(0.05, 0.8)
                    target = before + int(share * publish_wave())
                    wait_until(functools.partial(embedded_at_least, target), 600,
                               f"{share:.0%} of the wave embedded", every=0.1)
                else:
                    wait_until(has_work(stage), 600, "work for the writer", every=0.5)
                time.sleep(rng.uniform(0.0, max_delay_s[stage == "write"]))
                assert current.proc.poll() is None, (
                    f"{stage} worker exited {current.proc.returncode} before its kill:\n"
                    f"{current.tail()}")
                # Records not yet committed by the group: in flight or waiting at the kill.
                log.add(f"uncommitted_at_kill_{stage}", committed_lag(cfg, *groups[stage]))
                current.kill9()
                log.fault(f"kill -9 {stage}")
                current = replacement
            if stage == "embed":
                while waves:
                    publish_wave()
                embed_killed.set()
                code = current.wait(900)
                assert code == 0, f"the embed drain exited {code}:\n{current.tail()}"
                embed_drained.set()
            else:
                embed_drained.wait(1800)
                current.kill9()
                log.fault(f"kill -9 {stage}")
        except BaseException as exc:
            errors.append(exc)
            embed_killed.set()
            embed_drained.set()

    def extra() -> None:
        try:
            assert more_faults is not None
            more_faults(done)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=chaos, args=("embed", random.Random(SEED))),
               threading.Thread(target=chaos, args=("write", random.Random(SEED + 1)))]
    side = threading.Thread(target=extra) if more_faults is not None else None
    try:
        for t in [*threads, *([side] if side else [])]:
            t.start()
        embed_killed.wait()
        done.set()  # the extra faults end with the kills, before the drain
        if side is not None:
            side.join(600)
        for t in threads:
            t.join()
        if errors:
            for other in errors[1:]:
                errors[0].add_note(f"also: {other!r}")
            raise errors[0]
        final = start("write", "--until-idle", "8")
        code = final.wait(600)
        assert code == 0, f"the final write run exited {code}:\n{final.tail()}"
    finally:
        for worker in started:  # no worker outlives a failed campaign
            if worker.proc.poll() is None:
                worker.kill9()
    for stage in groups:
        assert any(log.figures[f"uncommitted_at_kill_{stage}"]), f"every {stage} kill hit idle"


def test_kill_9_embedders_and_writers_during_ingest_loses_and_duplicates_nothing(
    migrated: Any, encoder: Any, tmp_path: Path, fault_log: FaultLog
) -> None:
    """Invariants 1-3: SIGKILL of either stage at any moment loses nothing, duplicates nothing."""
    corpus = Corpus.build(tenants=2, docs=200, chunks=5, updates=40, deletes=10)
    assert corpus.chunk_messages >= 2000
    kill_campaign(migrated, corpus, kills=5, log=fault_log, logs=tmp_path / "logs")
    assert fault_log.faults == {"kill -9 embed": 5, "kill -9 write": 6}
    assert_exactly(migrated, corpus, fault_log, encoder)


# -- service restarts ------------------------------------------------------------------------------

@pytest.fixture
def services_home(endpoints: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The home of the session's native services; skip where the fixture did not start them."""
    if endpoints.how != "native":
        pytest.skip(f"services come from {endpoints.how}: this test restarts native ones only")
    home = native_home(tmp_path_factory.getbasetemp(), endpoints.bootstrap)
    assert home is not None, "cannot find the session's services home"
    return home


def outage_under_load(cfg: Any, encoder: Any, corpus: Corpus, log: FaultLog, logs: Path,
                      fault: Callable[[], float], kind: str) -> WorkerProcess:
    """An in-process embedder and a writer process ingest ``corpus``; ``fault`` strikes while
    the second half is published. Both must carry on by themselves to the exact end state."""
    ensure_topics(cfg.kafka)
    half = len(corpus.actions) // 2
    first, second = Corpus(corpus.actions[:half]), Corpus(corpus.actions[half:])
    embed = ThreadWorker("embed", fast_group(cfg), encoder=encoder)
    writer = WorkerProcess.start(cfg, "write", logs)
    try:
        writer.wait_assigned(120)
        first.publish(cfg)
        wait_until(lambda: len(stored_rows(cfg)) > 0, 120, "the first rows")
        errors: list[BaseException] = []

        def publish_second() -> None:
            try:
                second.publish(cfg, waves=6, pause_s=1.0)
            except BaseException as exc:
                errors.append(exc)

        publisher = threading.Thread(target=publish_second)
        publisher.start()
        time.sleep(1.0)  # the fault strikes while records are in flight
        before = set(stored_rows(cfg))
        log.note(outage_s=round(fault(), 1), rows_at_fault=len(before))
        log.fault(kind)
        publisher.join(300)
        assert not errors, f"publishing through the {kind} failed: {errors[0]!r}"
        expected = corpus.expected_rows()
        assert before != expected, f"everything had landed before the {kind}"
        wait_until(lambda: set(stored_rows(cfg)) == expected, 240,
                   f"the exact rows after the {kind}")
        assert embed.alive, f"the embedder stopped during the {kind}"
        assert writer.proc.poll() is None, (
            f"the writer exited {writer.proc.returncode} during the {kind}:\n{writer.tail()}")
    finally:
        code = writer.terminate()
        embed_code = embed.stop()
    assert (embed_code, code) == (0, 0), writer.tail()
    return writer


@pytest.mark.pgbouncer
def test_postgres_restart_mid_ingest_is_ridden_out_and_loses_nothing(
    migrated: Any, encoder: Any, services_home: Path, tmp_path: Path, fault_log: FaultLog
) -> None:
    """Invariant 6: the running writer rides out a database restart mid-ingest (its transaction
    retried or its connection waited for) while the embedder goes on without its vector cache."""
    cfg = migrated
    corpus = Corpus.build(tenants=2, docs=60, chunks=3, updates=12, deletes=6)
    embedded: list[int] = []

    def restart() -> float:
        return restart_postgres(services_home, down_s=4.0, probe=lambda: embedded.append(
            topic_count(cfg, cfg.kafka.embeddings_topic)))

    with services_restored(services_home):
        writer = outage_under_load(cfg, encoder, corpus, fault_log, tmp_path / "logs", restart,
                                   "postgres restart")
    retries = [e for e in writer.events() if e.get("event") == "retrying"]
    fault_log.note(writer_retries=len(retries), embedded_while_down=embedded[1] - embedded[0])
    assert embedded[1] > embedded[0], (
        "no chunk was embedded while the database was down: the embed stage waits on its "
        "optional vector cache instead of encoding")
    assert_exactly(cfg, corpus, fault_log)


def test_kafka_broker_restart_mid_ingest_loses_and_duplicates_nothing(
    migrated: Any, encoder: Any, services_home: Path, tmp_path: Path, fault_log: FaultLog
) -> None:
    """Invariants 1, 2, 6: SIGKILL of the broker mid-ingest, restarted on its ports; exact end."""
    corpus = Corpus.build(tenants=2, docs=60, chunks=3, updates=12, deletes=6)
    with services_restored(services_home):
        outage_under_load(migrated, encoder, corpus, fault_log, tmp_path / "logs",
                          lambda: restart_kafka(services_home, down_s=2.0), "broker kill -9")
    assert_exactly(migrated, corpus, fault_log)


# -- rebalances ------------------------------------------------------------------------------------

def test_two_embedders_and_two_writers_rebalancing_mid_ingest_land_everything_once(
    migrated: Any, encoder: Any, fault_log: FaultLog
) -> None:
    """Invariants 1-3 under rebalances: members join and leave both groups while records flow."""
    cfg = fast_group(migrated)
    ensure_topics(cfg.kafka)
    corpus = Corpus.build(tenants=2, docs=100, chunks=3, updates=20, deletes=10)
    shared = LockedEncoder(encoder)
    first_wave = sum(1 for a in corpus.actions if isinstance(a, Document) and a.version == 1) * 3

    def landed(fraction: float) -> Callable[[], bool]:
        return lambda: len(stored_rows(cfg)) >= fraction * first_wave

    members = [ThreadWorker("embed", cfg, encoder=shared), ThreadWorker("write", cfg)]
    everyone = list(members)
    publisher = threading.Thread(target=corpus.publish, args=(cfg, 12, 1.2))
    publisher.start()
    codes: list[int] = []
    try:
        for fraction in (0.1, 0.35, 0.6):
            wait_until(landed(fraction), 180, f"{fraction:.0%} of the first versions")
            joining = [ThreadWorker("embed", cfg, encoder=shared), ThreadWorker("write", cfg)]
            everyone += joining
            fault_log.fault("member joins", 2)
            time.sleep(2.0)  # let the joiners take partitions over while records flow
            leaving, members = members, joining
            codes += [m.stop() for m in leaving]
            fault_log.fault("member leaves", 2)
        publisher.join(300)
        expected = corpus.expected_rows()
        wait_until(lambda: set(stored_rows(cfg)) == expected, 240, "the exact rows")
        codes += [m.stop() for m in members]
    finally:
        publisher.join(300)
        for m in everyone:
            if m.alive:
                m.flag.set()
    assert codes == [0] * len(codes)
    assert_exactly(cfg, corpus, fault_log, encoder)


# -- bad input -------------------------------------------------------------------------------------

@dataclass
class Case:
    """One message published raw, and where it must end up."""

    name: str
    topic: str  # "chunks" or "embeddings"
    key: bytes
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    # "land": stored as sent; "dlq": dead-lettered with a message holding one of ``says``;
    # "dlq|land": either (the row must then hold what ``row`` says).
    outcome: str
    says: tuple[str, ...] = ()
    stage: str | None = None  # the stage that must dead-letter it (None: either)
    row: dict[str, Any] = field(default_factory=dict)  # what a landed row must hold
    compression: str = "lz4"  # how the raw producer compresses it


def chunk_dict(tenant: str, doc: str, text: str, **extra: Any) -> dict[str, Any]:
    """A valid chunk.v1 object, changed by ``extra``."""
    data: dict[str, Any] = {"tenant_id": tenant, "doc_id": doc, "version": 1, "chunk_index": 0,
                            "chunk_count": 1, "text": text, "content_hash": content_hash(text)}
    data.update(extra)
    return data


def unit_vector(seed: int, dim: int = 384) -> npt.NDArray[np.float32]:
    """A random unit vector."""
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return (v / np.linalg.norm(v)).astype(np.float32)


def embedding_bytes(doc: str, vector: npt.NDArray[np.float32], dtype: str = "float32") -> bytes:
    """An embedding message of tenant 'acme' with ``vector``, encoded as the contract says."""
    text = f"hand-built embedding {doc}"
    chunk = Chunk("acme", doc, 1, 0, 1, text, content_hash(text), 0, len(text))
    return encode_embedding(Embedding(chunk, vector, "hand", "r1", "torch-fp32"), dtype)


def embedding_with(doc: str, **meta: Any) -> bytes:
    """A hand-built embedding message whose metadata block has ``meta`` changed."""
    value = embedding_bytes(doc, unit_vector(7))
    (size,) = struct.unpack(">I", value[:4])
    data = json.loads(value[4:4 + size])
    data.update(meta)
    block = json.dumps(data).encode()
    return struct.pack(">I", len(block)) + block + value[4 + size:]


def nested(depth: int) -> Any:
    """A list nested ``depth`` deep."""
    return json.loads("[" * depth + "]" * depth)


def manifest(megabytes: float) -> str:
    """A checksum manifest: SHA-512 hex digests, eight to a line (each a single model token)."""
    words = []
    size = 0
    i = 0
    while size < megabytes * 1_000_000:
        words.append(hashlib.sha512(str(i).encode()).hexdigest())
        size += 129
        i += 1
    return "\n".join(" ".join(words[j:j + 8]) for j in range(0, len(words), 8))


def bad_cases() -> list[Case]:
    """The corpus: malformed, oversized, hostile and unusual messages."""
    ch = schema_headers(CHUNK)
    emb = schema_headers(EMBEDDING)

    def js(data: Any) -> bytes:
        return json.dumps(data, ensure_ascii=False).encode()

    def cd(doc: str, text: str, **extra: Any) -> dict[str, Any]:
        return chunk_dict("acme", doc, text, **extra)

    def chunk(name: str, data: dict[str, Any], outcome: str, *says: str,
              stage: str | None = None, headers: list[tuple[str, bytes]] | None = ch,
              key: bytes | None = None, value: bytes | None = None,
              compression: str = "lz4") -> Case:
        if key is None and "tenant_id" in data and "doc_id" in data:
            key = document_key(data["tenant_id"], data["doc_id"])
        return Case(name, "chunks", key or f"acme/{name}".encode(),
                    js(data) if value is None else value, headers, outcome, says, stage,
                    row=data if "land" in outcome else {}, compression=compression)

    def embedding(name: str, value: bytes, *says: str, outcome: str = "dlq",
                  headers: list[tuple[str, bytes]] = emb) -> Case:
        return Case(name, "embeddings", f"acme/{name}".encode(), value, headers, outcome, says,
                    "write", row={"doc_id": name} if outcome == "land" else {})

    five_mb = ("All work and no play makes Jack a dull boy. " * 120_000)[:5_000_000]
    # Incompressible, and just under the broker's default 1 MiB message limit: the dead letter
    # (the same value plus error headers) is a little larger than what the broker accepted.
    rnd = random.Random(5)
    near_limit = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789 ")
                         for _ in range(1_047_500))
    sql = "'); DROP TABLE chunks;--"
    cjk = random.Random(3)
    long_cjk = "".join(chr(cjk.randint(0x4E00, 0x9FFF)) for _ in range(1000))
    huge_meta = {f"field{i:05d}": f"value {i} of a very large metadata object"
                 for i in range(12_000)}
    # Just under the metadata cap (65,536 bytes as compact JSON): it lands whole.
    capped_meta = {f"f{i:04d}": "v" * 40 for i in range(1_200)}
    twelve_mb = ("zstd squeezes this to a few kilobytes on the wire. " * 240_000)[:12_000_000]
    return [
        # -- contract violations: the embed stage dead-letters them with the reason ----------
        chunk("invalid-json", {}, "dlq", "not valid JSON", stage="embed",
              value=b'{"tenant_id": "acme", "doc_id": '),
        chunk("unknown-schema-version", cd("v2", "from the future"), "dlq",
              "version 2 is not supported", stage="embed",
              headers=schema_headers(CHUNK, version=2)),
        chunk("unknown-schema-name", cd("chonk", "what is this"), "dlq", "unknown schema",
              stage="embed", headers=[("vecpipe.schema", b"vecpipe.chonk"),
                                      ("vecpipe.schema.version", b"1")]),
        chunk("no-schema-headers", cd("headless", "no headers at all"), "dlq",
              "has no vecpipe.schema header", stage="embed", headers=None),
        chunk("non-numeric-schema-version", cd("v-one", "version one"), "dlq",
              "not a whole number", stage="embed",
              headers=[("vecpipe.schema", b"vecpipe.chunk"), ("vecpipe.schema.version", b"one")]),
        chunk("missing-fields", {k: v for k, v in cd("nohash", "no hash").items()
                                 if k != "content_hash"},
              "dlq", "'content_hash' is a required property", stage="embed"),
        chunk("empty-text", cd("empty", ""), "dlq", "invalid at text", stage="embed"),
        chunk("blank-text", cd("blank", " \n\t "), "dlq", "invalid at text", stage="embed"),
        chunk("raw-5mb-chunk", cd("big", five_mb), "dlq", "more than the 2097152",
              stage="embed"),
        # 12 MB once decompressed: refused before parsing, and its dead letter (larger than the
        # dead-letter topic takes) is cut to fit and says so.
        chunk("12mb-zstd-chunk", cd("zstd", twelve_mb), "dlq", "more than the 2097152",
              stage="embed", compression="zstd"),
        chunk("raw-1mib-incompressible-chunk", cd("big2", near_limit), "dlq", "invalid at text",
              stage="embed"),
        chunk("invalid-utf8", {}, "dlq", "not valid UTF-8", stage="embed",
              value=b'{"tenant_id": "acme", "doc_id": "caf\xe9", "text": "\xff\xfe"}'),
        chunk("lone-surrogate", {}, "dlq", "surrogate", stage="embed",
              value=(b'{"tenant_id":"acme","doc_id":"sur","version":1,"chunk_index":0,'
                     b'"chunk_count":1,"text":"broken \\ud800 half","content_hash":"'
                     + b"0" * 64 + b'"}')),
        chunk("negative-version", cd("minus", "minus one", version=-1), "dlq",
              "invalid at version", stage="embed"),
        chunk("version-beyond-bigint", cd("future", "too new", version=2**63), "dlq",
              "invalid at version", stage="embed"),
        chunk("index-beyond-count", cd("idx", "index 5 of 2", chunk_index=5, chunk_count=2),
              "dlq", "chunk_index", stage="embed"),
        chunk("index-beyond-int32", cd("idx32", "index 2^40", chunk_index=2**40,
                                       chunk_count=2**40 + 1),
              "dlq", "chunk_index", stage="embed"),
        # -- schema-valid once, each of them stopped a stage on every redelivery ---------------
        chunk("integer-of-5000-digits", {}, "dlq", "4,300 digits", stage="embed",
              value=b'{"tenant_id": "acme", "doc_id": "digits", "version": ' + b"9" * 5000
              + b"}"),
        chunk("nested-5000-deep", {}, "dlq", "deeper than 16", stage="embed",
              value=b'{"tenant_id": "acme", "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        chunk("metadata-20-deep", cd("deepmeta", "deep metadata", metadata={"a": nested(20)}),
              "dlq", "deeper than 16", stage="embed"),
        chunk("char-start-beyond-int4", cd("c4", "would wrap", char_start=3_000_000_000),
              "dlq", "invalid at char_start", stage="embed"),
        chunk("char-end-beyond-int8", cd("c8", "would overflow", char_end=2**63), "dlq",
              "invalid at char_end", stage="embed"),
        chunk("integral-float", cd("flt", "an integral float", char_start=1e300), "dlq",
              "invalid at char_start", stage="embed"),
        # Rejected, or stored with the hash of its own text (never another text's vector).
        chunk("hash-of-another-text", {**cd("liar", "this is what I say"),
                                       "content_hash": content_hash("good text 0")},
              "dlq|land", "content_hash", stage="embed"),
        chunk("slash-in-tenant", chunk_dict("a/b", "slash", "slash"), "dlq",
              "invalid at tenant_id", stage="embed"),
        chunk("extra-property", cd("extra", "extra", colour="blue"), "dlq",
              "Additional properties", stage="embed"),
        Case("tombstone", "chunks", b"acme/tombstone", None, ch, "dlq", ("has no value",),
             "embed"),
        Case("document-on-chunks-topic", "chunks", b"acme/doc-msg",
             js({"tenant_id": "acme", "doc_id": "d", "content": "whole", "version": 1}),
             schema_headers(DOCUMENT), "dlq", ("not read from this topic",), "embed"),
        Case("embedding-on-chunks-topic", "chunks", b"acme/emb-on-chunks",
             embedding_bytes("e", unit_vector(1)), emb, "dlq",
             ("embedding message was published on the chunks topic",), "embed"),
        Case("delete-without-tenant", "chunks", b"acme/del", js({"doc_id": "x"}),
             schema_headers(DELETE), "dlq", ("'tenant_id' is a required property",), "embed"),
        # -- valid for the contract, refused by the database: the writer dead-letters them ---
        chunk("nul-in-text", cd("nul", "before\x00after"), "dlq", "NUL", stage="embed"),
        chunk("nul-in-metadata", cd("nulmeta", "metadata with a NUL", metadata={"k": "a\x00b"}),
              "dlq", "NUL", stage="embed"),
        chunk("1000-char-cjk-doc-id", cd(long_cjk, "a very long CJK id"), "dlq", "doc_id",
              "index row size"),
        # -- unusual but valid: they land exactly as sent -----------------------------------
        chunk("sql-in-ids-and-metadata",
              chunk_dict(f"acme{sql}", f"doc{sql}", f"text {sql}",
                         metadata={"q": sql, f"key{sql}": [sql, {"n": 1}]},
                         source_uri=f"https://example.com/?q={sql}"),
              "land"),
        chunk("right-to-left", chunk_dict("acme", "rtl-\u200fשלום",
                                          "שלום עולם \u202bمرحبا بالعالم\u202c end"), "land"),
        chunk("emoji", chunk_dict("acme", "emoji-🚀", "launch 🚀 party 🎉 family 👩‍👩‍👧‍👦 flag 🇳🇴",
                                  metadata={"tags": ["🚀", "🎉"]}), "land"),
        chunk("combining-marks", chunk_dict("acme", "nfd", "e\u0301cole cafe\u0301 Zalgo "
                                            "z\u0351\u0352\u0353o"), "land"),
        chunk("huge-metadata", chunk_dict("acme", "hugemeta", "small text, big metadata",
                                          metadata=huge_meta), "dlq", "metadata is",
              stage="embed"),
        chunk("metadata-at-the-cap", chunk_dict("acme", "capmeta", "small text, capped metadata",
                                                metadata=capped_meta), "land"),
        # -- the embeddings topic, hand-built ---------------------------------------------------
        embedding("wrong-dimension", embedding_bytes("dim", unit_vector(2, 128)),
                  "128 dimensions but the table stores 384"),
        embedding("nan-vector", embedding_bytes("nan", np.full(384, np.nan, np.float32)), "NaN"),
        embedding("infinite-vector", embedding_bytes("inf", np.full(384, np.inf, np.float32)),
                  "NaN or infinite"),
        embedding("non-unit-vector", embedding_bytes("norm", unit_vector(3) * 3), "norm is 3.0"),
        embedding("zero-vector", embedding_bytes("zero", np.zeros(384, np.float32)),
                  "norm is 0.0"),
        embedding("truncated-bytes", b"\x00\x01", "shorter than its 4-byte length prefix"),
        embedding("length-prefix-overrun", struct.pack(">I", 1000) + b'{"a":1}',
                  "runs past the end"),
        embedding("vector-bytes-short", embedding_bytes("short", unit_vector(4))[:-100],
                  "needs 1536"),
        embedding("chunk-on-embeddings-topic",
                  encode_chunk(Chunk("acme", "c", 1, 0, 1, "c", content_hash("c"), 0, 1)),
                  "a chunk without a vector", headers=ch),
        embedding("float16-vector", embedding_bytes("float16-vector", unit_vector(5), "float16"),
                  outcome="land"),
        embedding("embedding-char-beyond-int4", embedding_with("e4", char_start=3_000_000_000),
                  "invalid at char_start"),
        embedding("embedding-integral-float", embedding_with("ef", char_end=1e300),
                  "invalid at char_end"),
    ]


def publish_raw(cfg: Any, cases: list[Case]) -> None:
    """Publish the cases with plain producers (in order, each case compressed as it says), each
    with a ``trace-id`` header of its own."""
    producers: dict[str, Any] = {}
    for case in cases:
        if case.compression not in producers:
            producers[case.compression] = Producer({
                "bootstrap.servers": cfg.kafka.bootstrap, "compression.type": case.compression,
                "message.max.bytes": 20_000_000, "enable.idempotence": True})
        producer = producers[case.compression]
        topic = cfg.kafka.chunks_topic if case.topic == "chunks" else cfg.kafka.embeddings_topic
        headers: list[tuple[str, str | bytes | None]] = [*(case.headers or []),
                                                         ("trace-id", case.name.encode())]
        producer.produce(topic, case.value, key=case.key, headers=headers)
        # One at a time, so that the cases keep their order across producers.
        assert producer.flush(60) == 0


def test_bad_input_lands_or_is_dead_lettered_precisely_and_the_pipeline_goes_on(
    migrated: Any, encoder: Any, fault_log: FaultLog
) -> None:
    """Invariant 5: every bad message lands as sent or is dead-lettered with its reason; the
    records published after them (a 5 MB document among them) still land."""
    cfg = migrated
    ensure_topics(cfg.kafka)
    cases = bad_cases()
    publish_raw(cfg, cases)
    big = Document("acme", "manifest-5mb", manifest(5.0), version=1)
    good = {f"good-{i}": f"good text {i}" for i in range(5)}
    with Publisher(cfg) as pub:
        big_chunks = pub.publish(big).chunks
        for doc_id, text in good.items():
            pub.publish(Document("acme", doc_id, text, version=1, metadata={"after": "bad"}))
    publish_raw(cfg, [Case("good-embedding-after", "embeddings", b"acme/good-embedding-after",
                           embedding_bytes("good-embedding-after", unit_vector(6)),
                           schema_headers(EMBEDDING), "land")])
    codes = (run_stage("embed", cfg, encoder=encoder), run_stage("write", cfg))

    problems: list[str] = []
    if codes != (0, 0):
        problems.append(f"the pipeline stopped: embed exited {codes[0]}, write {codes[1]}")
    dead: dict[bytes, list[tuple[str, Any]]] = {}
    for stage, topic in (("embed", cfg.kafka.chunks_topic),
                         ("write", cfg.kafka.embeddings_topic)):
        for m in read_topic(cfg, cfg.kafka.dlq_topic(topic), timeout=5):
            dead.setdefault(m.key(), []).append((stage, m))
    with connect(cfg.database) as conn:
        stored = {(t, d, i): (c, m, s, x, bytes(h).hex()) for t, d, i, c, m, s, x, h in
                  conn.execute("SELECT tenant_id, doc_id, chunk_index, content, metadata,"
                               " source_uri, chunk_count, content_hash FROM chunks")}
        tables = {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (cfg.database.schema,))}
    outcomes: dict[str, str] = {}
    for case in cases:
        got = dead.get(case.key, [])
        if case.outcome == "dlq" or (case.outcome == "dlq|land" and got):
            outcomes[case.name] = problem = check_dead_letter(cfg, case, got)
        else:
            outcomes[case.name] = problem = check_landed(case, stored, got)
        if problem != "ok":
            problems.append(f"{case.name}: {problem}")
    big_rows = [(c, x) for (_, d, _), (c, _, _, x, _) in stored.items() if d == big.doc_id]
    if len(big_rows) != big_chunks or any(x != big_chunks for _, x in big_rows):
        problems.append(f"5 MB document: {len(big_rows)} of {big_chunks} chunks landed")
    if any(len(c) > MAX_CHUNK_CHARS for c, _ in big_rows):
        problems.append("5 MB document: a chunk is longer than the contract allows")
    for doc_id, text in good.items():
        row = stored.get(("acme", doc_id, 0))
        if row is None or row[0] != text or row[1] != {"after": "bad"}:
            problems.append(f"good record {doc_id} published after the bad ones: stored {row!r}")
    if ("acme", "good-embedding-after", 0) not in stored:
        problems.append("the good embedding published after the bad ones did not land")
    if not {"chunks", "documents", "audit_log"} <= tables:
        problems.append(f"tables are missing after SQL-looking input: {sorted(tables)}")

    dead_names = {c.name for c in cases if c.key in dead}
    fault_log.fault("bad messages", len(cases))
    fault_log.note(
        messages_in=topic_count(cfg, cfg.kafka.chunks_topic),
        messages_out=topic_count(cfg, cfg.kafka.embeddings_topic),
        rows_expected=big_chunks + len(good) + 1 + sum(c.name not in dead_names for c in cases),
        rows_found=len(stored), dead_letters=sum(len(v) for v in dead.values()),
        big_document_chunks=big_chunks, cases=outcomes)
    fault_log.note(verdict="exact" if not problems else f"{len(problems)} problem(s)")
    assert not problems, "\n".join(problems)


def check_dead_letter(cfg: Any, case: Case, got: list[tuple[str, Any]]) -> str:
    """'ok', or what is wrong with the dead letter of ``case``."""
    if len(got) != 1:
        return f"expected one dead letter, found {len(got)}"
    stage, m = got[0]
    headers = m.headers() or []
    message = header_value(headers, H_MESSAGE) or ""
    if case.stage is not None and stage != case.stage:
        return f"dead-lettered by {stage}, expected {case.stage}: {message[:200]}"
    if not any(s.lower() in message.lower() for s in case.says):
        return f"error message {message[:300]!r} does not say any of {case.says}"
    if len(message) > 10_000:
        return f"error message header is {len(message)} characters long"
    own = stage == "embed" or case.topic == "embeddings"  # the record as it was published
    if own and header_value(headers, "trace-id") != case.name:
        return "the original headers were not kept"
    cut = header_value(headers, H_TRUNCATED)
    if own and cut:
        # Larger than the dead-letter topic takes: cut to fit, and saying so.
        if cut != "value" or not (case.value or b"").startswith(m.value() or b""):
            return f"the dead letter was cut as {cut!r}, not as a prefix of its value"
        if int(header_value(headers, H_ORIGINAL_BYTES) or 0) <= len(case.value or b""):
            return "the dead letter does not say how large the record was"
    elif own and (m.value(), m.key()) != (case.value, case.key):
        return "the original key or value was not kept"
    for name in (H_TOPIC, H_PARTITION, H_OFFSET, H_CLASS, H_STACK, H_STAGE, H_WORKER, H_ATTEMPTS):
        if not header_value(headers, name):
            return f"header {name} is missing"
    if header_value(headers, H_STAGE) != stage:
        return f"{H_STAGE} is {header_value(headers, H_STAGE)!r}"
    return "ok"


def check_landed(case: Case, stored: dict[tuple[str, str, int], Any],
                 got: list[tuple[str, Any]]) -> str:
    """'ok', or what is wrong with the stored row of ``case``."""
    if got:
        stage, m = got[0]
        return f"dead-lettered by {stage}: {header_value(m.headers(), H_MESSAGE)!r}"[:400]
    want = case.row
    key = (want.get("tenant_id", "acme"), want["doc_id"], 0)
    if key not in stored:
        return f"not stored under {key!r}"
    content, metadata, source_uri, _, digest = stored[key]
    if "text" in want and content != want["text"]:
        return f"content stored as {content!r}"
    if "text" in want and digest != content_hash(want["text"]):
        return f"content_hash stored as {digest}, not the hash of the text"
    if metadata != want.get("metadata", metadata):
        return (f"metadata stored as {type(metadata).__name__} {str(metadata)[:80]!r}, "
                "not the object sent")
    if source_uri != want.get("source_uri", source_uri):
        return f"source_uri stored as {source_uri!r}"
    return "ok"


# -- dead-letter replay ------------------------------------------------------------------------

class FlakyModel:
    """The real model, except that it returns NaN for texts with 'flaky' (a bad deploy)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.name, self.revision = real.name, real.revision
        self.backend_tag, self.dimension = real.backend_tag, real.dimension

    def encode(self, texts: list[str], batch_size: int | None = None) -> npt.NDArray[np.float32]:
        """NaN rows for the flaky texts."""
        out: npt.NDArray[np.float32] = self.real.encode(texts, batch_size).copy()
        for i, text in enumerate(texts):
            if "flaky" in text:
                out[i, :] = math.nan
        return out


def test_replaying_dead_letters_twice_lands_each_once_and_never_beats_a_newer_version(
    migrated: Any, encoder: Any, fault_log: FaultLog
) -> None:
    """Invariants 2-5: a dead-letter topic replayed twice lands its records once; replayed old
    versions never overwrite newer ones, nor bring back a document deleted meanwhile."""
    cfg = migrated
    ensure_topics(cfg.kafka)
    docs = [Document("acme", f"r{i:02d}", f"replay doc {i} {'flaky ' if i % 3 == 0 else ''}v1",
                     version=1) for i in range(24)]
    flaky = [d for d in docs if "flaky" in d.content]
    newer = [Document("acme", d.doc_id, f"replay doc {d.doc_id} fixed v2", version=2)
             for d in flaky[: len(flaky) // 2]]
    # Deleted while one of its chunks waits in the dead-letter topic; its other chunk and the
    # delete reach the writer in one batch.
    erased = Document("acme", "erased", "erased doc line one\nerased doc flaky line two",
                      version=1)
    corpus = Corpus([*docs, erased, ("acme", "erased"), *newer])
    failing = len(flaky) + 1

    def run_pipeline(model: Any, write_cfg: Any = cfg) -> None:
        assert run_stage("embed", cfg, until_idle_s=2.0, encoder=model) == 0
        assert run_stage("write", write_cfg, until_idle_s=2.0) == 0

    Corpus([*docs, erased, ("acme", "erased")]).publish(cfg)
    run_pipeline(FlakyModel(encoder),
                 replace(cfg, write=replace(cfg.write, batch_wait_ms=2000)))
    dlq = cfg.kafka.dlq_topic(cfg.kafka.chunks_topic)
    assert topic_count(cfg, dlq) == failing
    Corpus(list(newer)).publish(cfg)
    run_pipeline(encoder)  # the model is fixed; newer versions of half the flaky docs land

    summaries = []
    for args in (("dlq", "replay", dlq, "--json"),
                 ("dlq", "replay", dlq, "--json", "--from-beginning")):
        out = run_cli(cfg, *args).stdout.strip().splitlines()
        summaries.append(json.loads(out[-1])["summary"])
        run_pipeline(encoder)
        fault_log.fault("dlq replay")
    stored = stored_rows(cfg)
    fault_log.note(messages_in=topic_count(cfg, cfg.kafka.chunks_topic),
                   messages_out=topic_count(cfg, cfg.kafka.embeddings_topic),
                   rows_expected=len(corpus.expected_rows()), rows_found=len(stored),
                   dead_letters=topic_count(cfg, dlq),
                   replayed=sum(s["replayed"] for s in summaries))
    # The erased document's dead chunk was published before its delete: replay leaves it out
    # (erased text is not spread again); every other dead letter is replayed, both times.
    assert [(s["replayed"], s["skipped_erased"]) for s in summaries] == [(failing - 1, 1)] * 2
    # Nothing failed again: the dead-letter topic still holds the first failures only.
    assert topic_count(cfg, dlq) == failing
    assert len(stored) == len(set(stored))
    assert not [r for r in stored if r[1] == "erased"], "the deleted document came back"
    assert set(stored) == corpus.expected_rows()
    assert stored_documents(cfg) == corpus.expected_documents()
    fault_log.note(verdict="exact")


# -- soak ------------------------------------------------------------------------------------------

# -- deletions under races -------------------------------------------------------------------------

def test_deletions_hold_under_races_late_deliveries_and_redeliveries(
    migrated: Any, encoder: Any, fault_log: FaultLog
) -> None:
    """Invariant 11 with two writers: a tenant deleted while its new documents merge on other
    partitions keeps none published before the deletion (and all published after it); a delete
    re-sent after a newer version
    removes nothing; a delete delivered twice is audited once; a NUL in a reason blocks nothing;
    a version without content replaces the one before it."""
    cfg = fast_group(migrated)
    ensure_topics(cfg.kafka)
    members = [ThreadWorker("embed", cfg, encoder=LockedEncoder(encoder)),
               ThreadWorker("write", cfg), ThreadWorker("write", cfg)]
    racy = [Document("racy", f"doc{i:03d}", f"racy {i} one\nracy {i} two", version=1)
            for i in range(60)]
    steady = [Document("steady", f"doc{i:03d}", f"steady {i}", version=1) for i in range(20)]
    raw = DurableProducer(cfg.kafka)
    try:
        with Publisher(cfg, chunker=line_chunker) as pub:
            for doc in steady:
                pub.publish(doc)
            # The tenant's documents and its deletion race: the deletion is published while
            # the first ones are being merged by two writers, on every partition.
            for i, doc in enumerate(racy):
                pub.publish(doc)
                if i == 30:
                    pub.flush()
                    wait_until(lambda: any(t == "racy" for t, *_ in stored_rows(cfg)), 120,
                               "the first documents of the racy tenant")
                    pub.delete_tenant("racy", reason="contract ended")
                    fault_log.fault("tenant deletions racing merges")
            # A late delete: published, then a newer version, then the delete arrives again
            # (a producer's re-send after an outage), and once more (a redelivery).
            pub.publish(Document("steady", "late", "late version one", version=1))
            pub.flush()
            late = Delete("steady", "late", reason="late")
            late_value, late_headers = encode_delete(late), [*schema_headers(DELETE),
                                                             published_header()]
            time.sleep(0.01)
            pub.publish(Document("steady", "late", "late version two", version=2))
            for _ in range(3):
                raw.produce(cfg.kafka.chunks_topic, late_value, key=late.key,
                            headers=late_headers)
            raw.flush()
            fault_log.fault("late and redelivered deletes", 3)
            pub.publish(Document("steady", "nul", "deleted with a NUL", version=1))
            pub.delete("steady", "nul", reason="ticket\x00 42")
            pub.publish(Document("steady", "emptied", "there, then empty", version=1))
            pub.publish(Document("steady", "emptied", "", version=2))
        expected = {("steady", d.doc_id, 0, 1, content_hash(d.content)) for d in steady}
        expected.add(("steady", "late", 0, 2, content_hash("late version two")))
        # The racy tenant's documents published after its deletion are its new content.
        expected |= {("racy", c.doc_id, c.chunk_index, 1, c.content_hash)
                     for d in racy[31:] for c in line_chunker(d)}
        try:
            wait_until(lambda: set(stored_rows(cfg)) == expected, 240, "the exact rows")
        except AssertionError:
            found = set(stored_rows(cfg))
            raise AssertionError(f"missing {sorted(expected - found)[:5]}, unexpected "
                                 f"{sorted(found - expected)[:5]}") from None
        codes = [m.stop() for m in members]
    finally:
        for m in members:
            if m.alive:
                m.flag.set()
    assert codes == [0, 0, 0]
    rows = stored_rows(cfg)
    assert len(rows) == len(set(rows)) and set(rows) == expected
    with connect(cfg.database) as conn:
        audits = conn.execute("SELECT action, doc_id, applied FROM audit_log"
                              " ORDER BY action, doc_id").fetchall()
    # One row per request, however often it was delivered: the tenant, the late delete (it
    # removed version 1 if it met it, never version 2), the NUL one, the empty version.
    assert [(a, d) for a, d, _ in audits] == [
        ("delete_document", "emptied"), ("delete_document", "late"), ("delete_document", "nul"),
        ("delete_tenant", None)]
    assert [applied for a, d, applied in audits if d != "late"] == [True, True, True]
    fault_log.note(messages_in=topic_count(cfg, cfg.kafka.chunks_topic),
                   messages_out=topic_count(cfg, cfg.kafka.embeddings_topic),
                   rows_expected=len(expected), rows_found=len(rows), dead_letters=sum(
                       topic_count(cfg, cfg.kafka.dlq_topic(t))
                       for t in (cfg.kafka.chunks_topic, cfg.kafka.embeddings_topic)),
                   audit_rows=len(audits), verdict="exact")


# -- memory at the size caps -----------------------------------------------------------------------

# What a worker may reach with records at the size caps; the README says so, and the Helm chart's
# memory limits (embed 4Gi, write 1Gi) leave room above them.
EMBED_PEAK_BOUND = 2 * 2**30
WRITE_PEAK_BOUND = 512 * 2**20


def peak_rss(proc: subprocess.Popen[bytes]) -> Callable[[], int]:
    """Sample the process's peak resident set (VmHWM) until it exits; call for the peak seen."""
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()

    def result() -> int:
        thread.join(600)
        return peak[0]

    return result


def test_records_at_the_size_caps_keep_each_worker_under_its_memory_bound(
    migrated: Any, fault_log: FaultLog, tmp_path: Path
) -> None:
    """Batches are bounded in bytes: a flood of the largest records the caps allow (100,000
    characters of text and metadata just under 64 KiB each) keeps the embed and the write worker
    under their memory bounds, and every record lands exactly."""
    cfg = migrated
    ensure_topics(cfg.kafka)
    meta = {f"f{i:04d}": "v" * 40 for i in range(1_200)}
    docs = [Document("big", f"doc{i:03d}", f"record {i} " + "abcdefghij" * 9_998,
                     version=1, metadata=meta) for i in range(400)]
    with Publisher(cfg, chunker=lambda d: [Chunk(d.tenant_id, d.doc_id, 1, 0, 1, d.content,
                                                 content_hash(d.content), 0, len(d.content),
                                                 metadata=dict(d.metadata))]) as pub:
        for doc in docs:
            pub.publish(doc)
    fault_log.fault("records at the size caps", len(docs))
    peaks: dict[str, int] = {}
    for stage in ("embed", "write"):
        worker = WorkerProcess.start(cfg, stage, tmp_path, "--until-idle", "5")
        peak = peak_rss(worker.proc)
        assert worker.proc.wait(900) == 0, worker.tail()
        peaks[stage] = peak()
    expected = {("big", d.doc_id, 0, 1, content_hash(d.content)) for d in docs}
    rows = stored_rows(cfg)
    assert set(rows) == expected and len(rows) == len(expected)
    fault_log.note(messages_in=topic_count(cfg, cfg.kafka.chunks_topic),
                   messages_out=topic_count(cfg, cfg.kafka.embeddings_topic),
                   rows_expected=len(expected), rows_found=len(rows), dead_letters=0,
                   embed_peak_rss_mib=peaks["embed"] // 2**20,
                   write_peak_rss_mib=peaks["write"] // 2**20, verdict="exact")
    assert peaks["embed"] < EMBED_PEAK_BOUND, f"embed peaked at {peaks['embed'] // 2**20} MiB"
    assert peaks["write"] < WRITE_PEAK_BOUND, f"write peaked at {peaks['write'] // 2**20} MiB"


@pytest.mark.soak
@pytest.mark.skipif(not SOAK, reason="the soak run needs VECPIPE_SOAK=1")
def test_soak_kills_restarts_and_rebalances_over_a_long_ingest(
    migrated: Any, encoder: Any, endpoints: Any, tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path, fault_log: FaultLog
) -> None:
    """Invariants 1-3 and 6 over a long ingest: many SIGKILLs, and service restarts where native."""
    cfg = migrated
    docs = int(os.environ.get("VECPIPE_SOAK_DOCS", "2500"))  # per tenant; 4 chunks each
    corpus = Corpus.build(tenants=4, docs=docs, chunks=4, updates=docs // 5, deletes=docs // 12)
    home = (native_home(tmp_path_factory.getbasetemp(), endpoints.bootstrap)
            if endpoints.how == "native" else None)

    def restarts(stop: threading.Event) -> None:
        assert home is not None
        while not stop.wait(45):
            restart_postgres(home, down_s=3.0)
            fault_log.fault("postgres restart")
            if stop.wait(45):
                return
            restart_kafka(home, down_s=2.0)
            fault_log.fault("broker kill -9")

    with services_restored(home):
        kill_campaign(cfg, corpus, kills=20, log=fault_log, logs=tmp_path / "logs",
                      max_delay_s=(2.0, 2.0), drain_idle_s=60.0,
                      more_faults=restarts if home is not None else None)
    assert_exactly(cfg, corpus, fault_log, encoder)
