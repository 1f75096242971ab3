"""``vecpipe bench spike``: steady searches while a bulk ingest lands in a live HNSW index.

One run, two profiles on the same server, each in a fresh namespace:

- ``defaults``: PostgreSQL's own defaults for the settings vecpipe tunes (``ALTER SYSTEM``,
  reloaded), the chunks table on the default autovacuum, the writer unpaced;
- ``tuned``: the settings of ``vecpipe.db.tuning`` and migration 0008, and the writer's own
  pacing (``write.pause_ratio``).

Each profile COPYs a base of rows and builds the HNSW index on it, measures searches at a fixed
rate with nothing else running (idle), then sends ``rows`` embedding messages through the real
writer into the indexed table while the same fixed-rate searches go on. A search's latency runs
from the moment it was due, not from when it could start, so searches that queue behind a stall
count as slow (no coordinated omission). Targets, from one run: the tuned profile's search p99
during the ingest within 2x of its idle p99, and its ingest at least 0.8 of the defaults'
unpaced rate. The server's settings are put back (``ALTER SYSTEM RESET``) at the end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from vecpipe.bench.env import Progress, fresh_namespace
from vecpipe.bench.stats import Target, latency_summary, random_unit_vectors, rate, ratio
from vecpipe.bench.write import copy_into, synthetic_rows, writer_run
from vecpipe.config import Config
from vecpipe.db.indexes import ensure_index
from vecpipe.db.migrate import migrate
from vecpipe.db.pool import connect, make_pool, session_database
from vecpipe.db.search import Searcher
from vecpipe.db.tuning import CHUNKS_AUTOVACUUM, RECOMMENDED
from vecpipe.errors import BenchError
from vecpipe.kafka.admin import ensure_topics

__all__ = ["INGEST_TARGET", "P99_TARGET", "PROFILES", "run"]

P99_TARGET = Target("<=", 2.0)
INGEST_TARGET = Target(">=", 0.8)

# PostgreSQL 18's built-in defaults, and vecpipe's recommendation (vecpipe.db.tuning).
PROFILES: dict[str, dict[str, str]] = {
    "defaults": {"checkpoint_timeout": "5min", "max_wal_size": "1GB", "wal_compression": "off",
                 "maintenance_work_mem": "64MB", "effective_io_concurrency": "16",
                 "max_parallel_workers_per_gather": "2"},
    "tuned": {r.name: r.recommended for r in RECOMMENDED},
}
K = 10
_SESSION = "The spike benchmark (ALTER SYSTEM, CHECKPOINT)"


@contextmanager
def _server_settings(cfg: Config, values: dict[str, str]) -> Iterator[dict[str, str]]:
    """Apply ``values`` with ALTER SYSTEM and a reload; RESET them when the block ends."""
    db = session_database(cfg.database, _SESSION)
    with connect(db, vector_types=False, autocommit=True) as conn:
        kinds = dict(conn.execute(
            "SELECT name, coalesce(array_to_string(enumvals, ','), '') FROM pg_settings"
            " WHERE name = 'wal_compression'").fetchall())
        applied = dict(values)
        if applied.get("wal_compression") == "lz4" and "lz4" not in kinds["wal_compression"]:
            applied["wal_compression"] = "pglz"  # a server built without lz4
        try:
            for name, value in applied.items():
                try:
                    conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.Identifier(name), sql.Literal(value)))
                except psycopg.errors.InsufficientPrivilege:
                    raise BenchError(
                        "The spike benchmark sets server settings with ALTER SYSTEM, which "
                        "needs a superuser (or GRANT ALTER SYSTEM); run it against a server "
                        "of your own, such as `vecpipe services up`.") from None
            conn.execute("SELECT pg_reload_conf()")
            time.sleep(0.5)
            conn.execute("CHECKPOINT")  # both profiles start from a fresh checkpoint
            yield applied
        finally:
            for name in applied:
                conn.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name)))
            conn.execute("SELECT pg_reload_conf()")


class FixedRateSearches:
    """Vector searches at ``qps`` in a thread; latency from each search's due time."""

    def __init__(self, searcher: Searcher, queries: np.ndarray[Any, Any], qps: float,
                 tenant: str) -> None:
        self.searcher, self.queries, self.qps, self.tenant = searcher, queries, qps, tenant
        self.latencies: list[float] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="spike-searches", daemon=True)

    def _main(self) -> None:
        start = time.perf_counter()
        i = 0
        while not self._stop.is_set():
            due = start + i / self.qps
            wait = due - time.perf_counter()
            if wait > 0 and self._stop.wait(wait):
                break
            try:
                self.searcher.query(self.queries[i % len(self.queries)], K, self.tenant)
            except Exception as exc:  # reported by stop(); the run goes on
                self.errors.append(exc)
            self.latencies.append(time.perf_counter() - due)
            i += 1

    def __enter__(self) -> FixedRateSearches:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        if self.errors:
            raise BenchError(f"{len(self.errors)} searches failed during the run, the first "
                             f"with: {self.errors[0]}")


