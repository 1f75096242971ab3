"""Prometheus metrics and the liveness/readiness endpoints every worker serves on one port.

``/metrics`` is the Prometheus exposition; ``/healthz`` answers 200 while the consumer loop keeps
beating and the batch under way keeps making progress (a stalled loop, or a batch stuck in one
call, turns it 503 so Kubernetes restarts the pod and its partitions go to another member);
``/readyz`` answers 200 once the worker is connected and has partitions assigned.

Every series a dashboard panel or an alert reads exists from the start, at zero where it counts:
a panel then shows 0 and an alert sees 0, never "no data".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["OUTCOMES", "Health", "Metrics", "serve"]

# The outcomes a stage counts its consumed messages by (vecpipe.stages.settle).
OUTCOMES = ("ok", "dead_letter", "dropped")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The metrics of one worker process, in a registry of its own."""

    def __init__(self, stage: str) -> None:
        self.registry = CollectorRegistry()
        r, s = self.registry, stage
        self.messages = Counter(
            "vecpipe_messages_total", "Messages consumed, by outcome.", ["stage", "outcome"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "vecpipe_batch_seconds", "Time to process one batch end to end.", ["stage"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "vecpipe_batch_size", "Messages per batch.", ["stage"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048), registry=r,
        )
        self.encode_seconds = Histogram(
            "vecpipe_encode_seconds", "Model inference time per batch.", ["stage"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.retries = Counter(
            "vecpipe_retries_total", "Transient failures retried, by kind.", ["stage", "kind"],
            registry=r,
        )
        self.dead_letters = Counter(
            "vecpipe_dead_letters_total", "Records sent to the dead-letter topic.", ["stage"],
            registry=r,
        )
        self.skipped = Counter(
            "vecpipe_unchanged_total", "Chunks whose vector was reused, without inference.",
            ["stage"], registry=r,
        )
        self.rows = Counter(
            "vecpipe_rows_total", "Database rows by merge action.", ["stage", "action"],
            registry=r,
        )
        self.lag = Gauge(
            "vecpipe_consumer_lag", "Messages behind the partition's high watermark.",
            ["stage", "topic", "partition"], registry=r,
        )
        self.queue_depth = Gauge(
            "vecpipe_queue_depth", "Messages held in memory (batch under way plus buffered).",
            ["stage"], registry=r,
        )
        self.last_progress = Gauge(
            "vecpipe_last_progress_timestamp_seconds",
            "Unix time the worker last made progress (a loop turn while idle, else a step of "
            "the batch under way).", ["stage"], registry=r,
        )
        self.index_valid = Gauge(
            "vecpipe_index_valid", "1 while the index is valid and ready, 0 when not.",
            ["stage", "index"], registry=r,
        )
        self.dead_letter_depth = Gauge(
            "vecpipe_dead_letter_depth",
            "Records retained on the stage's dead-letter topic (replayed ones too, until the "
            "topic's retention drops them).",
            ["stage", "topic"], registry=r,
        )
        self.stage = s
        for outcome in OUTCOMES:
            self.messages.labels(s, outcome)
        for series in (self.batch_seconds, self.batch_size, self.dead_letters, self.skipped,
                       self.queue_depth):
            series.labels(s)
        self.last_progress.labels(s).set_to_current_time()

    def preset(self, *, retry_kinds: Iterable[str] = (), row_actions: Iterable[str] = (),
               encodes: bool = False) -> None:
        """Create the stage's own label sets at zero: its retry kinds, row actions, encoding."""
        for kind in retry_kinds:
            self.retries.labels(self.stage, kind)
        for action in row_actions:
            self.rows.labels(self.stage, action)
        if encodes:
            self.encode_seconds.labels(self.stage)

    def progressed(self) -> None:
        """The worker made progress now."""
        self.last_progress.labels(self.stage).set_to_current_time()

    def count(self, outcome: str, n: int = 1) -> None:
        """Count ``n`` consumed messages with ``outcome`` (ok, dead_letter, dropped...)."""
        if n:
            self.messages.labels(self.stage, outcome).inc(n)


class Health:
    """Liveness and readiness as the consumer loop reports them.

    With ``metrics``, progress also moves ``vecpipe_last_progress_timestamp_seconds``, under
    the rule that liveness applies: while a batch is under way only its steps count, so a batch
    stuck in one call stops the clock even though the loop keeps turning.
    """

    def __init__(self, stall_after_s: float, metrics: Metrics | None = None) -> None:
        self.stall_after_s = stall_after_s
        self._metrics = metrics
        self._beat = time.monotonic()
        self._batch_progress: float | None = None
        self._ready = False
        self._lock = threading.Lock()

    def beat(self) -> None:
        """The loop is alive: called on every turn of the poll loop."""
        with self._lock:
            self._beat = time.monotonic()
            idle = self._batch_progress is None
        if idle and self._metrics is not None:
            self._metrics.progressed()

    def batch_progress(self) -> None:
        """The batch under way did a step (called from the batch thread)."""
        with self._lock:
            self._batch_progress = time.monotonic()
        if self._metrics is not None:
            self._metrics.progressed()

    def batch_done(self) -> None:
        """No batch is under way any more."""
        with self._lock:
            self._batch_progress = None

    def set_ready(self, ready: bool) -> None:
        """Connected and assigned (True), or not (False)."""
        with self._lock:
            self._ready = ready

    def _live(self) -> bool:
        now = time.monotonic()
        stuck = (self._batch_progress is not None
                 and now - self._batch_progress >= self.stall_after_s)
        return now - self._beat < self.stall_after_s and not stuck

    @property
    def live(self) -> bool:
        """False once the loop has not beaten, or the batch under way has made no progress, for
        ``stall_after_s``."""
        with self._lock:
            return self._live()

    @property
    def ready(self) -> bool:
        """True while the worker is live, connected and owns partitions."""
        with self._lock:
            return self._ready and self._live()


def serve(port: int, metrics: Metrics, health: Health) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz and /readyz on ``port`` from a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                ok = health.live
                self._send(200 if ok else 503, b"ok\n" if ok else b"stalled\n")
            elif self.path == "/readyz":
                ok = health.ready
                self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # probes every few seconds would drown the worker's own events

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, name="vecpipe-http", daemon=True).start()
    return server
