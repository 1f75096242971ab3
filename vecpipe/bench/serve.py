"""``vecpipe bench serve``: the HTTP API under load, against the CLI, on one table.

N clustered synthetic vectors (as ``bench search`` loads them; tenant ``big`` holds 99%) with
the HNSW index; ``vecpipe serve`` runs as its own process (as deployed: its own role, the model
loaded once, query encodes batched), and a real HTTP client (httpx, in this process, one
connection per client thread) sends text queries in vector mode:

- one client, one request at a time: p50/p95/p99 of the whole request as the client sees it,
  and the service's own split (encode, search);
- then C clients at once for ``--seconds`` each, C doubling from 2 to ``--max-clients``:
  throughput and latency at each level. The QPS "held" is the highest throughput of a level
  whose p95 stays under 100 ms; saturation is the level of the highest throughput.

The same query texts then go through ``vecpipe search`` (a process per query: the model loads
each time), which is what the service exists to avoid.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
from psycopg import sql

from vecpipe.bench.env import Progress, free_port, fresh_namespace
from vecpipe.bench.search import QUERY_TEXTS, load_synthetic, small_tenant_mask
from vecpipe.bench.stats import Target, clustered_unit_vectors, latency_summary
from vecpipe.config import Config, with_section
from vecpipe.db.indexes import ensure_index
from vecpipe.db.keys import create_key
from vecpipe.db.migrate import migrate
from vecpipe.db.pool import connect
from vecpipe.errors import BenchError

__all__ = ["HELD_P95_MS", "ONE_CLIENT_P95_TARGET", "run"]

ONE_CLIENT_P95_TARGET = Target("<", 30.0)
HELD_P95_MS = 100.0
SPREAD = 1.0


def _env(cfg: Config, port: int) -> dict[str, str]:
    """The service process's settings: this run's database, schema, roles and port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VECPIPE_")}
    env.update({
        "VECPIPE_KAFKA_BOOTSTRAP": cfg.kafka.bootstrap,
        "VECPIPE_DATABASE_URL": cfg.database.url,
        "VECPIPE_SEARCH_DATABASE_URL": cfg.database.search_url,
        "VECPIPE_DB_SCHEMA": cfg.database.schema,
        "VECPIPE_DATABASE_APP_ROLE": cfg.database.app_role,
        "VECPIPE_SERVE_ROLE": cfg.serve.role,
        "VECPIPE_SERVE_PORT": str(port),
        "VECPIPE_SERVE_RATE_PER_S": "0",
        "VECPIPE_SERVE_MAX_CONCURRENCY": "256",
        "VECPIPE_SERVE_QUEUE_TIMEOUT_S": "30",
        "VECPIPE_LOG_LEVEL": "warning",
        "VECPIPE_MODEL": cfg.model.name,
        "VECPIPE_TENANT": "big",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    return env


@contextlib.contextmanager
def _service(cfg: Config, progress: Progress) -> Iterator[str]:
    """``vecpipe serve`` in a process of its own until the block ends; its base URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vecpipe.cli", "serve", "--port", str(port)],
                            env=_env(cfg, port), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise BenchError(f"vecpipe serve exited {proc.returncode}: "
                                 f"{(proc.stderr.read() if proc.stderr else '')[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise BenchError("vecpipe serve was not ready within 180 s.")
            time.sleep(0.5)
        progress(f"vecpipe serve ready on {url} (pid {proc.pid})")
        yield url
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        if proc.poll() is None:
            proc.kill()


def _one_client(url: str, key: str, texts: list[str]) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {key}"}
    total: list[float] = []
    encode: list[float] = []
    search: list[float] = []
    with httpx.Client(base_url=url, headers=auth, timeout=30) as client:
        for text in texts[:10]:  # warm-up: connections, caches, the first plans
            client.post("/v1/search", json={"query": text, "k": 10})
        for text in texts:
            started = time.perf_counter()
            reply = client.post("/v1/search", json={"query": text, "k": 10})
            total.append(time.perf_counter() - started)
            if reply.status_code != 200:
                raise BenchError(f"POST /v1/search answered {reply.status_code}: {reply.text}")
            timings = reply.json()["timings_ms"]
            encode.append(timings["encode"])
            search.append(timings["search"])
    return {**latency_summary(total), "queries": len(total),
            "service_encode_p50_ms": round(float(np.percentile(encode, 50)), 2),
            "service_search_p50_ms": round(float(np.percentile(search, 50)), 2)}


def _level(url: str, key: str, texts: list[str], clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads sending back to back for ``seconds``."""
    auth = {"Authorization": f"Bearer {key}"}
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start = threading.Event()
    stop_at = [0.0]

    def work(i: int) -> None:
        with httpx.Client(base_url=url, headers=auth, timeout=60) as client:
            client.post("/v1/search", json={"query": texts[i % len(texts)], "k": 10})
            start.wait()
            n = i
            while time.perf_counter() < stop_at[0]:
                n += clients
                began = time.perf_counter()
                reply = client.post("/v1/search", json={"query": texts[n % len(texts)],
                                                        "k": 10})
                if reply.status_code == 200:
                    latencies[i].append(time.perf_counter() - began)
                else:
                    errors[i] += 1

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # every client connected and warm
    began = time.perf_counter()
    stop_at[0] = began + seconds
    start.set()
    for t in threads:
        t.join(seconds + 120)
    elapsed = time.perf_counter() - began
    done = [x for per in latencies for x in per]
    if not done:
        raise BenchError(f"no request succeeded at {clients} clients.")
    return {"clients": clients, "qps": round(len(done) / elapsed, 1), "requests": len(done),
            "errors": sum(errors), **latency_summary(done)}


def _cli(cfg: Config, texts: list[str]) -> dict[str, Any]:
    """``vecpipe search`` per query, as a person or a script would run it."""
    env = _env(cfg, 0)
    walls = []
    for text in texts:
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "vecpipe.cli", "search", text, "-k", "10",
                               "--tenant", "big", "--json"], env=env, capture_output=True,
                              text=True, timeout=300)
        walls.append(time.perf_counter() - started)
        if proc.returncode != 0:
            raise BenchError(f"vecpipe search exited {proc.returncode}: {proc.stderr[-2000:]}")
    return {**latency_summary(walls), "queries": len(walls)}


