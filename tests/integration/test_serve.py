"""``vecpipe serve`` over real HTTP, against the real database, broker and model.

One service per module (the model loads once): two tenants' chunks written by the real writer's
Store, keys made by the real key store, requests from httpx over a socket.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
import uvicorn
from psycopg import sql

from tests.conftest import Endpoints
from tests.helpers import read_topic, run_stage
from vecpipe.config import Config, load_config, with_section
from vecpipe.db.keys import create_key, revoke_key
from vecpipe.db.migrate import migrate
from vecpipe.db.pool import make_pool
from vecpipe.db.store import Row, Store
from vecpipe.errors import ConfigError
from vecpipe.messages import content_hash
from workers.serve import build_service, check_role, create_app, serve_database

NOW = datetime(2026, 1, 1, tzinfo=UTC)

# acme's corpus: codes that look alike to a sentence model, so that an exact code is found by
# its words, and a printer chunk that shares no word with its paraphrase.
ACME = {
    "err-4711": ("Error E-4711 is raised when the disk quota of a project is exceeded.",
                 {"kind": "error", "year": 2024, "tags": ["storage", "quota"]}),
    "err-4712": ("Error E-4712 is raised when the disk quota of a user is exceeded.",
                 {"kind": "error", "year": 2023, "tags": ["storage"]}),
    "err-4713": ("Error E-4713 is raised when the disk is full and quota checks fail.",
                 {"kind": "error", "year": 2022}),
    "err-5100": ("Error E-5100 is raised when the storage volume quota is exceeded.",
                 {"kind": "error", "year": 2021, "tags": ["storage"]}),
    "toner": ("Steps to replace the toner cartridge of the office laser device.",
              {"kind": "howto", "year": 2020, "tags": ["hardware"]}),
    "vpn": ("Configure the VPN client to reach the office network from home.",
            {"kind": "howto", "year": 2024, "lang": "en"}),
    "report": ("The quarterly report lists revenue and costs by region.",
               {"kind": "report", "year": 2023}),
    # A form number inside a sentence about something else, and two parts whose short
    # descriptions are nearer to the bare number in vector space.
    "ship": ("The shipment is held at customs until form ZX-9041-Q is filed with the pallet "
             "labels.", {"kind": "logistics"}),
    "part1": ("Part ZX-9042-Q is a stainless hex bolt.", {"kind": "logistics"}),
    "part2": ("Part ZX-9040-Q is a zinc washer.", {"kind": "logistics"}),
}
GLOBEX = {
    "secret": ("Globex launch plan: the rocket leaves on Friday.", {"kind": "plan"}),
    "toner-g": ("Globex buys toner cartridges for every laser device.", {"kind": "howto"}),
}


@dataclass
class Served:
    cfg: Config
    url: str
    keys: dict[str, str]
    client: httpx.Client

    def post(self, path: str, body: Any, key: str | None = "acme") -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        return self.client.post(path, json=body, headers=headers)

    def search(self, body: dict[str, Any], key: str = "acme") -> httpx.Response:
        return self.post("/v1/search", body, key)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def module_config(endpoints: Endpoints, **serve: Any) -> Config:
    """A configuration on a fresh schema, topics and roles (the serve role per module)."""
    ns = "s" + uuid.uuid4().hex[:10]
    environ = {k: v for k, v in os.environ.items()
               if k.startswith("VECPIPE_") and k not in ("VECPIPE_KAFKA_BOOTSTRAP",
                                                         "VECPIPE_DATABASE_URL")}
    return load_config(environ=environ, overrides={
        "kafka": {"bootstrap": endpoints.bootstrap, "chunks_topic": f"{ns}.chunks",
                  "embeddings_topic": f"{ns}.embeddings", "embed_group": f"{ns}-embed",
                  "write_group": f"{ns}-write", "partitions": 2},
        "database": {"url": endpoints.database_url, "schema": ns, "app_role": f"{ns}_app"},
        "embed": {"batch_wait_ms": 100},
        "write": {"batch_wait_ms": 100},
        "ops": {"log_format": "json", "worker_id": f"{ns}-worker"},
        "serve": {"role": f"{ns}_serve", "key_cache_s": 0.5, "rate_per_s": 1000.0,
                  "rate_burst": 1000, **serve},
    })


def write_corpus(cfg: Config, encoder: Any, tenant: str, docs: dict[str, Any]) -> None:
    texts = [t for t, _ in docs.values()]
    vecs = encoder.encode(texts)
    rows = [Row(tenant_id=tenant, doc_id=doc, chunk_index=0, doc_version=3, chunk_count=1,
                content_hash=content_hash(text), content=text, char_start=0,
                char_end=len(text), source_uri=f"kb://{doc}", metadata=meta,
                embedding=np.asarray(v), model_name=encoder.name,
                model_revision=encoder.revision, model_backend=encoder.backend_tag,
                embedded_at=NOW, published_at=NOW)
            for (doc, (text, meta)), v in zip(docs.items(), vecs, strict=True)]
    pool = make_pool(cfg.database)
    try:
        Store(cfg, pool).apply(rows, [])
    finally:
        pool.close()


@contextmanager
def running(cfg: Config, encoder: Any) -> Iterator[str]:
    """The real service on a free port, in a thread; its base URL."""
    service = build_service(cfg, encoder=encoder)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        service.pool.close()


@pytest.fixture(scope="module")
def served(endpoints: Endpoints, encoder: Any) -> Iterator[Served]:
    """acme's and globex's chunks, a key each (and acme's admin key), the service running."""
    cfg = module_config(endpoints)
    migrate(cfg)
    write_corpus(cfg, encoder, "acme", ACME)
    write_corpus(cfg, encoder, "globex", GLOBEX)
    keys = {"acme": create_key(cfg, "acme").key, "globex": create_key(cfg, "globex").key,
            "acme-admin": create_key(cfg, "acme", admin=True).key}
    with running(cfg, encoder) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield Served(cfg, url, keys, client)


def ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [h["doc_id"] for h in response.json()["hits"]]


def test_a_key_searches_its_own_tenant_and_never_another(served: Served) -> None:
    """The tenant comes from the key: acme's key finds acme's rows only, globex's globex's,
    for every mode, even for words only the other tenant has."""
    for mode in ("vector", "keyword", "hybrid"):
        for key, own in (("acme", ACME), ("globex", GLOBEX)):
            for query in ("toner cartridges", "Globex rocket launch plan", "disk quota"):
                found = ids(served.search({"query": query, "mode": mode, "k": 10}, key))
                assert set(found) <= set(own), (mode, key, query, found)
    body = served.search({"query": "toner", "k": 3}).json()
    assert body["mode"] == "vector"
    assert body["strategy"]["kind"] == "exact"
    assert set(body["timings_ms"]) == {"encode", "search", "total"}
    top = body["hits"][0]
    assert top["doc_id"] == "toner" and top["version"] == 3 and top["source_uri"] == "kb://toner"
    assert top["metadata"]["kind"] == "howto" and 0 < top["score"] <= 1


def test_the_body_cannot_name_a_tenant(served: Served) -> None:
    """A tenant_id in a body is an unknown field: 400, never another tenant's rows."""
    refused = served.search({"query": "x", "tenant_id": "globex"})
    assert refused.status_code == 400
    assert "tenant_id" in refused.json()["error"]
    doc = served.post("/v1/documents", {"doc_id": "d", "content": "x", "tenant_id": "globex"})
    assert doc.status_code == 400


def test_no_key_a_wrong_key_and_a_revoked_key_get_401(served: Served) -> None:
    """Without Authorization, with an unknown key, and within key_cache_s of a revocation."""
    missing = served.client.post("/v1/search", json={"query": "x"})
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Bearer" in missing.json()["error"]
    wrong = served.client.post("/v1/search", json={"query": "x"},
                               headers={"Authorization": "Bearer vp_00000000_nope"})
    assert wrong.status_code == 401
    issued = create_key(served.cfg, "acme", label="to revoke")
    auth = {"Authorization": f"Bearer {issued.key}"}
    assert served.client.post("/v1/search", json={"query": "x"}, headers=auth).status_code == 200
    assert revoke_key(served.cfg, issued.key_id)
    time.sleep(served.cfg.serve.key_cache_s + 0.2)  # the documented revocation delay
    revoked = served.client.post("/v1/search", json={"query": "x"}, headers=auth)
    assert revoked.status_code == 401
    assert "revoked" in revoked.json()["error"]


def test_the_serve_role_reads_one_tenant_with_raw_sql(served: Served) -> None:
    """As the service's own role, by hand: one tenant's rows with vecpipe.tenant set, none
    without, no keys, no writes; and the service refuses to start as the owner."""
    cfg = served.cfg
    def q(text: str) -> sql.Composed:
        return sql.SQL(text).format(s=sql.Identifier(cfg.database.schema))

    with psycopg.connect(serve_database(cfg).url, autocommit=True) as conn:
        assert check_role(conn, cfg) == cfg.serve.role
        assert conn.execute(q("SELECT count(*) FROM {s}.chunks")).fetchone() == (0,)
        conn.execute("SET vecpipe.tenant = 'acme'")
        seen = conn.execute(q("SELECT DISTINCT tenant_id FROM {s}.chunks")).fetchall()
        assert seen == [("acme",)]
        assert conn.execute(q("SELECT count(*) FROM {s}.chunks WHERE tenant_id = 'globex'")
                            ).fetchone() == (0,)
        docs = conn.execute(q("SELECT DISTINCT tenant_id FROM {s}.documents")).fetchall()
        assert docs == [("acme",)]
        # The definer functions answer for the transaction's tenant only.
        addresses = conn.execute(q("SELECT count(*) FROM {s}.tenant_rows(100)")).fetchone()
        assert addresses == (len(ACME),)
        owner_name = conn.execute("SELECT tableowner FROM pg_tables WHERE schemaname = %s"
                                  " AND tablename = 'chunks'", (cfg.database.schema,)).fetchone()
        assert owner_name is not None
        for statement in (q("SELECT * FROM {s}.api_keys"), q("DELETE FROM {s}.chunks"),
                          q("UPDATE {s}.chunks SET content = ''"),
                          sql.SQL("SET ROLE {}").format(sql.Identifier(owner_name[0]))):
            with pytest.raises(psycopg.Error):
                conn.execute(statement)
    owner = with_section(cfg, "serve", database_url=cfg.database.url)
    with psycopg.connect(cfg.database.url) as conn, pytest.raises(ConfigError) as err:
        check_role(conn, owner)
    assert "serve.database_url" in str(err.value)


def test_hybrid_finds_the_exact_code_vector_misses_and_the_paraphrase_keyword_misses(
        served: Served) -> None:
    """Hybrid is the union that matters: an exact rare token and a paraphrase."""
    code = {"query": "ZX-9041-Q", "k": 2}
    assert ids(served.search({**code, "mode": "keyword"})) == ["ship"]
    assert "ship" not in ids(served.search({**code, "mode": "vector"}))
    assert ids(served.search({**code, "mode": "hybrid", "k": 1})) == ["ship"]
    paraphrase = {"query": "how do I swap the ink in the printer", "k": 2}
    assert ids(served.search({**paraphrase, "mode": "keyword"})) == []
    assert ids(served.search({**paraphrase, "mode": "vector"}))[0] == "toner"
    assert "toner" in ids(served.search({**paraphrase, "mode": "hybrid"}))


def test_filters_select_by_metadata_in_every_mode(served: Served) -> None:
    """The operators over HTTP, in vector, keyword and hybrid search alike."""
    cases = [
        ({"kind": "error", "year": {"$gte": 2023}}, {"err-4711", "err-4712"}),
        ({"tags": "storage", "year": {"$lt": 2024}}, {"err-4712", "err-5100"}),
        ({"tags": {"$in": ["hardware", "quota"]}}, {"toner", "err-4711"}),
        ({"$or": [{"kind": "report"}, {"lang": {"$exists": True}}]}, {"report", "vpn"}),
        ({"kind": {"$nin": ["error", "howto", "logistics"]}}, {"report"}),
        ({"$not": {"kind": "error"}, "year": {"$ne": 2020}},
         {"vpn", "report", "ship", "part1", "part2"}),
    ]
    for spec, expected in cases:
        assert set(ids(served.search({"query": "error", "k": 10, "filter": spec}))) == expected
    words = {"query": "quota", "k": 10, "filter": {"year": {"$gt": 2022}}}
    assert set(ids(served.search({**words, "mode": "keyword"}))) == {"err-4711", "err-4712"}
    assert set(ids(served.search({**words, "mode": "hybrid"}))) <= {
        "err-4711", "err-4712", "vpn", "report"}


def test_bad_requests_are_4xx_with_a_sentence_never_500(served: Served) -> None:
    """Bad JSON, bad fields, huge k, huge bodies, wrong vectors, bad filters."""
    auth = {"Authorization": f"Bearer {served.keys['acme']}",
            "Content-Type": "application/json"}
    cases: list[tuple[Any, int, str]] = [
        (b"{not json", 400, "not valid JSON"),
        ({"query": "x", "k": 0}, 400, "k:"),
        ({"query": "x", "k": 1001}, 400, "serve.max_k"),
        ({"query": "x", "mode": "semantic"}, 400, "mode:"),
        ({}, 400, "either query"),
        ({"vector": [0.1, 0.2]}, 400, "dimensions"),
        ({"vector": [0.1] * 384, "mode": "hybrid"}, 400, "give query"),
        ({"query": "x", "filter": {"year": {"$gt": [1]}}}, 400, "filter.year.$gt"),
        ({"query": "x", "filter": {"$bogus": 1}}, 400, "filter.$bogus"),
        ({"query": "x" * 10_000}, 400, "query:"),
    ]
    for body, status, words in cases:
        if isinstance(body, bytes):
            got = served.client.post("/v1/search", content=body, headers=auth)
        else:
            got = served.client.post("/v1/search", json=body, headers=auth)
        assert got.status_code == status, (body, got.text)
        assert words in got.json()["error"], (body, got.text)
    huge = served.client.post("/v1/search", content=b"[" + b"1," * 3_000_000 + b"1]",
                              headers=auth)
    assert huge.status_code == 413
    assert "serve.max_body_bytes" in huge.json()["error"]


def test_a_raw_vector_query_searches_the_same_rows(served: Served, encoder: Any) -> None:
    """``vector`` instead of ``query``: the caller's own encoding, same ranking."""
    vec = encoder.encode(["replace the toner"])[0]
    assert ids(served.search({"vector": [float(x) for x in vec], "k": 1})) == ["toner"]


def test_documents_are_published_written_and_reported_then_deleted(
        served: Served, encoder: Any) -> None:
    """POST publishes through the Publisher (tenant from the key), the real stages write it,
    GET reports the stored version as searchable; DELETE removes it, end to end."""
    cfg = served.cfg
    accepted = served.post("/v1/documents", [
        {"doc_id": "api-1", "content": "Pallets are stacked three high in aisle nine.",
         "version": 7, "metadata": {"kind": "note"}},
        {"doc_id": "api-2", "content": "Forklifts charge overnight in bay two.",
         "source_uri": "wms://2"}])
    assert accepted.status_code == 202, accepted.text
    got = accepted.json()["accepted"]
    assert [(a["doc_id"], a["chunks"]) for a in got] == [("api-1", 1), ("api-2", 1)]
    assert got[0]["version"] == 7 and got[1]["version"] > 10**15  # request time, in us
    records = read_topic(cfg, cfg.kafka.chunks_topic)
    assert {r.key() for r in records} == {b"acme/api-1", b"acme/api-2"}
    pending = served.client.get("/v1/documents/api-1",
                                headers={"Authorization": f"Bearer {served.keys['acme']}"})
    assert pending.status_code == 404
    run_stage("embed", cfg)
    run_stage("write", cfg)
    auth = {"Authorization": f"Bearer {served.keys['acme']}"}
    state = served.client.get("/v1/documents/api-1", headers=auth).json()
    assert state["version"] == 7 and state["searchable"] and state["chunks_stored"] == 1
    assert state["model"] == encoder.name and state["written_at"]
    assert served.client.get("/v1/documents/api-1", headers={
        "Authorization": f"Bearer {served.keys['globex']}"}).status_code == 404
    assert ids(served.search({"query": "where are pallets stacked", "k": 1})) == ["api-1"]
    deleted = served.client.delete("/v1/documents/api-1", headers=auth)
    assert deleted.status_code == 202
    run_stage("embed", cfg)  # deletes travel the chunks topic, then the embeddings topic
    run_stage("write", cfg)
    state = served.client.get("/v1/documents/api-1", headers=auth).json()
    assert state["deleted"] and not state["searchable"]
    assert "api-1" not in ids(served.search({"query": "where are pallets stacked", "k": 5}))


def test_erasing_the_tenant_needs_an_admin_key(served: Served) -> None:
    """DELETE /v1/tenant with a plain key is 403; the admin key may (not run here: the module
    shares acme's rows)."""
    plain = served.client.delete("/v1/tenant",
                                 headers={"Authorization": f"Bearer {served.keys['acme']}"})
    assert plain.status_code == 403
    assert "admin" in plain.json()["error"]


def test_probes_metrics_docs_and_page_work_offline(served: Served) -> None:
    """/healthz, /readyz (with the model it encodes), /metrics by route and mode, /docs with
    Swagger UI from the local wheel, and the search page."""
    c = served.client
    assert c.get("/healthz").json() == {"status": "ok"}
    ready = c.get("/readyz").json()
    assert ready["ready"] and ready["models"][0]["dimension"] == 384
    served.search({"query": "toner", "mode": "hybrid"})
    metrics = c.get("/metrics").text
    assert 'vecpipe_http_request_seconds_count{method="POST",mode="hybrid",route="/v1/search"}' \
        in metrics
    docs = c.get("/docs").text
    assert "/static/swagger/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert c.get("/static/swagger/swagger-ui-bundle.js").status_code == 200
    assert "/v1/search" in c.get("/openapi.json").json()["paths"]
    assert "<form id=\"search\"" in c.get("/").text


def test_concurrent_queries_share_encode_calls(served: Served) -> None:
    """Sixteen requests at once: all answered, in fewer encode calls than requests."""
    def batches() -> tuple[float, float]:
        lines = served.client.get("/metrics").text.splitlines()
        def value(name: str) -> float:
            return float(next(ln.split()[-1] for ln in lines if ln.startswith(name)))
        return (value("vecpipe_serve_encode_batch_size_count"),
                value("vecpipe_serve_encode_batch_size_sum"))

    calls0, texts0 = batches()

    async def burst() -> list[int]:
        auth = {"Authorization": f"Bearer {served.keys['acme']}"}
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            replies = await asyncio.gather(*(
                client.post("/v1/search", json={"query": f"disk quota {i}"}, headers=auth)
                for i in range(16)))
        return [r.status_code for r in replies]

    assert asyncio.run(burst()) == [200] * 16
    calls, texts = batches()
    assert texts - texts0 == 16
    assert calls - calls0 < 16


def test_over_the_rate_a_key_gets_429_with_retry_after(endpoints: Endpoints,
                                                       encoder: Any) -> None:
    """A key over serve.rate_per_s (its burst spent) is told when to come back."""
    cfg = module_config(endpoints, rate_per_s=0.5, rate_burst=2)
    migrate(cfg)
    key = create_key(cfg, "acme").key
    with running(cfg, encoder) as url, httpx.Client(base_url=url) as client:
        auth = {"Authorization": f"Bearer {key}"}
        codes = [client.post("/v1/search", json={"query": "x", "mode": "keyword"},
                             headers=auth) for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert int(codes[2].headers["Retry-After"]) >= 1
    assert "rate" in codes[2].json()["error"]
