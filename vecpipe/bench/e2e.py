"""``vecpipe bench e2e`` and ``vecpipe bench reingest``: publish to searchable, both stages live.

e2e. The real embed and write workers run concurrently (threads of this process, the model
loaded once and shared, as ``run_embed(encoder=...)`` allows), both ready before the clock
starts. Throughput: N demo-corpus chunks (chunked beforehand: the producer's chunking is not the
pipeline's work) are published with :class:`~producers.publisher.Publisher`, and the clock runs
from the first publish until all N rows are committed, against raw ``Encoder.encode`` of the same
texts (half before, half after). Latency: single-chunk documents published with
``Publisher.publish`` at a fixed rate, well below capacity; each document's latency is the time
its row is first seen in the database (polled) minus the time its publish began.

reingest. The same corpus is published once (first ingest), then again unchanged as a new
version (what a re-crawl does). Drained means every document row carries the new version, which
the writer records in the same transaction as the chunks. The ratio of the two times, the model
calls and the rows rewritten by the second pass show that unchanged content costs nothing.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from psycopg import sql

from producers.publisher import Publisher
from vecpipe.bench.embed import (
    Corpus,
    demo_corpus,
    encode_timed,
    load_encoder,
    model_info,
    stage_breakdown,
)
from vecpipe.bench.env import Progress, StageRunner, fresh_namespace, poll_until
from vecpipe.bench.stats import Target, latency_summary, rate, ratio, split_halves
from vecpipe.config import Config
from vecpipe.db.migrate import migrate
from vecpipe.db.pool import connect
from vecpipe.errors import BenchError
from vecpipe.kafka.admin import ensure_topics
from vecpipe.messages import Document

__all__ = ["E2E_TARGET", "REINGEST_TARGET", "run_e2e", "run_reingest"]

E2E_TARGET = Target(">=", 0.85)
REINGEST_TARGET = Target("<=", 0.05)
POLL_S = 0.02


def _count(conn: Any, cfg: Config, query: str, *params: Any) -> int:
    row = conn.execute(sql.SQL(query).format(schema=sql.Identifier(cfg.database.schema)),
                       params).fetchone()
    return int(row[0]) if row else 0


def _rows_of(conn: Any, cfg: Config, tenant: str) -> int:
    return _count(conn, cfg, "SELECT count(*) FROM {schema}.chunks WHERE tenant_id = %s", tenant)


class _Pipeline:
    """Both workers of a fresh namespace, running until the block ends."""

    def __init__(self, cfg: Config, encoder: Any) -> None:
        self.embed = StageRunner("embed", cfg, encoder)
        self.write = StageRunner("write", cfg)

    def __enter__(self) -> _Pipeline:
        self.embed.start()
        try:
            self.write.start()
        except BaseException:
            self.embed.close()
            raise
        return self

    def check(self) -> None:
        """Raise if either worker stopped."""
        self.embed.check_alive()
        self.write.check_alive()

    def __exit__(self, *exc: object) -> None:
        self.embed.close()
        self.write.close()


def _publish_and_wait(cfg: Config, pipe: _Pipeline, conn: Any, corpus: Corpus,
                      progress: Progress, drained: Any, expected: int, what: str) -> float:
    """Publish the corpus's chunks, wait until ``drained()`` reaches ``expected``; seconds."""
    chunks = corpus.chunks
    with Publisher(cfg, chunker=lambda doc: [], create_topics=False) as pub:
        t0 = time.perf_counter()
        for c in chunks:
            pub.publish_chunk(c)
        pub.flush()
    t_end = poll_until(drained, expected, timeout=max(600.0, len(chunks) * 2.0),
                       progress=progress, what=what, interval=POLL_S, check=pipe.check)
    return t_end - t0


