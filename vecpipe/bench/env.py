"""What every benchmark stands on: services, a throwaway namespace, workers, clocks and probes.

- :func:`bench_services` uses the configured Kafka and PostgreSQL when they answer, else starts
  local ones (``vecpipe.devservices``) in a temporary home on free ports and removes them after.
- :func:`fresh_namespace` gives a run its own topics, consumer groups and schema, and deletes
  them afterwards: a benchmark never reads or writes real data.
- :class:`StageRunner` runs the real worker (``workers.run.run_embed`` / ``run_write``) in a
  thread, with its metrics port on, so readiness comes from ``/readyz`` and the per-stage
  breakdown from ``/metrics``.
- :class:`HeldBack` writes input inside an open Kafka transaction. The records are on the
  broker, but read_committed consumers (librdkafka's default, so every vecpipe worker) see none
  of them until :meth:`HeldBack.release` commits: a stage's clock then starts at a known instant
  with its whole input waiting, and neither model load nor consumer-group join is counted.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)
from psycopg import sql

from vecpipe import devservices as services
from vecpipe.config import Config, redact_url, validate
from vecpipe.db.pool import check_database, connect
from vecpipe.errors import BenchError, ServiceError, Unreachable
from vecpipe.kafka.admin import admin_client, check_broker, pipeline_topics
from vecpipe.kafka.consumer import StopFlag
from vecpipe.kafka.settings import producer_config
from workers.run import run_embed, run_write

__all__ = [
    "HeldBack",
    "Progress",
    "StageRunner",
    "TopicCounter",
    "bench_services",
    "free_port",
    "fresh_namespace",
    "machine_info",
    "poll_until",
]


class Progress:
    """Progress lines on stderr, stamped with the seconds since the benchmark started."""

    def __init__(self, name: str, quiet: bool = False) -> None:
        self.name = name
        self.quiet = quiet
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        """Print one line (unless quiet)."""
        if not self.quiet:
            elapsed = time.perf_counter() - self.started
            print(f"[bench {self.name} {elapsed:7.1f}s] {message}", file=sys.stderr, flush=True)

    @property
    def elapsed(self) -> float:
        """Seconds since the benchmark started."""
        return time.perf_counter() - self.started


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info(*, torch_threads: bool) -> dict[str, Any]:
    """CPU count and model, load average, Python and (when the model is used) torch threads."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "load_avg_start": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_threads": None,
    }
    if torch_threads:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["torch"] = torch.__version__
    return info


def database_info(cfg: Config) -> dict[str, Any]:
    """PostgreSQL and pgvector versions of the database the run uses."""
    with connect(cfg.database, vector_types=False, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        # Installed version, else the one CREATE EXTENSION would install.
        ext = conn.execute(
            "SELECT coalesce((SELECT extversion FROM pg_extension WHERE extname = 'vector'),"
            " (SELECT default_version FROM pg_available_extensions WHERE name = 'vector'))"
        ).fetchone()
    return {"postgres_version": version[0] if version else None,
            "pgvector_version": ext[0] if ext else None}


# -- services -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServicesUsed:
    """Which services a run used, for the report."""
    bootstrap: str
    database_url: str
    source: str  # "configured" or "local" (started for this run and removed after)

    def report(self) -> dict[str, str]:
        """Addresses (password masked) and source."""
        return {"kafka": self.bootstrap, "postgres": redact_url(self.database_url),
                "source": self.source}


def _reachable(cfg: Config) -> str | None:
    """None when both services answer, else the reason why not."""
    try:
        check_broker(cfg.kafka, timeout=5.0)
        check_database(cfg.database)
    except Unreachable as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def bench_services(cfg: Config, progress: Progress) -> Iterator[tuple[Config, ServicesUsed]]:
    """The configured services if they answer, else local ones started for the run only."""
    reason = _reachable(cfg)
    if reason is None:
        progress(f"using the configured services: Kafka {cfg.kafka.bootstrap}")
        yield cfg, ServicesUsed(cfg.kafka.bootstrap, cfg.database.url, "configured")
        return

    progress(f"configured services unavailable ({reason.split(';')[0]}); starting local ones")
    home = Path(tempfile.mkdtemp(prefix="vecpipe-bench-"))
    try:
        info = None
        for attempt in (1, 2):
            try:
                info = services.up(home, kafka_port=free_port(), postgres_port=free_port(),
                                   progress=progress)
                break
            except ServiceError as exc:
                # A free port can be taken between choosing it and binding it: once more.
                services.down(home, purge=True)
                if attempt == 2:
                    raise BenchError(f"Could not start local services: {exc}") from None
                progress(f"local services failed to start ({exc}); retrying")
        assert info is not None
        local = replace(cfg, kafka=replace(cfg.kafka, bootstrap=info.bootstrap),
                        database=replace(cfg.database, url=info.database_url))
        yield local, ServicesUsed(info.bootstrap, info.database_url, "local")
    finally:
        progress("stopping the local services")
        services.down(home, purge=True)
        shutil.rmtree(home, ignore_errors=True)


# -- namespace ------------------------------------------------------------------------------------

def namespaced(cfg: Config, name: str) -> Config:
    """``cfg`` on topics, consumer groups and a schema of its own, named after ``name``."""
    return validate(replace(
        cfg,
        kafka=replace(cfg.kafka, chunks_topic=f"{name}.chunks",
                      embeddings_topic=f"{name}.embeddings", embed_group=f"{name}-embed",
                      write_group=f"{name}-write"),
        database=replace(cfg.database, schema=name),
        ops=replace(cfg.ops, log_level="warning", worker_id=f"{name}-worker"),
    ))


def drop_namespace(cfg: Config) -> None:
    """Delete the run's schema, topics and consumer groups; failures are ignored."""
    with contextlib.suppress(Exception), connect(
            cfg.database, vector_types=False, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
            sql.Identifier(cfg.database.schema)))
    with contextlib.suppress(Exception):
        admin = admin_client(cfg.kafka)
        for fut in admin.delete_topics(pipeline_topics(cfg.kafka),
                                       operation_timeout=30).values():
            with contextlib.suppress(Exception):
                fut.result(30)
        groups = [cfg.kafka.embed_group, cfg.kafka.write_group]
        for fut in admin.delete_consumer_groups(groups, request_timeout=30).values():
            with contextlib.suppress(Exception):
                fut.result(30)


