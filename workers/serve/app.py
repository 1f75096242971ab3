"""The ASGI application: routes, authentication, limits, errors and metrics.

FastAPI on Starlette and uvicorn: the request bodies are pydantic models, so validation, the
OpenAPI schema at ``/openapi.json`` and ``/docs`` come from one declaration, and an invalid
body is refused before any handler runs. Every route but the probes, the metrics, the page and
the docs needs ``Authorization: Bearer <key>``; the key decides the tenant (a body cannot name
one). Errors are JSON ``{"error": "<one sentence>"}``: 400 for a bad body or filter, 401 for a
missing or revoked key, 403 for an admin operation without an admin key, 404, 413 for a body
over ``serve.max_body_bytes``, 429 (with Retry-After) over a key's rate, 503 when the service
is saturated or the database is away, 504 past ``serve.request_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import numpy as np
import psycopg
import psycopg_pool
import swagger_ui_bundle
from fastapi import Body, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from vecpipe.db.keys import Principal
from vecpipe.errors import InvalidMessage, SearchError
from workers.serve.api import DocumentIn, DocumentStatus, SearchHit, SearchRequest, SearchResponse
from workers.serve.limits import BodyLimit
from workers.serve.service import Service

__all__ = ["ApiError", "create_app"]

T = TypeVar("T")


class ApiError(Exception):
    """An answer other than 2xx, with its sentence."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


async def principal(request: Request) -> Principal:
    """The key's principal (401 without a valid key, 429 over its rate)."""
    service: Service = request.app.state.service
    cfg = service.cfg
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise ApiError(401, "this route needs an API key: send Authorization: Bearer <key>.",
                       {"WWW-Authenticate": "Bearer"})
    cache_key = hashlib.sha256(key.encode()).hexdigest()
    found, who = service.keys.get(cache_key)
    if not found:
        who = await run_in_threadpool(service.resolve, key)
        service.keys.put(cache_key, who)
    if who is None:
        raise ApiError(401, "the API key is not valid or was revoked.",
                       {"WWW-Authenticate": 'Bearer error="invalid_token"'})
    wait = service.limiter.take(who.key_id)
    if wait > 0:
        raise ApiError(429, f"key {who.key_id} is over its rate of "
                       f"{cfg.serve.rate_per_s:g} requests per second; retry later.",
                       {"Retry-After": service.limiter.retry_after(wait)})
    request.state.key_id = who.key_id
    return who


Who = Annotated[Principal, Depends(principal)]