def _profile(cfg: Config, progress: Progress, name: str, *, rows: int, base: int,
             qps: float, idle_s: float, pause_ratio: float) -> dict[str, Any]:
    """One profile: settings, base + index, idle searches, then searches during the ingest."""
    dim = cfg.vector.dimension
    with _server_settings(cfg, PROFILES[name]) as applied, \
            fresh_namespace(cfg, progress, suffix=f"_{name[0]}") as ns:
        migrate(ns, with_index=False)
        ensure_topics(ns.kafka)
        schema = sql.Identifier(ns.database.schema)
        chunks = sql.SQL("{}.chunks").format(schema)
        direct = session_database(ns.database, _SESSION)
        with connect(direct) as conn:
            if name == "defaults":
                conn.execute(sql.SQL("ALTER TABLE {} RESET ({})").format(
                    chunks, sql.SQL(", ").join(map(sql.SQL, CHUNKS_AUTOVACUUM))))
                conn.commit()
            progress(f"{name}: COPY {base} base rows, then build the HNSW index")
            halfvec = cfg.vector.column_type == "halfvec"
            copy_into(conn, ns, chunks, synthetic_rows(base, dim, "spike", seed=11,
                                                       chars=200).copy_rows(halfvec))
        ensure_index(ns, concurrently=False)
        with connect(direct, autocommit=True) as conn:
            conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(chunks))
        queries = random_unit_vectors(512, dim, seed=12)
        # The ingest's documents are new ones of the same tenant: every search reads the graph
        # the ingest is growing.
        data = synthetic_rows(rows, dim, "spike", seed=13, chars=200)
        data = replace(data, chunks=[replace(c, doc_id="new-" + c.doc_id) for c in data.chunks])
        pool = make_pool(ns.database, name="vecpipe-bench-spike")
        try:
            searcher = Searcher(ns, pool)
            for q in queries[:20]:
                searcher.query(q, K, "spike")
            progress(f"{name}: {qps:g} searches/s for {idle_s:g} s with nothing else running")
            with FixedRateSearches(searcher, queries, qps, "spike") as idle:
                time.sleep(idle_s)
            writer_cfg = replace(ns, write=replace(ns.write, pause_ratio=pause_ratio))
            progress(f"{name}: ingest {rows} rows into the live index (pause_ratio "
                     f"{pause_ratio:g}) with {qps:g} searches/s")
            with FixedRateSearches(searcher, queries, qps, "spike") as during:
                ingest_s, _ = writer_run(writer_cfg, data, progress, name)
        finally:
            pool.close()
    idle_stats, during_stats = latency_summary(idle.latencies), latency_summary(during.latencies)
    return {
        "settings": applied, "pause_ratio": pause_ratio,
        "ingest_rows_per_s": round(rate(rows, ingest_s), 1), "ingest_s": round(ingest_s, 2),
        "idle": idle_stats, "during_ingest": during_stats,
        "p99_ratio": ratio(float(during_stats.get("p99_ms", 0)),
                           float(idle_stats.get("p99_ms", 0))),
    }


def run(cfg: Config, progress: Progress, *, rows: int = 100_000, base: int = 20_000,
        qps: float = 10.0, idle_s: float = 30.0, pause_ratio: float = 0.1) -> dict[str, Any]:
    """Both profiles, defaults first, and the targets against each other."""
    if cfg.vector.index != "hnsw":
        raise BenchError(f"vector.index is {cfg.vector.index!r}; the spike benchmark needs hnsw.")
    if rows < 1 or base < K or qps <= 0 or idle_s <= 0:
        raise BenchError("--rows must be at least 1, --base at least 10, --qps and --idle-s "
                         "above 0.")
    defaults = _profile(cfg, progress, "defaults", rows=rows, base=base, qps=qps,
                        idle_s=idle_s, pause_ratio=0.0)
    tuned = _profile(cfg, progress, "tuned", rows=rows, base=base, qps=qps, idle_s=idle_s,
                     pause_ratio=pause_ratio)
    result: dict[str, Any] = {
        "p99_ratio": tuned["p99_ratio"],
        "ingest_ratio": ratio(tuned["ingest_rows_per_s"], defaults["ingest_rows_per_s"]),
        "defaults": defaults, "tuned": tuned,
        "target": {"p99_ratio": str(P99_TARGET), "ingest_ratio": str(INGEST_TARGET)},
    }
    result["meets_target"] = {"p99_ratio": P99_TARGET.met(result["p99_ratio"]),
                              "ingest_ratio": INGEST_TARGET.met(result["ingest_ratio"])}
    sizes = {"rows": rows, "base_rows": base, "qps": qps, "idle_s": idle_s, "k": K,
             "dimension": cfg.vector.dimension, "hnsw_m": cfg.vector.hnsw_m,
             "hnsw_ef_construction": cfg.vector.hnsw_ef_construction,
             "write_batch_size": cfg.write.batch_size}
    return {"sizes": sizes, "spike": result}
