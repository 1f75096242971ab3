"""``vecpipe bench write``: the writer against the database's own bulk paths, in the same run.

Pipeline: N embedding messages (random unit vectors, chunk-sized texts) are written to a fresh
embeddings topic inside a Kafka transaction, the real writer (``run_write``) joins its group, and
the clock runs from the commit of that transaction until the last row of every partition is
committed in the database (the writer keeps each partition's order, batch by batch).

Limits, each measured half before and half after the writer so drifting load weighs on both:

- ``ratio``: a raw ``COPY ... (FORMAT BINARY)`` of the same rows into an unindexed table of the
  chunks table's shape, against the writer into the migrated chunks table (its primary key and
  look-up indexes, no vector index).
- ``ratio_hnsw``: a bare ``INSERT ... SELECT`` from a staging table into the chunks table with
  its HNSW index, against the writer into that same table. Raw half, writer, raw half: both sides
  insert into a graph of the same mean size.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from pgvector import HalfVector, Vector
from psycopg import sql

from vecpipe.bench.embed import stage_breakdown
from vecpipe.bench.env import HeldBack, Progress, StageRunner, fresh_namespace, poll_until
from vecpipe.bench.stats import Target, random_unit_vectors, rate, ratio, split_halves
from vecpipe.config import Config
from vecpipe.db.migrate import migrate
from vecpipe.db.pool import connect, session_database
from vecpipe.errors import BenchError
from vecpipe.kafka.admin import ensure_topics
from vecpipe.messages import (
    EMBEDDING,
    Chunk,
    Embedding,
    content_hash,
    encode_embedding,
    schema_headers,
)

__all__ = ["HNSW_TARGET", "WRITE_TARGET", "SyntheticRows", "copy_into", "run", "synthetic_rows",
           "writer_run"]

WRITE_TARGET = Target(">=", 0.60)
HNSW_TARGET = Target(">=", 0.90)

CHUNKS_PER_DOC = 8
# The columns a merge writes (written_at takes its default), in COPY order.
COLUMNS = (
    "tenant_id", "doc_id", "chunk_index", "doc_version", "chunk_count", "content_hash",
    "content", "char_start", "char_end", "source_uri", "metadata", "embedding", "model_name",
    "model_revision", "model_backend", "embedded_at",
)
_TYPES = ("text", "text", "int4", "int8", "int4", "bytea", "text", "int4", "int4", "text",
          "jsonb", None, "text", "text", "text", "timestamptz")
_WORDS = ("vector", "index", "stream", "broker", "batch", "merge", "tenant", "query", "model",
          "chunk", "document", "commit", "offset", "partition", "replica", "schema", "table",
          "row", "graph", "layer", "neighbour", "distance", "cosine", "embedding", "token")


@dataclass(frozen=True)
class SyntheticRows:
    """Chunks with random unit vectors: the writer's input as messages and as COPY rows."""
    chunks: list[Chunk]
    vectors: np.ndarray[Any, np.dtype[np.float32]]
    embedded_at: datetime

    def messages(self, wire_dtype: str) -> list[bytes]:
        """The embedding messages, as the embed stage would produce them."""
        return [encode_embedding(Embedding(c, v, "bench-random", "1", "random",
                                           self.embedded_at.isoformat()), wire_dtype)
                for c, v in zip(self.chunks, self.vectors, strict=True)]

    def copy_rows(self, halfvec: bool) -> list[tuple[Any, ...]]:
        """The same rows as tuples in :data:`COLUMNS` order."""
        wrap = HalfVector if halfvec else Vector
        return [(c.tenant_id, c.doc_id, c.chunk_index, c.version, c.chunk_count,
                 bytes.fromhex(c.content_hash), c.text, c.char_start, c.char_end, c.source_uri,
                 json.dumps(dict(c.metadata)), wrap(v), "bench-random", "1", "random",
                 self.embedded_at)
                for c, v in zip(self.chunks, self.vectors, strict=True)]


# Measured on a session of its own: behind a pooler, the direct URL.
_SESSION = "The write benchmark (its limit keeps temporary tables across transactions)"


