"""The serve pieces that need no services: rate limit, key cache, batching, fusion, body limit."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import numpy.typing as npt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from vecpipe.db.search import Hit, fuse
from workers.serve.batcher import EncodeBatcher
from workers.serve.limits import BodyLimit, RateLimiter, TTLCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_limit_allows_a_burst_then_the_rate_and_says_how_long_to_wait() -> None:
    """burst requests at once, then one per 1/rate seconds; a refusal carries its wait."""
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take("k")
    assert wait == 0.5
    assert RateLimiter.retry_after(wait) == "1"
    assert limiter.take("other") == 0.0  # per key
    clock.now += 0.5
    assert limiter.take("k") == 0.0
    assert limiter.take("k") > 0


def test_a_zero_rate_is_no_limit() -> None:
    """rate_per_s = 0 turns the limit off."""
    limiter = RateLimiter(rate=0.0, burst=1)
    assert all(limiter.take("k") == 0.0 for _ in range(100))


def test_the_key_cache_forgets_after_its_ttl_so_a_revocation_takes_effect() -> None:
    """A cached principal (or a cached 'no such key') is trusted for ttl_s, then looked up."""
    clock = Clock()
    cache: TTLCache[str] = TTLCache(5.0, clock=clock)
    assert cache.get("h") == (False, None)
    cache.put("h", "acme")
    cache.put("bad", None)
    assert cache.get("h") == (True, "acme")
    assert cache.get("bad") == (True, None)
    clock.now += 5.0
    assert cache.get("h") == (False, None)


def test_concurrent_queries_are_encoded_in_one_call() -> None:
    """Texts queued while an encode runs go into the next call together, in order."""
    calls: list[list[str]] = []

    def encode(texts: list[str]) -> npt.NDArray[np.float32]:
        calls.append(list(texts))
        return np.array([[float(len(t))] for t in texts], dtype=np.float32)

    async def main() -> list[float]:
        batcher = EncodeBatcher(encode, max_batch=8, wait_s=0.05)
        batcher.start()
        try:
            vectors = await asyncio.gather(*(batcher.encode("x" * n) for n in range(1, 11)))
        finally:
            await batcher.stop()
        return [float(v[0]) for v in vectors]

    assert asyncio.run(main()) == [float(n) for n in range(1, 11)]
    assert len(calls) < 10
    assert max(len(c) for c in calls) == 8


def test_an_encode_failure_reaches_every_request_of_its_batch() -> None:
    """The model raising fails the batch's requests, not the batcher."""
    def encode(texts: list[str]) -> npt.NDArray[np.float32]:
        raise RuntimeError("model broke")

    async def main() -> list[Any]:
        batcher = EncodeBatcher(encode, max_batch=4, wait_s=0.01)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.encode("q") for _ in range(3)),
                                        return_exceptions=True)
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in results)


def _hit(doc: str, distance: float | None) -> Hit:
    return Hit("t", doc, 0, distance, "", "", {}, 1)


def test_reciprocal_rank_fusion_rewards_agreement_and_keeps_single_list_hits() -> None:
    """A hit in both lists beats one that tops only one; a keyword-only hit still appears."""
    near = [_hit("a", 0.1), _hit("b", 0.2), _hit("c", 0.3)]
    matched = [_hit("x", None), _hit("b", None)]
    fused = fuse(near, matched, 4)
    assert [h.doc_id for h in fused] == ["b", "a", "x", "c"]
    assert fused[0].distance == 0.2  # the vector list's distance is kept
    assert fused[0].score == 1 / 62 + 1 / 62


def test_a_body_over_the_limit_is_413_declared_or_chunked() -> None:
    """Content-Length over the limit, or more bytes than it arriving, is refused with a
    sentence; a body under it reaches the handler whole."""
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"size": len(await request.body())})

    app = BodyLimit(Starlette(routes=[Route("/", echo, methods=["POST"])]), max_bytes=100)
    with TestClient(app) as client:
        assert client.post("/", content=b"x" * 100).json() == {"size": 100}
        refused = client.post("/", content=b"x" * 101)
        assert refused.status_code == 413
        assert "serve.max_body_bytes" in refused.json()["error"]
        chunked = client.post("/", content=iter([b"x" * 60, b"x" * 60]))
        assert chunked.status_code == 413