def _latency(cfg: Config, pipe: _Pipeline, conn: Any, texts: list[str], rate_per_s: float,
             progress: Progress) -> list[float]:
    """Publish one document per text at ``rate_per_s``; publish-to-visible seconds of each."""
    tenant = "bench-latency"
    docs = [Document(tenant, f"lat-{i:05d}", text, version=1) for i, text in enumerate(texts)]
    published: dict[str, float] = {}
    seen: dict[str, float] = {}
    failed: list[BaseException] = []

    def publish_paced() -> None:
        try:
            with Publisher(cfg, create_topics=False) as pub:
                start = time.perf_counter()
                for i, doc in enumerate(docs):
                    delay = start + i / rate_per_s - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    published[doc.doc_id] = time.perf_counter()
                    pub.publish(doc)
        except BaseException as exc:
            failed.append(exc)

    query = sql.SQL("SELECT DISTINCT doc_id FROM {}.chunks WHERE tenant_id = %s").format(
        sql.Identifier(cfg.database.schema))
    thread = threading.Thread(target=publish_paced, name="bench-publisher", daemon=True)
    thread.start()
    deadline = time.perf_counter() + len(docs) / rate_per_s + 300
    shown = time.perf_counter()
    while len(seen) < len(docs):
        found = [r[0] for r in conn.execute(query, (tenant,)).fetchall()]
        now = time.perf_counter()
        for doc_id in found:
            seen.setdefault(doc_id, now)
        if failed:
            raise BenchError(f"publishing the latency documents failed: {failed[0]}")
        pipe.check()
        if now > deadline:
            raise BenchError(f"only {len(seen)} of {len(docs)} latency documents became "
                             "searchable in time.")
        if now - shown >= 10:
            progress(f"  latency: {len(published)} published, {len(seen)} searchable")
            shown = now
        time.sleep(POLL_S)
    thread.join(30)
    return [seen[d] - published[d] for d in seen]


def _load_encoder(cfg: Config, texts: list[str], progress: Progress) -> tuple[Any, float]:
    progress(f"loading the model ({cfg.model.backend}, {cfg.model.device})")
    started = time.perf_counter()
    encoder = load_encoder(cfg.model)
    load_s = time.perf_counter() - started
    batch = cfg.embed.batch_size
    encoder.encode(texts[:batch], batch)  # lazy initialisation is not measured
    return encoder, load_s


def run_e2e(cfg: Config, progress: Progress, *, chunks: int, offered_rate: float,
            latency_docs: int) -> dict[str, Any]:
    """Measure publish-to-searchable throughput (vs raw encode) and latency under load."""
    everything = demo_corpus(cfg, chunks + latency_docs, "bench", progress)
    corpus = _first_chunks(everything, chunks)
    latency_texts = everything.texts[chunks:]
    texts = corpus.texts
    encoder, load_s = _load_encoder(cfg, texts, progress)
    batch = cfg.embed.batch_size
    first, second = split_halves(len(texts))
    progress(f"limit, first half: encode {first.stop} texts, batch size {batch}")
    limit_a, _ = encode_timed(encoder, texts[first], batch)

    with fresh_namespace(cfg, progress) as ns:
        migrate(ns)  # as deployed: with the vector index
        ensure_topics(ns.kafka)
        with connect(ns.database, autocommit=True) as conn, _Pipeline(ns, encoder) as pipe:
            progress(f"both workers ready; publishing {len(texts)} chunks")
            wall = _publish_and_wait(ns, pipe, conn, corpus, progress,
                                     lambda: _rows_of(conn, ns, "bench"), len(texts),
                                     "rows searchable")
            progress(f"latency: {len(latency_texts)} documents at {offered_rate:g}/s")
            latencies = _latency(ns, pipe, conn, latency_texts, offered_rate, progress)
        embed_samples, write_samples = pipe.embed.metrics(), pipe.write.metrics()

    progress(f"limit, second half: encode {second.stop - second.start} texts")
    limit_b, _ = encode_timed(encoder, texts[second], batch)
    pipe_rate, limit_rate = rate(len(texts), wall), rate(len(texts), limit_a + limit_b)
    e2e: dict[str, Any] = {
        "pipeline_per_s": round(pipe_rate, 2),
        "limit_per_s": round(limit_rate, 2),
        "ratio": ratio(pipe_rate, limit_rate),
        "pipeline_s": round(wall, 3),
        "limit_s": round(limit_a + limit_b, 3),
        "limit_halves_s": [round(limit_a, 3), round(limit_b, 3)],
        "latency": {**latency_summary(latencies), "offered_docs_per_s": offered_rate,
                    "offered_share_of_capacity":
                        round(offered_rate / pipe_rate, 3) if pipe_rate else None,
                    "poll_interval_ms": POLL_S * 1000},
        "model_load_s": round(load_s, 2),
        "workers_total": {"embed": stage_breakdown(embed_samples, "embed", wall),
                          "write": stage_breakdown(write_samples, "write", wall)},
        "target": {"ratio": str(E2E_TARGET)},
    }
    e2e["meets_target"] = {"ratio": E2E_TARGET.met(e2e["ratio"])}
    e2e["p50_ms"] = e2e["latency"].get("p50_ms")
    e2e["p95_ms"] = e2e["latency"].get("p95_ms")
    sizes = {**corpus.sizes(), "latency_docs": len(latency_texts), "batch_size": batch,
             "batch_tokens": cfg.embed.batch_tokens, "embed_batch_wait_ms": cfg.embed.batch_wait_ms,
             "write_batch_size": cfg.write.batch_size,
             "write_batch_wait_ms": cfg.write.batch_wait_ms, "partitions": cfg.kafka.partitions,
             "index": cfg.vector.index}
    return {"model": model_info(encoder), "sizes": sizes, "e2e": e2e}