def synthetic_rows(n: int, dim: int, tenant: str, seed: int = 0,
                   chars: int = 800) -> SyntheticRows:
    """``n`` chunks of ``CHUNKS_PER_DOC``-chunk documents, about ``chars`` characters each."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(64):
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < chars:
            words.append(str(rng.choice(_WORDS)))
        pool.append(" ".join(words))
    chunks = []
    for i in range(n):
        doc, index = divmod(i, CHUNKS_PER_DOC)
        count = min(CHUNKS_PER_DOC, n - doc * CHUNKS_PER_DOC)
        text = f"{tenant} row {i}: {pool[i % len(pool)]}"
        chunks.append(Chunk(
            tenant_id=tenant, doc_id=f"doc-{doc:07d}", version=1, chunk_index=index,
            chunk_count=count, text=text, content_hash=content_hash(text), char_start=0,
            char_end=len(text), source_uri=f"bench://{tenant}/doc-{doc:07d}",
            metadata={"source": "bench", "lang": "en"},
        ))
    return SyntheticRows(chunks, random_unit_vectors(n, dim, seed=seed),
                         datetime.now(UTC))


def _copy_types(cfg: Config) -> list[str]:
    return [t or cfg.vector.column_type for t in _TYPES]


def copy_into(conn: Any, cfg: Config, table: sql.Composable,
               rows: Sequence[tuple[Any, ...]]) -> float:
    """COPY (FORMAT BINARY) ``rows`` into ``table`` and commit; return the seconds taken."""
    started = time.perf_counter()
    with conn.cursor() as cur, cur.copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            table, sql.SQL(", ").join(map(sql.Identifier, COLUMNS)))) as copy:
        copy.set_types(_copy_types(cfg))
        for row in rows:
            copy.write_row(row)
    conn.commit()
    return time.perf_counter() - started


def writer_run(cfg: Config, data: SyntheticRows, progress: Progress,
                label: str) -> tuple[float, dict[str, float]]:
    """Run the real writer over ``data`` (held back, then released); return seconds, metrics."""
    wire = "float16" if cfg.vector.column_type == "halfvec" else "float32"
    held = HeldBack(cfg)
    headers = schema_headers(EMBEDDING)
    for chunk, value in zip(data.chunks, data.messages(wire), strict=True):
        held.produce(cfg.kafka.embeddings_topic, value, chunk.key, headers,
                     tag=(chunk.tenant_id, chunk.doc_id, chunk.chunk_index))
    held.flush()
    last_keys = [tag for _, tag in held.last.values()]
    probe = sql.SQL("SELECT count(*) FROM {}.chunks WHERE (tenant_id, doc_id, chunk_index) IN ({})"
                    ).format(sql.Identifier(cfg.database.schema),
                             sql.SQL(", ").join(sql.SQL("(%s, %s, %s)") for _ in last_keys))
    params = [v for key in last_keys for v in key]
    with connect(cfg.database, autocommit=True) as conn:
        runner = StageRunner("write", cfg).start()
        try:
            progress(f"{label}: writer ready; releasing {len(data.chunks)} embedding messages")
            t0 = held.release()

            def present() -> int:
                row = conn.execute(probe, params).fetchone()
                return int(row[0]) if row else 0

            t_end = poll_until(present, len(last_keys), timeout=max(600.0, len(data.chunks) / 5),
                               progress=progress, what="partitions written", interval=0.01,
                               check=runner.check_alive)
        finally:
            runner.close()
        # Read after the worker stopped: the last batch's metrics are recorded after its commit.
        samples = runner.metrics()
        row = conn.execute(sql.SQL(
            "SELECT count(*) FROM {}.chunks WHERE tenant_id = %s AND doc_id = ANY(%s)").format(
            sql.Identifier(cfg.database.schema)), (data.chunks[0].tenant_id,
                                                   sorted({c.doc_id for c in data.chunks}))
        ).fetchone()
    written = int(row[0]) if row else 0
    if written != len(data.chunks):
        raise BenchError(f"the writer committed {written} rows of {len(data.chunks)}; "
                         "see its log lines above (dead letters?).")
    return t_end - t0, samples


def run(cfg: Config, progress: Progress, *, rows: int,
        hnsw_rows: int | None = None) -> dict[str, Any]:
    """Measure the writer against raw COPY and raw INSERT ... SELECT; return report sections."""
    hnsw_n = min(hnsw_rows or 2000, rows)
    dim, halfvec = cfg.vector.dimension, cfg.vector.column_type == "halfvec"
    progress(f"generating {rows} + {2 * hnsw_n} synthetic rows ({dim} dimensions)")
    pipe = synthetic_rows(rows, dim, "bench", seed=1)
    raw = pipe.copy_rows(halfvec)
    first, second = split_halves(rows)

    with fresh_namespace(cfg, progress) as ns:
        migrate(ns, with_index=False)
        ensure_topics(ns.kafka)
        schema = sql.Identifier(ns.database.schema)
        limit_table = sql.SQL("{}.copy_limit").format(schema)
        with connect(session_database(ns.database, _SESSION)) as conn:
            conn.execute(sql.SQL("CREATE TABLE {} (LIKE {}.chunks INCLUDING DEFAULTS "
                                 "INCLUDING STORAGE)").format(limit_table, schema))
            conn.commit()
            progress(f"limit, first half: COPY {first.stop} rows into an unindexed table")
            copy_a = copy_into(conn, ns, limit_table, raw[first])
            pipe_s, samples = writer_run(ns, pipe, progress, "unindexed")
            progress(f"limit, second half: COPY {second.stop - second.start} rows")
            copy_b = copy_into(conn, ns, limit_table, raw[second])

    hnsw = _hnsw(cfg, progress, hnsw_n)
    pipe_rate, copy_rate = rate(rows, pipe_s), rate(rows, copy_a + copy_b)
    result: dict[str, Any] = {
        "pipeline_per_s": round(pipe_rate, 1),
        "limit_per_s": round(copy_rate, 1),
        "ratio": ratio(pipe_rate, copy_rate),
        "pipeline_hnsw_per_s": round(hnsw["pipeline_per_s"], 1),
        "limit_hnsw_per_s": round(hnsw["limit_per_s"], 1),
        "ratio_hnsw": ratio(hnsw["pipeline_per_s"], hnsw["limit_per_s"]),
        "pipeline_s": round(pipe_s, 3),
        "limit_s": round(copy_a + copy_b, 3),
        "limit_halves_s": [round(copy_a, 3), round(copy_b, 3)],
        "pipeline_hnsw_s": round(hnsw["pipeline_s"], 3),
        "limit_hnsw_halves_s": [round(x, 3) for x in hnsw["limit_halves_s"]],
        "worker": stage_breakdown(samples, "write", pipe_s),
        "worker_hnsw": stage_breakdown(hnsw["samples"], "write", hnsw["pipeline_s"]),
    }
    result["target"] = {"ratio": str(WRITE_TARGET), "ratio_hnsw": str(HNSW_TARGET)}
    result["meets_target"] = {"ratio": WRITE_TARGET.met(result["ratio"]),
                              "ratio_hnsw": HNSW_TARGET.met(result["ratio_hnsw"])}
    sizes = {"rows": rows, "hnsw_rows": hnsw_n, "dimension": dim,
             "column_type": cfg.vector.column_type, "metric": cfg.vector.metric,
             "mean_content_chars": round(sum(len(c.text) for c in pipe.chunks) / rows, 1),
             "write_batch_size": cfg.write.batch_size,
             "write_batch_wait_ms": cfg.write.batch_wait_ms,
             "hnsw_m": cfg.vector.hnsw_m, "hnsw_ef_construction": cfg.vector.hnsw_ef_construction,
             "partitions": cfg.kafka.partitions}
    return {"sizes": sizes, "write": result}


def _hnsw(cfg: Config, progress: Progress, n: int) -> dict[str, Any]:
    """Writer vs bare INSERT ... SELECT into the same HNSW-indexed chunks table."""
    if cfg.vector.index != "hnsw":
        raise BenchError(f"vector.index is {cfg.vector.index!r}; the HNSW comparison needs hnsw.")
    pipe = synthetic_rows(n, cfg.vector.dimension, "bench", seed=2)
    raw = synthetic_rows(n, cfg.vector.dimension, "raw", seed=3).copy_rows(
        cfg.vector.column_type == "halfvec")
    first, second = split_halves(n)
    with fresh_namespace(cfg, progress, suffix="_h") as ns:
        migrate(ns)  # with the configured HNSW index
        ensure_topics(ns.kafka)
        schema = sql.Identifier(ns.database.schema)
        cols = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
        with connect(session_database(ns.database, _SESSION)) as conn:
            halves = []
            for name, part in (("staging_a", first), ("staging_b", second)):
                table = sql.Identifier(name)
                conn.execute(sql.SQL(
                    "CREATE TEMPORARY TABLE {} (LIKE {}.chunks INCLUDING DEFAULTS)").format(
                    table, schema))
                copy_into(conn, ns, table, raw[part])
                halves.append(table)

            def insert_select(table: sql.Identifier) -> float:
                started = time.perf_counter()
                conn.execute(sql.SQL("INSERT INTO {}.chunks ({}) SELECT {} FROM {}").format(
                    schema, cols, cols, table))
                conn.commit()
                return time.perf_counter() - started

            progress(f"HNSW limit, first half: INSERT ... SELECT {first.stop} rows")
            raw_a = insert_select(halves[0])
            pipe_s, samples = writer_run(ns, pipe, progress, "HNSW")
            progress(f"HNSW limit, second half: INSERT ... SELECT {second.stop - first.stop} rows")
            raw_b = insert_select(halves[1])
    return {"pipeline_per_s": rate(n, pipe_s), "limit_per_s": rate(n, raw_a + raw_b),
            "pipeline_s": pipe_s, "limit_halves_s": [raw_a, raw_b], "samples": samples}
