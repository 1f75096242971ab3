"""``vecpipe bench search``: HNSW lookup and whole-request latency, recall@10 against exact search.

N clustered synthetic unit vectors (the shape of topic embeddings) are loaded into a fresh chunks
table with COPY, then the configured HNSW index is built (the build time is reported). Two
tenants: ``big`` holds 99% of the rows, ``small`` 1%, spread over every cluster. For each
``hnsw.ef_search`` of the sweep:

- lookup: ``SELECT ... ORDER BY embedding <=> q LIMIT 10`` over the whole table with a
  precomputed query vector, timed from execute to fetched rows; recall@10 against the exact
  top 10 (brute force in numpy over the same vectors);
- whole request: ``Searcher.search(text, 10, tenant="big")``, the query text embedded by the
  model included;
- filtered: ``Searcher.search(vector, 10, tenant="small")``, recall@10 against the exact top 10
  of that tenant's rows.

The targets are set for 1,000,000 rows (``--rows 1000000``); the default 100,000 keeps the run to
a few minutes on two cores.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from pgvector import HalfVector, Vector
from psycopg import sql

from vecpipe.bench.embed import load_encoder, model_info
from vecpipe.bench.env import Progress, fresh_namespace
from vecpipe.bench.stats import (
    Target,
    cluster_centers,
    clustered_unit_vectors,
    exact_top_k,
    latency_summary,
    recall_at_k,
)
from vecpipe.config import Config
from vecpipe.db.indexes import ensure_index, index_name
from vecpipe.db.migrate import migrate
from vecpipe.db.pool import connect, make_pool, session_database
from vecpipe.db.schema import distance_operator
from vecpipe.db.search import Searcher
from vecpipe.errors import BenchError

__all__ = [
    "E2E_P95_TARGET",
    "FILTERED_RECALL_TARGET",
    "LOOKUP_P95_TARGET",
    "QUERY_TEXTS",
    "RECALL_TARGET",
    "load_synthetic",
    "run",
    "small_tenant_mask",
]

LOOKUP_P95_TARGET = Target("<", 10.0)
E2E_P95_TARGET = Target("<", 30.0)
RECALL_TARGET = Target(">=", 0.95)
FILTERED_RECALL_TARGET = Target(">=", 0.90)
TARGET_ROWS = 1_000_000
K = 10
SPREAD = 1.0
SMALL_SHARE = 0.01
WARMUP = 10

QUERY_TEXTS = (
    "how do I parse command line arguments",
    "read a JSON file into a dictionary",
    "connect to a SQLite database and run a query",
    "format dates and times in UTC",
    "compress a folder into a zip archive",
    "run a function in a background thread",
    "match text with a regular expression",
    "send an HTTP request and read the response",
    "generate a random number between two values",
    "copy a file and keep its permissions",
    "log messages to a file with a rotating handler",
    "measure how long a function takes to run",
    "serialize an object to bytes and back",
    "iterate over the lines of a large file",
    "sort a list of dictionaries by a key",
    "compute the hash of a file",
)


# Measured on a session of its own: behind a pooler, the direct URL.
_SESSION = "The search benchmark (its raw lookups set hnsw.ef_search per session)"


def small_tenant_mask(rows: int, seed: int) -> npt.NDArray[np.bool_]:
    """True for the rows of the small tenant: 1% of them, chosen at random."""
    rng = np.random.default_rng(seed)
    small = np.zeros(rows, dtype=bool)
    small[rng.choice(rows, size=max(1, round(rows * SMALL_SHARE)), replace=False)] = True
    return small


def _copy_rows(data: npt.NDArray[np.float32], small: npt.NDArray[np.bool_],
               halfvec: bool) -> Iterator[tuple[Any, ...]]:
    wrap = HalfVector if halfvec else Vector
    now = datetime.now(UTC)
    for i, vec in enumerate(data):
        yield ("small" if small[i] else "big", f"r{i}", 0, 1, 1,
               hashlib.sha256(i.to_bytes(8, "little")).digest(), f"synthetic row {i}",
               wrap(vec), "bench-synthetic", "1", "synthetic", now)


def load_synthetic(conn: Any, cfg: Config, data: npt.NDArray[np.float32],
                   small: npt.NDArray[np.bool_], progress: Progress) -> float:
    cols = ("tenant_id", "doc_id", "chunk_index", "doc_version", "chunk_count", "content_hash",
            "content", "embedding", "model_name", "model_revision", "model_backend",
            "embedded_at")
    types = ["text", "text", "int4", "int8", "int4", "bytea", "text", cfg.vector.column_type,
             "text", "text", "text", "timestamptz"]
    started = time.perf_counter()
    shown = started
    with conn.cursor() as cur, cur.copy(sql.SQL("COPY {}.chunks ({}) FROM STDIN (FORMAT BINARY)")
                                        .format(sql.Identifier(cfg.database.schema),
                                                sql.SQL(", ").join(map(sql.Identifier, cols)))
                                        ) as copy:
        copy.set_types(types)
        for i, row in enumerate(_copy_rows(data, small, cfg.vector.column_type == "halfvec")):
            copy.write_row(row)
            if time.perf_counter() - shown > 10:
                progress(f"  {i}/{len(data)} rows loaded")
                shown = time.perf_counter()
    conn.commit()
    return time.perf_counter() - started


def _ids(hits: list[Any]) -> list[int]:
    return [int(str(h)[1:]) for h in hits]


def run(cfg: Config, progress: Progress, *, rows: int, queries: int, ef_search: list[int],
        clusters: int | None = None) -> dict[str, Any]:
    """Load, index and query; return the report's sections."""
    if cfg.vector.index != "hnsw":
        raise BenchError(f"vector.index is {cfg.vector.index!r}; the search benchmark measures "
                         "hnsw.")
    dim, metric = cfg.vector.dimension, cfg.vector.metric
    clusters = clusters or max(1, round(math.sqrt(rows)))
    progress(f"generating {rows} vectors in {clusters} clusters and {queries} queries")
    data, _ = clustered_unit_vectors(rows, dim, clusters, SPREAD, seed=11)
    qvecs, _ = clustered_unit_vectors(queries, dim, clusters, SPREAD, seed=12,
                                      centers=cluster_centers(clusters, dim, 11))
    small = small_tenant_mask(rows, seed=13)
    small_rows = np.flatnonzero(small)
    progress("exact top 10 by brute force (ground truth)")
    truth = exact_top_k(data, qvecs, K, metric)
    truth_small = [[int(small_rows[j]) for j in top]
                   for top in exact_top_k(data[small_rows], qvecs, K, metric)]
    encoder = load_encoder(cfg.model)
    encoder.encode(list(QUERY_TEXTS[:4]))
    texts = [f"{QUERY_TEXTS[i % len(QUERY_TEXTS)]} ({i // len(QUERY_TEXTS)})"
             for i in range(queries)]
    wrap = HalfVector if cfg.vector.column_type == "halfvec" else Vector

    with fresh_namespace(cfg, progress) as ns:
        migrate(ns, with_index=False)
        schema = sql.Identifier(ns.database.schema)
        with connect(session_database(ns.database, _SESSION)) as conn:
            progress(f"COPY {rows} rows")
            load_s = load_synthetic(conn, ns, data, small, progress)
            progress(f"building the HNSW index (m={cfg.vector.hnsw_m}, "
                     f"ef_construction={cfg.vector.hnsw_ef_construction})")
            started = time.perf_counter()
            ensure_index(ns, concurrently=False)
            build_s = time.perf_counter() - started
            conn.autocommit = True
            conn.execute(sql.SQL("VACUUM (ANALYZE) {}.chunks").format(schema))
            size = conn.execute("SELECT pg_relation_size(%s::regclass)",
                                (f"{ns.database.schema}.{index_name(ns)}",)).fetchone()
            lookup = sql.SQL("SELECT doc_id FROM {}.chunks ORDER BY embedding {} %s LIMIT {}"
                             ).format(schema, distance_operator(metric), sql.Literal(K))
            plan = "\n".join(r[0] for r in conn.execute(
                sql.SQL("EXPLAIN {}").format(lookup), (wrap(qvecs[0]),)).fetchall())
            sweep = []
            pool = make_pool(ns.database, name="vecpipe-bench-search")
            try:
                searcher = Searcher(ns, pool, encoder)
                for ef in ef_search:
                    progress(f"ef_search {ef}: {queries} lookups, requests and filtered searches")
                    sweep.append(_measure(conn, searcher, lookup, wrap, qvecs, texts, ef, truth,
                                          truth_small))
            finally:
                pool.close()

    chosen = next((s for s in sweep if RECALL_TARGET.met(s["recall_at_10"])), sweep[-1])
    result: dict[str, Any] = {
        "ef_search": chosen["ef_search"],
        "p50_ms": chosen["p50_ms"], "p95_ms": chosen["p95_ms"], "p99_ms": chosen["p99_ms"],
        "p95_ms_e2e": chosen["p95_ms_e2e"],
        "recall_at_10": chosen["recall_at_10"],
        "filtered_recall_at_10": chosen["filtered_recall_at_10"],
        "filtered_p95_ms": chosen["filtered_p95_ms"],
        "index_build_s": round(build_s, 2),
        "load_s": round(load_s, 2),
        "index_mb": round(size[0] / 2**20, 1) if size else None,
        "lookup_uses_index": index_name(ns) in plan,
        "sweep": sweep,
        "target": {"p95_ms": str(LOOKUP_P95_TARGET), "p95_ms_e2e": str(E2E_P95_TARGET),
                   "recall_at_10": str(RECALL_TARGET),
                   "filtered_recall_at_10": str(FILTERED_RECALL_TARGET)},
        "target_rows": TARGET_ROWS,
        "chosen_as": "the smallest ef_search with recall_at_10 >= 0.95 (else the largest)",
    }
    result["meets_target"] = {
        "p95_ms": LOOKUP_P95_TARGET.met(result["p95_ms"]),
        "p95_ms_e2e": E2E_P95_TARGET.met(result["p95_ms_e2e"]),
        "recall_at_10": RECALL_TARGET.met(result["recall_at_10"]),
        "filtered_recall_at_10": FILTERED_RECALL_TARGET.met(result["filtered_recall_at_10"]),
    }
    sizes = {"rows": rows, "queries": queries, "dimension": dim, "metric": metric,
             "column_type": cfg.vector.column_type, "clusters": clusters, "spread": SPREAD,
             "small_tenant_rows": int(small.sum()), "k": K, "hnsw_m": cfg.vector.hnsw_m,
             "hnsw_ef_construction": cfg.vector.hnsw_ef_construction}
    return {"model": model_info(encoder), "sizes": sizes, "search": result}