@contextlib.contextmanager
def fresh_namespace(cfg: Config, progress: Progress, suffix: str = "") -> Iterator[Config]:
    """A unique namespace for one run (``bench_<hex>``), removed when the block ends."""
    name = f"bench_{uuid.uuid4().hex[:10]}{suffix}"
    ns = namespaced(cfg, name)
    progress(f"namespace {name}: topics {name}.*, schema {name}")
    try:
        yield ns
    finally:
        drop_namespace(ns)


# -- workers --------------------------------------------------------------------------------------

class StageRunner:
    """One real worker stage running in a thread until :meth:`close`."""

    def __init__(self, stage: str, cfg: Config, encoder: Any | None = None) -> None:
        if stage not in ("embed", "write"):
            raise ValueError(f"unknown stage {stage!r}")
        self.stage = stage
        self.port = free_port()
        self.cfg = replace(cfg, ops=replace(cfg.ops, metrics_port=self.port))
        self.encoder = encoder

        self.stop = StopFlag()
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"bench-{stage}", daemon=True)

    def _main(self) -> None:

        try:
            if self.stage == "embed":
                self.exit_code = run_embed(self.cfg, stop=self.stop, encoder=self.encoder)
            else:
                self.exit_code = run_write(self.cfg, stop=self.stop)
        except BaseException as exc:
            self.error = exc

    def _get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), ""
        except OSError:
            return 0, ""

    def check_alive(self) -> None:
        """Raise :class:`BenchError` if the worker has stopped."""
        if not self._thread.is_alive():
            why = repr(self.error) if self.error is not None else f"exit code {self.exit_code}"
            raise BenchError(f"the {self.stage} worker stopped during the benchmark ({why}); "
                             "its log lines are above.")

    def start(self, timeout: float = 180.0) -> StageRunner:
        """Start the worker and return once it owns its partitions (``/readyz`` answers 200)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if self._get("/readyz")[0] == 200:
                return self
            time.sleep(0.05)
        raise BenchError(f"the {self.stage} worker was not ready within {timeout:.0f} s.")

    def metrics(self) -> dict[str, float]:
        """The worker's Prometheus samples as ``name{label=value,...}`` -> value (stage omitted)."""
        from prometheus_client.parser import text_string_to_metric_families

        code, text = self._get("/metrics")
        out: dict[str, float] = {}
        if code != 200:
            return out
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())
                                  if k != "stage")
                out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
        return out

    def close(self) -> None:
        """Stop the worker and wait for it to drain."""
        self.stop.set()
        self._thread.join(self.cfg.ops.shutdown_grace_s + 60)


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """One sample of :meth:`StageRunner.metrics`, 0 when absent."""
    key = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return samples.get(f"{name}{{{key}}}" if key else name, 0.0)