def create_app(service: Service) -> FastAPI:
    """The application over one ``Service`` (its pools, encoder, publisher and limits)."""
    cfg = service.cfg

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="vecpipe", version=service.version, docs_url=None, redoc_url=None,
                  lifespan=lifespan, description="Search and ingestion over vecpipe's "
                  "pgvector tables, one tenant per API key.")
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=cfg.serve.max_body_bytes)
    # Swagger UI from the swagger-ui-bundle wheel: /docs loads nothing from a CDN.
    app.mount("/static/swagger", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path),
              name="swagger")


    async def bounded(work: Callable[[], Awaitable[T]]) -> T:
        """One of ``max_concurrency`` slots (503 after queue_timeout_s), within the timeout."""
        try:
            await asyncio.wait_for(service.slots.acquire(), cfg.serve.queue_timeout_s)
        except TimeoutError:
            raise ApiError(503, f"the service is at its limit of {cfg.serve.max_concurrency} "
                           "requests in flight; retry shortly.", {"Retry-After": "1"}) from None
        try:
            return await asyncio.wait_for(work(), cfg.serve.request_timeout_s)
        except TimeoutError:
            raise ApiError(504, f"the request took longer than {cfg.serve.request_timeout_s:g} "
                           "s (serve.request_timeout_s).") from None
        finally:
            service.slots.release()

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                      ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        mode = getattr(request.state, "mode", "")
        service.metrics.observe(path, request.method, mode, response.status_code,
                                time.perf_counter() - started)
        return response

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _sentence(exc.errors())}, 400)

    @app.exception_handler(SearchError)
    async def bad_search(_: Request, exc: SearchError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, 400)

    @app.exception_handler(InvalidMessage)
    async def bad_document(_: Request, exc: InvalidMessage) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, 400)

    @app.exception_handler(psycopg.errors.QueryCanceled)
    async def too_slow(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "the database took longer than the request may "
                             f"({cfg.serve.request_timeout_s:g} s, serve.request_timeout_s)."},
                            504)

    @app.exception_handler(psycopg.DataError)
    async def bad_value(_: Request, exc: Exception) -> JSONResponse:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "a value is invalid"
        return JSONResponse({"error": f"the database refused a value of the request: {first}."},
                            400)

    @app.exception_handler(psycopg.OperationalError)
    @app.exception_handler(psycopg_pool.PoolTimeout)
    async def database_away(_: Request, exc: Exception) -> JSONResponse:
        service.log.warning("database_unavailable", error=str(exc).strip().splitlines()[0])
        return JSONResponse({"error": "the database is not reachable right now; retry "
                             "shortly."}, 503, headers={"Retry-After": "2"})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        service.log.error("request_failed", route=request.url.path,
                          error=f"{type(exc).__name__}: {exc}")
        return JSONResponse({"error": "the service failed on this request; its log says why."},
                            500)

    @app.post("/v1/search", response_model=SearchResponse, tags=["search"])
    async def search(body: SearchRequest, request: Request, who: Who) -> SearchResponse:
        """The k best chunks of the key's tenant for a text (or a vector)."""
        request.state.mode = body.mode
        if body.k > cfg.serve.max_k:
            raise ApiError(400, f"k must be at most {cfg.serve.max_k} (serve.max_k), got "
                           f"{body.k}.")
        if (body.query is None) == (body.vector is None):
            raise ApiError(400, "give either query (a text) or vector, not both and not "
                           "neither.")
        if body.vector is not None and body.mode != "vector":
            raise ApiError(400, f"{body.mode} search matches words: give query, not vector.")
        service.check_filter(body.filter)

        async def run() -> SearchResponse:
            started = time.perf_counter()
            text = body.query
            query: Any = text
            if body.vector is not None:
                query = np.asarray(body.vector, dtype=np.float32)
            elif body.mode != "keyword":
                assert text is not None
                query = await service.batcher.encode(text)
            encoded = time.perf_counter()
            result = await run_in_threadpool(
                service.searcher.query, query, body.k, who.tenant_id, body.filter,
                body.ef_search, "auto", body.mode, text)
            done = time.perf_counter()
            s = result.strategy
            return SearchResponse(
                hits=[SearchHit(doc_id=h.doc_id, chunk_index=h.chunk_index,
                                version=h.doc_version, score=h.score, distance=h.distance,
                                content=h.content, source_uri=h.source_uri,
                                metadata=h.metadata) for h in result.hits],
                mode=result.mode,
                strategy={"kind": s.kind, "index": s.index, "rows": s.rows,
                          "rows_exact": s.rows_exact, "reason": s.reason},
                timings_ms={"encode": round((encoded - started) * 1000, 3),
                            "search": round((done - encoded) * 1000, 3),
                            "total": round((done - started) * 1000, 3)})

        return await bounded(run)

    @app.post("/v1/documents", status_code=202, tags=["documents"])
    async def publish(body: Annotated[DocumentIn | list[DocumentIn], Body()],
                      who: Who) -> dict[str, Any]:
        """Publish one document or a list, for the key's tenant; answered once the broker
        has them (they are searchable when GET /v1/documents/{doc_id} says so)."""
        docs = body if isinstance(body, list) else [body]
        if not docs:
            raise ApiError(400, "the list of documents is empty.")
        if len(docs) > cfg.serve.max_documents:
            raise ApiError(400, f"at most {cfg.serve.max_documents} documents a request "
                           f"(serve.max_documents), got {len(docs)}.")
        now_us = int(datetime.now(UTC).timestamp() * 1_000_000)

        async def run() -> dict[str, Any]:
            accepted = await run_in_threadpool(service.publish, who.tenant_id, docs, now_us)
            return {"accepted": accepted}

        return await bounded(run)

    @app.get("/v1/documents/{doc_id}", response_model=DocumentStatus, tags=["documents"])
    async def document(doc_id: str, who: Who) -> DocumentStatus:
        """The stored version of a document, its chunks, model and when it was written."""
        state = await bounded(lambda: run_in_threadpool(service.searcher.document, doc_id,
                                                        who.tenant_id))
        if state is None:
            raise ApiError(404, f"tenant {who.tenant_id!r} has no document {doc_id!r}.")
        return DocumentStatus(doc_id=state.doc_id, version=state.version, deleted=state.deleted,
                              chunk_count=state.chunk_count, chunks_stored=state.chunks_stored,
                              searchable=state.searchable, model=state.model,
                              updated_at=state.updated_at, written_at=state.written_at)

    @app.delete("/v1/documents/{doc_id}", status_code=202, tags=["documents"])
    async def delete(doc_id: str, who: Who, version: int | None = None) -> dict[str, Any]:
        """Remove a document (of ``version`` or older, if given), end to end, audited."""
        await bounded(lambda: run_in_threadpool(service.delete, who.tenant_id, doc_id, version))
        return {"doc_id": doc_id, "version": version, "delete": "requested"}

    @app.delete("/v1/tenant", status_code=202, tags=["documents"])
    async def delete_tenant(who: Who) -> dict[str, Any]:
        """Remove every chunk of the key's tenant published before now (an admin key only)."""
        if not who.admin:
            raise ApiError(403, "erasing a tenant needs an admin key (vecpipe keys create "
                           "--admin).")
        await bounded(lambda: run_in_threadpool(service.delete, who.tenant_id, None, None))
        return {"tenant_id": who.tenant_id, "delete": "requested"}

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        ready, problem = await run_in_threadpool(service.ready)
        body: dict[str, Any] = {"ready": ready, "models": [service.fingerprint]}
        if problem:
            body["problem"] = problem
        return JSONResponse(body, 200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        data, content_type = service.metrics.exposition()
        return Response(data, media_type=content_type)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="vecpipe API",
            swagger_js_url="/static/swagger/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger/swagger-ui.css",
            swagger_favicon_url="/static/swagger/favicon-32x32.png")

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(service.page)

    return app


def _sentence(errors: Any) -> str:
    """pydantic's first complaint as one sentence naming the part of the body."""
    with contextlib.suppress(Exception):
        first = next(iter(errors))
        if first.get("type") == "json_invalid":
            return "the body is not valid JSON."
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc) if loc else "body"
        msg = str(first.get("msg", "is not valid")).rstrip(".")
        return f"{where}: {msg[0].lower() + msg[1:] if msg else msg}."
    return "the request is not valid."