def run(cfg: Config, progress: Progress, *, rows: int, queries: int, seconds: float,
        max_clients: int, cli_queries: int) -> dict[str, Any]:
    """Load, index, serve, measure; return the report's sections."""
    if cfg.vector.index != "hnsw":
        raise BenchError(f"vector.index is {cfg.vector.index!r}; the serve benchmark measures "
                         "hnsw.")
    clusters = max(1, round(math.sqrt(rows)))
    progress(f"generating {rows} vectors in {clusters} clusters")
    data, _ = clustered_unit_vectors(rows, cfg.vector.dimension, clusters, SPREAD, seed=11)
    small = small_tenant_mask(rows, seed=13)
    texts = [f"{QUERY_TEXTS[i % len(QUERY_TEXTS)]} ({i // len(QUERY_TEXTS)})"
             for i in range(queries)]
    made: list[Config] = []
    try:
        with fresh_namespace(cfg, progress) as base:
            ns = with_section(base, "serve", role=f"{base.database.schema}_serve")
            ns = with_section(ns, "database", app_role=f"{base.database.schema}_app")
            made.append(ns)
            migrate(ns, with_index=False)
            with connect(ns.database) as conn:
                progress(f"COPY {rows} rows")
                load_synthetic(conn, ns, data, small, progress)
            progress("building the HNSW index")
            ensure_index(ns, concurrently=False)
            with connect(ns.database, autocommit=True) as conn:
                conn.execute(sql.SQL("VACUUM (ANALYZE) {}.chunks").format(
                    sql.Identifier(ns.database.schema)))
            key = create_key(ns, "big", label="bench serve").key
            with _service(ns, progress) as url:
                progress(f"1 client: {queries} text queries")
                one = _one_client(url, key, texts)
                levels = []
                clients = 2
                while clients <= max_clients:
                    progress(f"{clients} clients for {seconds:g} s")
                    levels.append(_level(url, key, texts, clients, seconds))
                    clients *= 2
            progress(f"vecpipe search (the CLI): {cli_queries} queries, a process each")
            cli = _cli(ns, texts[:cli_queries])
    finally:
        for ns in made:  # after the schema: the roles hold rights on its objects until then
            _drop_roles(ns)
    held = [lv for lv in levels if lv["p95_ms"] < HELD_P95_MS]
    saturated = max(levels, key=lambda lv: lv["qps"]) if levels else None
    result = {
        "one_client": one,
        "levels": levels,
        "qps_held_at_p95_under_100ms": max((lv["qps"] for lv in held), default=None),
        "saturation": saturated,
        "cli": cli,
        "target": {"one_client_p95_ms": str(ONE_CLIENT_P95_TARGET)},
        "meets_target": {"one_client_p95_ms": ONE_CLIENT_P95_TARGET.met(one["p95_ms"])},
    }
    sizes = {"rows": rows, "queries": queries, "seconds_per_level": seconds,
             "max_clients": max_clients, "k": 10, "mode": "vector", "tenant_share": 0.99}
    return {"sizes": sizes, "serve": result}


def _drop_roles(cfg: Config) -> None:
    """The run's roles go with its schema (they are cluster-wide)."""
    with contextlib.suppress(Exception), connect(cfg.database, vector_types=False,
                                                 autocommit=True) as conn:
        for role in (cfg.serve.role, cfg.database.app_role):
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