# -- input and output -----------------------------------------------------------------------------

class HeldBack:
    """Records written to Kafka inside a transaction, invisible to the workers until released."""

    def __init__(self, cfg: Config) -> None:
        self._producer = Producer(producer_config(cfg.kafka, **{
            "transactional.id": f"vecpipe-bench-{uuid.uuid4().hex}",
            # The records wait for the worker to be ready: far longer than the 60 s default.
            "transaction.timeout.ms": 600_000,
        }))
        try:
            self._producer.init_transactions(60)
        except Exception as exc:
            raise BenchError(
                f"The broker at {cfg.kafka.bootstrap} refused a transactional producer ({exc}); "
                "the benchmarks hold their input back in a Kafka transaction, so they need a "
                "broker that allows transactions (transaction.state.log.* settings, ACLs)."
            ) from None
        self._producer.begin_transaction()
        self._errors: list[KafkaError] = []
        # partition -> (offset, tag) of its last record: a stage that keeps each partition's
        # order is done once the last record of every partition is.
        self.last: dict[int, tuple[int, Any]] = {}
        self.count = 0

    def _on_delivery(self, tag: Any) -> Callable[[KafkaError | None, Message], None]:
        def delivered(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                self._errors.append(err)
                return
            part, offset = msg.partition() or 0, msg.offset() or 0
            if part not in self.last or offset > self.last[part][0]:
                self.last[part] = (offset, tag)

        return delivered

    def produce(self, topic: str, value: bytes, key: bytes,
                headers: Sequence[tuple[str, bytes]], tag: Any = None) -> None:
        """Queue one record of the transaction; ``tag`` is remembered if it ends a partition."""
        wire: list[tuple[str, str | bytes | None]] = list(headers)
        while True:
            try:
                self._producer.produce(topic, value, key=key, headers=wire,
                                       on_delivery=self._on_delivery(tag))
                break
            except BufferError:
                self._producer.poll(0.2)
        self._producer.poll(0)
        self.count += 1

    def flush(self) -> None:
        """Wait until the broker stored every record (still uncommitted)."""
        self._producer.flush(120)
        if self._errors:
            raise BenchError(f"The broker refused {len(self._errors)} benchmark record(s), "
                             f"first: {self._errors[0].str()}.")

    def release(self) -> float:
        """Commit: every record becomes visible at once. Returns the clock just before."""
        self.flush()
        started = time.perf_counter()
        self._producer.commit_transaction(60)
        return started


class TopicCounter:
    """Counts the records arriving on a topic, from a thread, and notes when ``target`` came."""

    def __init__(self, cfg: Config, topic: str, target: int) -> None:
        self.target = target
        self.count = 0
        self.reached_at: float | None = None
        self._stop = threading.Event()
        self._consumer = Consumer({
            **cfg.kafka.client,
            "bootstrap.servers": cfg.kafka.bootstrap,
            "group.id": f"vecpipe-bench-observer-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        })
        meta = self._consumer.list_topics(topic, timeout=30).topics[topic]
        # assign, not subscribe: no group join, so counting starts at once.
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)
                               for p in meta.partitions])
        self._thread = threading.Thread(target=self._main, name="bench-counter", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            while not self._stop.is_set():
                for m in self._consumer.consume(1000, 0.01):
                    if m.error() is None:
                        self.count += 1
                if self.reached_at is None and self.count >= self.target:
                    self.reached_at = time.perf_counter()
        finally:
            self._consumer.close()

    def close(self) -> None:
        """Stop counting."""
        self._stop.set()
        self._thread.join(10)


def poll_until(
    current: Callable[[], int], expected: int, *, timeout: float, progress: Progress,
    what: str, interval: float = 0.02, check: Callable[[], None] | None = None,
) -> float:
    """Call ``current()`` every ``interval`` s until it reaches ``expected``; return that clock.

    ``check`` runs on every turn and may raise (a worker that died). Progress shows every 10 s.
    """
    deadline = time.perf_counter() + timeout
    shown = time.perf_counter()
    value = 0
    while True:
        value = current()
        # The clock after the probe answered: detection latency counts against the pipeline.
        now = time.perf_counter()
        if value >= expected:
            return now
        if check is not None:
            check()
        if now > deadline:
            raise BenchError(f"only {value} of {expected} {what} after {timeout:.0f} s.")
        if now - shown >= 10:
            progress(f"  {value}/{expected} {what}")
            shown = now
        time.sleep(interval)