def _first_chunks(corpus: Corpus, n: int) -> Corpus:
    docs, total = [], 0
    for doc in corpus.documents:
        if total >= n:
            break
        docs.append(doc[: n - total])
        total += len(docs[-1])
    return Corpus(docs)


def run_reingest(cfg: Config, progress: Progress, *, chunks: int) -> dict[str, Any]:
    """Time the re-publishing of an unchanged corpus against its first ingest."""
    corpus = demo_corpus(cfg, chunks, "bench", progress)
    again = corpus.with_version(2)
    n, docs = len(corpus.texts), len(corpus.documents)
    encoder, load_s = _load_encoder(cfg, corpus.texts, progress)
    with fresh_namespace(cfg, progress) as ns:
        migrate(ns)
        ensure_topics(ns.kafka)
        with connect(ns.database, autocommit=True) as conn, _Pipeline(ns, encoder) as pipe:
            progress(f"first ingest: {n} chunks of {docs} documents")
            first_s = _publish_and_wait(ns, pipe, conn, corpus, progress,
                                        lambda: _rows_of(conn, ns, "bench"), n, "rows written")
            calls_before = encoder.calls
            embed_before = pipe.embed.metrics()
            last_write = conn.execute(sql.SQL("SELECT max(written_at) FROM {}.chunks").format(
                sql.Identifier(ns.database.schema))).fetchone()
            progress("re-ingest: the same chunks as version 2")
            second_s = _publish_and_wait(
                ns, pipe, conn, again, progress,
                lambda: _count(conn, ns, "SELECT count(*) FROM {schema}.documents"
                                         " WHERE tenant_id = %s AND version = 2", "bench"),
                docs, "documents at version 2")
            calls_after = encoder.calls
            rewritten = _count(conn, ns, "SELECT count(*) FROM {schema}.chunks"
                                         " WHERE written_at > %s", last_write[0] if last_write
                               else None)
            rows = _rows_of(conn, ns, "bench")
        embed_after = pipe.embed.metrics()
    reused = (embed_after.get("vecpipe_unchanged_total", 0.0)
              - embed_before.get("vecpipe_unchanged_total", 0.0))
    result: dict[str, Any] = {
        "first_ingest_s": round(first_s, 3),
        "reingest_s": round(second_s, 3),
        "ratio": round(second_s / first_s, 4) if first_s > 0 else 0.0,
        "first_ingest_per_s": round(rate(n, first_s), 2),
        "model_calls_during_reingest": calls_after - calls_before,
        "vectors_reused": int(reused),
        "rows_rewritten": rewritten,
        "rows": rows,
        "model_load_s": round(load_s, 2),
        "target": {"ratio": str(REINGEST_TARGET)},
    }
    result["meets_target"] = {"ratio": REINGEST_TARGET.met(result["ratio"])}
    sizes = {**corpus.sizes(), "batch_size": cfg.embed.batch_size,
             "embed_batch_wait_ms": cfg.embed.batch_wait_ms,
             "write_batch_wait_ms": cfg.write.batch_wait_ms}
    return {"model": model_info(encoder), "sizes": sizes, "reingest": result}
