"""What ``vecpipe serve`` holds while it runs: the database pool (as its own role), the loaded
encoder and its batcher, the publisher, the key cache, the limits and the metrics.

The service connects as ``serve.role``: a LOGIN role that owns nothing, is not a member of the
tables' owner and never bypasses row-level security. ``check_role`` refuses to start as any
other kind of role, so that a deployment that hands the service the owner's URL fails at once,
naming the setting, instead of quietly reading every tenant's rows.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from psycopg import sql
from psycopg_pool import ConnectionPool

from producers.publisher import Publisher
from vecpipe.config import Config, DatabaseConfig
from vecpipe.db.filters import compile_filter
from vecpipe.db.keys import Principal, resolve_key
from vecpipe.db.pool import search_database
from vecpipe.db.search import Searcher
from vecpipe.errors import ConfigError
from vecpipe.logs import get_logger
from vecpipe.messages import Document
from workers.serve.api import DocumentIn
from workers.serve.batcher import EncodeBatcher
from workers.serve.limits import RateLimiter, TTLCache

__all__ = ["ServeMetrics", "Service", "check_role", "serve_database"]

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_READY_FOR_S = 2.0


class ServeMetrics:
    """Request latency per route and mode, responses by status, and encode batch sizes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.seconds = Histogram(
            "vecpipe_http_request_seconds", "HTTP request latency, by route and search mode.",
            ["route", "method", "mode"], buckets=_BUCKETS, registry=self.registry)
        self.responses = Counter(
            "vecpipe_http_responses_total", "HTTP responses, by route and status code.",
            ["route", "method", "status"], registry=self.registry)
        self.batch = Histogram(
            "vecpipe_serve_encode_batch_size", "Query texts per encode call.",
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        for mode in ("vector", "keyword", "hybrid"):
            self.seconds.labels("/v1/search", "POST", mode)

    def observe(self, route: str, method: str, mode: str, status: int, seconds: float) -> None:
        """Count one response."""
        self.seconds.labels(route, method, mode).observe(seconds)
        self.responses.labels(route, method, str(status)).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def serve_database(cfg: Config) -> DatabaseConfig:
    """Where the service connects: serve.database_url, else the search database's URL with
    serve.role as its user (and no password: the owner's is never reused); statements are cut
    at the request timeout."""
    base = search_database(cfg.database)
    url = cfg.serve.database_url
    if not url:
        parts = urlsplit(base.url)
        host = parts.netloc.rpartition("@")[2]
        url = urlunsplit(parts._replace(netloc=f"{quote(cfg.serve.role, safe='')}@{host}"))
    timeout_ms = int(cfg.serve.request_timeout_s * 1000)
    return replace(base, url=url, statement_timeout_ms=min(
        base.statement_timeout_ms or timeout_ms, timeout_ms))


def check_role(conn: psycopg.Connection[Any], cfg: Config) -> str:
    """The connected role's name, if it is fit to serve requests; else ConfigError."""
    row = conn.execute(sql.SQL(
        "SELECT r.rolname, r.rolsuper, r.rolbypassrls,"
        " pg_has_role(r.oid, c.relowner, 'MEMBER'),"
        " EXISTS (SELECT FROM pg_class o WHERE o.relowner = r.oid)"
        "  OR EXISTS (SELECT FROM pg_namespace n WHERE n.nspowner = r.oid),"
        " pg_has_role(r.oid, {app}, 'USAGE')"
        " FROM pg_roles r LEFT JOIN pg_class c ON c.oid = to_regclass({chunks})"
        " WHERE r.rolname = current_user").format(
        app=sql.Literal(cfg.database.app_role),
        chunks=sql.Literal(f'"{cfg.database.schema}".chunks'))).fetchone()
    assert row is not None
    name, superuser, bypass, owner_member, owns, app = row
    setting = "serve.database_url (VECPIPE_SERVE_DATABASE_URL)"
    problem = None
    if superuser or bypass:
        problem = "is a superuser or has BYPASSRLS, so row-level security would not apply"
    elif owner_member:
        problem = "is (or is a member of) the owner of the chunks table"
    elif owns:
        problem = "owns objects in this database"
    elif not app:
        problem = (f"does not hold the rights of {cfg.database.app_role} (database.app_role); "
                   "run 'vecpipe migrate', which grants them to serve.role")
    if problem is not None:
        raise ConfigError(
            f"{setting} connects as {name!r}, which {problem}; the service must connect as its "
            f"own role ({cfg.serve.role!r}, serve.role, created by 'vecpipe migrate').")
    return str(name)


class Service:
    """The state the routes share; see the module docstring."""

    def __init__(self, cfg: Config, *, encoder: Any, pool: ConnectionPool[Any],
                 page: str = "", version: str = "") -> None:
        self.cfg = cfg
        self.encoder = encoder
        self.pool = pool
        self.page = page
        self.version = version
        self.log = get_logger(stage="serve")
        self.metrics = ServeMetrics()
        self.searcher = Searcher(cfg, pool)
        s = cfg.serve
        self.batcher = EncodeBatcher(encoder.encode, max_batch=s.batch_max,
                                     wait_s=s.batch_wait_ms / 1000,
                                     observe=self.metrics.batch.observe)
        self.keys: TTLCache[Principal] = TTLCache(s.key_cache_s)
        self.limiter = RateLimiter(s.rate_per_s, s.rate_burst)
        self.slots = asyncio.Semaphore(s.max_concurrency)
        self.fingerprint = {"name": encoder.name, "revision": encoder.revision,
                            "backend": encoder.backend_tag, "dimension": encoder.dimension}
        self._publisher: Publisher | None = None
        self._publisher_lock = threading.Lock()
        self._ready: tuple[float, bool, str | None] = (0.0, False, "not checked yet")

    def start(self) -> None:
        """On the event loop, before the first request."""
        self.batcher.start()
        self.log.info("serve_started", host=self.cfg.serve.host, port=self.cfg.serve.port,
                      model=self.fingerprint["name"])

    async def stop(self) -> None:
        """After the last request: fail what is queued, flush what was published."""
        await self.batcher.stop()
        if self._publisher is not None:
            await asyncio.to_thread(self._publisher.flush)
        self.log.info("serve_stopped")

    def resolve(self, key: str) -> Principal | None:
        """The key's principal, from the database (the caller caches it)."""
        with self.pool.connection() as conn:
            return resolve_key(conn, self.cfg.database.schema, key)

    def check_filter(self, spec: Any) -> None:
        """Raise FilterError (a 400) before any work, for a filter that cannot compile."""
        compile_filter(spec)

    def publisher(self) -> Publisher:
        """The idempotent publisher, made on first use (search needs no broker)."""
        with self._publisher_lock:
            if self._publisher is None:
                self._publisher = Publisher(self.cfg)
            return self._publisher

    def publish(self, tenant: str, docs: Sequence[DocumentIn], now_us: int) -> list[dict[str, Any]]:
        """Publish ``docs`` for ``tenant``; returns once the broker acknowledged them all."""
        pub = self.publisher()
        accepted = []
        for d in docs:
            version = d.version
            if version is None:
                version = Document.version_from(d.updated_at) if d.updated_at else now_us
            doc = Document(tenant_id=tenant, doc_id=d.doc_id, content=d.content,
                           version=version, source_uri=d.source_uri, metadata=d.metadata)
            result = pub.publish(doc)
            accepted.append({"doc_id": d.doc_id, "version": version, "chunks": result.chunks})
        pub.flush()
        return accepted

    def delete(self, tenant: str, doc_id: str | None, version: int | None) -> None:
        """Publish a delete of one document, or (``doc_id`` None) of the tenant."""
        pub = self.publisher()
        if doc_id is None:
            pub.delete_tenant(tenant, reason="DELETE /v1/tenant")
        else:
            pub.delete(tenant, doc_id, version=version, reason="DELETE /v1/documents")
        pub.flush()

    def ready(self) -> tuple[bool, str | None]:
        """Whether the database answers (checked at most every 2 s) and the model is loaded."""
        at, ok, problem = self._ready
        if time.monotonic() - at < _READY_FOR_S:
            return ok, problem
        try:
            with self.pool.connection(timeout=2.0) as conn:
                conn.execute("SELECT 1")
            ok, problem = True, None
        except Exception as exc:  # any failure is "not ready", said in the body
            ok, problem = False, f"database: {str(exc).strip().splitlines()[0]}"
        self._ready = (time.monotonic(), ok, problem)
        return ok, problem