def _measure(conn: Any, searcher: Any, lookup: sql.Composed, wrap: Any,
             qvecs: npt.NDArray[np.float32], texts: list[str], ef: int,
             truth: list[list[int]], truth_small: list[list[int]]) -> dict[str, Any]:
    """Lookups, whole requests and filtered searches at one ef_search."""
    conn.execute(sql.SQL("SET hnsw.ef_search = {}").format(sql.Literal(ef)))
    params = [wrap(q) for q in qvecs]
    for p in params[:WARMUP]:
        conn.execute(lookup, (p,)).fetchall()
    found, lookup_s = [], []
    for p in params:
        started = time.perf_counter()
        got = conn.execute(lookup, (p,)).fetchall()
        lookup_s.append(time.perf_counter() - started)
        found.append(_ids([r[0] for r in got]))

    for text in texts[:WARMUP]:
        searcher.search(text, K, tenant="big", ef_search=ef)
    request_s = []
    for text in texts:
        started = time.perf_counter()
        searcher.search(text, K, tenant="big", ef_search=ef)
        request_s.append(time.perf_counter() - started)

    for q in qvecs[:WARMUP]:
        searcher.search(q, K, tenant="small", ef_search=ef)
    found_small, filtered_s = [], []
    for q in qvecs:
        started = time.perf_counter()
        hits = searcher.search(q, K, tenant="small", ef_search=ef)
        filtered_s.append(time.perf_counter() - started)
        found_small.append(_ids([h.doc_id for h in hits]))

    look, req, filt = (latency_summary(lookup_s), latency_summary(request_s),
                       latency_summary(filtered_s))
    return {
        "ef_search": ef,
        "recall_at_10": round(recall_at_k(found, truth, K), 4),
        "p50_ms": look["p50_ms"], "p95_ms": look["p95_ms"], "p99_ms": look["p99_ms"],
        "p50_ms_e2e": req["p50_ms"], "p95_ms_e2e": req["p95_ms"], "p99_ms_e2e": req["p99_ms"],
        "filtered_recall_at_10": round(recall_at_k(found_small, truth_small, K), 4),
        "filtered_p50_ms": filt["p50_ms"], "filtered_p95_ms": filt["p95_ms"],
        "filtered_p99_ms": filt["p99_ms"],
    }
