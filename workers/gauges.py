"""Gauges read from outside the worker (the broker, the catalog), refreshed off the batch path.

A refresher thread sets ``vecpipe_dead_letter_depth`` (records waiting on the stage's
dead-letter topic) and, for the writer, ``vecpipe_index_valid`` (every index on the schema's
tables) once at start and then every ``REFRESH_S``. A failed read is logged and tried again next
time; it never stops the worker, and the gauge keeps its last value meanwhile.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from vecpipe.config import Config, DatabaseConfig, KafkaConfig
from vecpipe.db.indexes import schema_index_validity
from vecpipe.db.pool import connect
from vecpipe.db.store import MergeStats
from vecpipe.health import Metrics
from vecpipe.kafka.admin import topic_depth

__all__ = ["REFRESH_S", "GaugeRefresher", "dead_letter_depth", "index_validity", "preset",
           "refresher_for"]

REFRESH_S = 30.0

# The label sets each stage can produce, created at zero when the worker starts.
_RETRY_KINDS = {"embed": ("produce", "model", "oom_split", "error_split"),
                "write": ("produce", "database")}
_ROW_ACTIONS: dict[str, tuple[str, ...]] = {"write": MergeStats.ACTIONS}

Job = Callable[[], None]


def preset(metrics: Metrics) -> None:
    """Create the stage's retry kinds, row actions and encode latency at zero."""
    stage = metrics.stage
    metrics.preset(retry_kinds=_RETRY_KINDS.get(stage, ()), row_actions=_ROW_ACTIONS.get(stage, ()),
                   encodes=stage == "embed")


def dead_letter_depth(metrics: Metrics, kafka: KafkaConfig, source_topic: str,
                      depth: Callable[[KafkaConfig, str], int] = topic_depth) -> Job:
    """A job that sets the depth of ``source_topic``'s dead-letter topic."""
    dlq = kafka.dlq_topic(source_topic)
    gauge = metrics.dead_letter_depth.labels(metrics.stage, dlq)

    def refresh() -> None:
        gauge.set(depth(kafka, dlq))

    return refresh


def _read_validity(db: DatabaseConfig) -> dict[str, bool]:
    with connect(db, vector_types=False, autocommit=True) as conn:
        return schema_index_validity(conn, db.schema)


def index_validity(metrics: Metrics, db: DatabaseConfig,
                   read: Callable[[DatabaseConfig], dict[str, bool]] = _read_validity) -> Job:
    """A job that sets 1 or 0 for every index of the schema and removes the dropped ones."""
    shown: set[str] = set()

    def refresh() -> None:
        valid = read(db)
        for name in shown - valid.keys():
            metrics.index_valid.remove(metrics.stage, name)
        for name, ok in valid.items():
            metrics.index_valid.labels(metrics.stage, name).set(1 if ok else 0)
        shown.clear()
        shown.update(valid)

    return refresh


class GaugeRefresher:
    """Runs its jobs now and then every ``interval_s`` on a daemon thread until stopped."""

    def __init__(self, jobs: Mapping[str, Job], log: Any,
                 interval_s: float | None = None) -> None:
        self.jobs = dict(jobs)
        self.log = log
        self.interval_s = REFRESH_S if interval_s is None else interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> None:
        """Run every job once; a failure is logged and left for the next turn."""
        for name, job in self.jobs.items():
            try:
                job()
            except Exception as exc:
                self.log.warning("gauge_refresh_failed", gauge=name, error=str(exc),
                                 retry_in_s=self.interval_s)

    def start(self) -> None:
        """Start refreshing in the background."""
        def loop() -> None:
            while True:
                self.refresh()
                if self._stop.wait(self.interval_s):
                    return

        self._thread = threading.Thread(target=loop, name="vecpipe-gauges", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop refreshing; a read under way is left to finish on its daemon thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


def refresher_for(cfg: Config, metrics: Metrics, log: Any) -> GaugeRefresher:
    """The refresher of the embed or the write stage (``metrics.stage``)."""
    k = cfg.kafka
    if metrics.stage == "embed":
        jobs = {"vecpipe_dead_letter_depth": dead_letter_depth(metrics, k, k.chunks_topic)}
    else:
        jobs = {"vecpipe_dead_letter_depth": dead_letter_depth(metrics, k, k.embeddings_topic),
                "vecpipe_index_valid": index_validity(metrics, cfg.database)}
    return GaugeRefresher(jobs, log)
