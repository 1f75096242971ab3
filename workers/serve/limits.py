"""Limits of one replica: a token-bucket rate limit per key, a short cache of resolved keys, and
the request body's size.

Both live in the process: with N replicas a key may make N times ``rate_per_s`` requests per
second in all (the README says so), and a revoked key keeps working on a replica for at most
``key_cache_s`` seconds after its revocation.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimit", "RateLimiter", "TTLCache"]

T = TypeVar("T")
Clock = Callable[[], float]


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """A token bucket per key: ``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic,
                 max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0.0 when the request may go ahead, else the seconds until it could."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= self._max_keys:
                    self._buckets.clear()  # forget the idle; a full bucket each is generous
                bucket = self._buckets[key] = _Bucket(float(self.burst), now)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate

    @staticmethod
    def retry_after(wait_s: float) -> str:
        """The Retry-After header for a wait: whole seconds, at least 1."""
        return str(max(1, math.ceil(wait_s)))


class TTLCache(Generic[T]):
    """Values trusted for ``ttl_s`` seconds; ``None`` (an unknown key) is cached too, briefly,
    so that a client retrying a bad key does not reach the database each time."""

    def __init__(self, ttl_s: float, clock: Clock = time.monotonic,
                 max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._max = max_entries
        self._entries: dict[str, tuple[float, T | None]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[bool, T | None]:
        """(found, value): found is False when the key must be looked up."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] <= self._clock():
                return False, None
            return True, entry[1]

    def put(self, key: str, value: T | None) -> None:
        """Remember ``value`` for ``key`` for the cache's time to live."""
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._entries) >= self._max:
                now = self._clock()
                self._entries = {k: e for k, e in self._entries.items() if e[0] > now}
                if len(self._entries) >= self._max:
                    self._entries.clear()
            self._entries[key] = (self._clock() + self.ttl_s, value)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 before any handler
    reads it, whether its length is declared or it arrives in chunks."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; the app sees an empty body and the disconnect
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        payload = json.dumps({"error": f"the body is larger than {self.max_bytes} bytes "
                              "(serve.max_body_bytes)."}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
