"""Fault injection for the integration tests: workers to kill, services to restart, read-backs.

Everything here acts on the real broker, database and worker processes; nothing is mocked.
``tests/integration/test_faults.py`` composes these into the reliability suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from confluent_kafka import Consumer, KafkaException, TopicPartition

from producers.publisher import Publisher
from tests.helpers import connect, env_for
from vecpipe.kafka.admin import offsets_committed
from vecpipe.kafka.consumer import StopFlag
from vecpipe.messages import Chunk, Document, content_hash

__all__ = [
    "FAST_GROUP_CLIENT",
    "FAST_GROUP_ENV",
    "Corpus",
    "FaultLog",
    "LockedEncoder",
    "ThreadWorker",
    "WorkerExited",
    "WorkerProcess",
    "committed_lag",
    "line_chunker",
    "native_home",
    "restart_kafka",
    "restart_postgres",
    "stored_documents",
    "stored_rows",
    "topic_count",
    "wait_until",
]

# A consumer killed with SIGKILL never leaves its group: the coordinator waits for its session to
# time out before the partitions move on. 6 s (the broker's minimum) instead of 45 s keeps each
# restart short; production keeps its own settings.
FAST_GROUP_CLIENT = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}
FAST_GROUP_ENV = {"VECPIPE_KAFKA__SESSION_TIMEOUT_MS": "6000",
                  "VECPIPE_KAFKA__HEARTBEAT_INTERVAL_MS": "1000"}

RowKey = tuple[str, str, int, int, str]  # tenant, doc, chunk index, version, content hash
DocState = tuple[int, int, bool]  # version, chunk count, deleted


# -- corpus ------------------------------------------------------------------------------------

def line_chunker(doc: Document) -> list[Chunk]:
    """One chunk per line: short texts, fast to embed, with chunk boundaries the test controls
    (an empty document has none)."""
    if not doc.content:
        return []
    lines = doc.content.split("\n")
    out: list[Chunk] = []
    pos = 0
    for i, line in enumerate(lines):
        out.append(Chunk(doc.tenant_id, doc.doc_id, doc.version, i, len(lines), line,
                         content_hash(line), pos, pos + len(line), doc.source_uri,
                         dict(doc.metadata)))
        pos += len(line) + 1
    return out


@dataclass
class Corpus:
    """A publish plan (documents, newer versions with fewer chunks, deletes) and its outcome.

    ``expected_rows`` and ``expected_documents`` model what the store must hold after every
    action was applied once, in order: newest version wins, stale chunks go, deletes stay.
    """

    actions: list[Document | tuple[str, str]] = field(default_factory=list)

    @classmethod
    def build(cls, tenants: int, docs: int, chunks: int, updates: int, deletes: int) -> Corpus:
        """``tenants * docs`` documents of ``chunks`` lines; then ``updates`` of them get a
        version 2 with fewer, different lines, and ``deletes`` others are deleted."""
        corpus = cls()
        names = [(f"tenant{t}", f"doc{d:05d}") for d in range(docs) for t in range(tenants)]
        for tenant, doc in names:
            text = "\n".join(f"{tenant} {doc} line {i} first" for i in range(chunks))
            corpus.actions.append(Document(tenant, doc, text, version=1,
                                           metadata={"wave": 1}))
        fewer = max(1, chunks - 2)
        for tenant, doc in names[:updates]:
            text = "\n".join(f"{tenant} {doc} line {i} second" for i in range(fewer))
            corpus.actions.append(Document(tenant, doc, text, version=2,
                                           metadata={"wave": 2}))
        corpus.actions.extend(names[updates:updates + deletes])
        return corpus

    @property
    def chunk_messages(self) -> int:
        """Messages the plan publishes on the chunks topic (chunks and deletes)."""
        return sum(len(line_chunker(a)) if isinstance(a, Document) else 1 for a in self.actions)

    def _state(self) -> dict[tuple[str, str], tuple[DocState, dict[int, tuple[int, str]]]]:
        state: dict[tuple[str, str], tuple[DocState, dict[int, tuple[int, str]]]] = {}
        for action in self.actions:
            if isinstance(action, Document):
                key = (action.tenant_id, action.doc_id)
                old = state.get(key, ((0, 0, False), {}))[1]
                rows: dict[int, tuple[int, str]] = {}
                for c in line_chunker(action):
                    prev = old.get(c.chunk_index)
                    # A chunk keeps the version that last changed its content.
                    same = prev is not None and prev[1] == c.content_hash
                    rows[c.chunk_index] = (prev[0] if same and prev else c.version,
                                           c.content_hash)
                state[key] = ((action.version, len(rows), False), rows)
            else:
                (version, _, _), _rows = state[action]
                # A deleted document's chunk count means nothing: compared as 0.
                state[action] = ((version, 0, True), {})
        return state

    def expected_rows(self) -> set[RowKey]:
        """(tenant, doc, chunk index, version, content hash) of every chunk that must be stored."""
        return {(t, d, i, v, h) for (t, d), (_, rows) in self._state().items()
                for i, (v, h) in rows.items()}

    def expected_documents(self) -> dict[tuple[str, str], DocState]:
        """(tenant, doc) -> (version, chunk count, deleted) of the documents table."""
        return {key: doc for key, (doc, _) in self._state().items()}

    def texts(self) -> dict[tuple[str, str, int], str]:
        """The text each stored chunk must have."""
        out: dict[tuple[str, str, int], str] = {}
        for action in self.actions:
            if isinstance(action, Document):
                for c in line_chunker(action):
                    out[(c.tenant_id, c.doc_id, c.chunk_index)] = c.text
        return out

    def publish(self, cfg: Any, waves: int = 1, pause_s: float = 0.0,
                stop: threading.Event | None = None) -> int:
        """Publish the plan in ``waves`` flushed slices ``pause_s`` apart; return messages sent."""
        sent = 0
        size = max(1, -(-len(self.actions) // waves))
        with Publisher(cfg, chunker=line_chunker) as pub:
            for start in range(0, len(self.actions), size):
                for action in self.actions[start:start + size]:
                    if isinstance(action, Document):
                        sent += pub.publish(action).chunks
                    else:
                        pub.delete(*action)
                        sent += 1
                pub.flush(180)
                if pause_s and start + size < len(self.actions):
                    if stop is not None and stop.wait(pause_s):
                        break
                    if stop is None:
                        time.sleep(pause_s)
        return sent


# -- read-backs ----------------------------------------------------------------------------------

def stored_rows(cfg: Any) -> list[RowKey]:
    """Every stored chunk as (tenant, doc, chunk index, version, content hash)."""
    with connect(cfg.database) as conn:
        return [(t, d, i, v, bytes(h).hex()) for t, d, i, v, h in conn.execute(
            "SELECT tenant_id, doc_id, chunk_index, doc_version, content_hash FROM chunks")]


def stored_documents(cfg: Any) -> dict[tuple[str, str], DocState]:
    """The documents table: (tenant, doc) -> (version, chunk count or 0 if deleted, deleted)."""
    with connect(cfg.database) as conn:
        return {(t, d): (v, 0 if x else n, x) for t, d, v, n, x in conn.execute(
            "SELECT tenant_id, doc_id, version, chunk_count, deleted FROM documents")}


def stored_vectors(cfg: Any, keys: Sequence[tuple[str, str, int]]
                   ) -> dict[tuple[str, str, int], npt.NDArray[np.float32]]:
    """The stored vectors of some chunks."""
    out: dict[tuple[str, str, int], npt.NDArray[np.float32]] = {}
    with connect(cfg.database) as conn:
        for t, d, i in keys:
            row = conn.execute("SELECT embedding FROM chunks WHERE tenant_id = %s AND doc_id = %s"
                               " AND chunk_index = %s", (t, d, i)).fetchone()
            if row is not None:
                out[(t, d, i)] = np.asarray(row[0].to_numpy(), dtype=np.float32)
    return out


def _partitions(consumer: Consumer, topic: str) -> list[int]:
    meta = consumer.list_topics(topic, timeout=15).topics.get(topic)
    return sorted(meta.partitions) if meta is not None and meta.partitions else []


def _through_outages(fn: Callable[[], int], timeout: float = 180.0) -> int:
    """``fn()``, asked again while the broker is away (the soak restarts it under the test)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def topic_count(cfg: Any, topic: str) -> int:
    """How many records ``topic`` holds (sum of high minus low watermarks); 0 if it is missing."""
    return _through_outages(lambda: _topic_count(cfg, topic))


def _topic_count(cfg: Any, topic: str) -> int:
    c = Consumer({"bootstrap.servers": cfg.kafka.bootstrap, "group.id": "vecpipe-faults-count"})
    try:
        total = 0
        for p in _partitions(c, topic):
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
            total += high - low
        return total
    finally:
        c.close()


def committed_lag(cfg: Any, group: str, topic: str) -> int:
    """Records of ``topic`` past the group's committed offsets (0: everything was committed)."""
    return _through_outages(lambda: _committed_lag(cfg, group, topic))


def _committed_lag(cfg: Any, group: str, topic: str) -> int:
    committed = offsets_committed(cfg.kafka, group, topic)
    c = Consumer({"bootstrap.servers": cfg.kafka.bootstrap, "group.id": "vecpipe-faults-count"})
    try:
        lag = 0
        for p in _partitions(c, topic):
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
            lag += high - max(committed.get(p, low), low)
        return lag
    finally:
        c.close()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               every: float = 1.0) -> float:
    """Poll ``predicate`` until it holds; return the seconds waited, or fail naming ``what``."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


# -- worker processes ------------------------------------------------------------------------------

class WorkerExited(AssertionError):
    """A worker process ended before it was assigned partitions."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


@dataclass
class WorkerProcess:
    """One ``python -m vecpipe.cli embed|write`` process, its log in a file."""

    stage: str
    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, cfg: Any, stage: str, log_dir: Path, *args: str,
              extra_env: dict[str, str] | None = None) -> WorkerProcess:
        """Start a worker with ``cfg``'s addresses; stderr (the JSON log) goes to a file."""
        env = env_for(cfg)
        env.update(FAST_GROUP_ENV)
        env.update(extra_env or {})
        log_dir.mkdir(parents=True, exist_ok=True)
        n = len(list(log_dir.glob(f"{stage}-*.log")))
        log = log_dir / f"{stage}-{n:02d}.log"
        env["VECPIPE_WORKER_ID"] = f"{stage}-{n:02d}"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "vecpipe.cli", stage, *args],
                                    env=env, stdout=subprocess.DEVNULL, stderr=out)
        return cls(stage, proc, log)

    def events(self) -> list[dict[str, Any]]:
        """The JSON log events written so far."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out

    def logged(self, event: str) -> bool:
        """Whether the log holds ``event`` yet."""
        return f'"event": "{event}"' in self.log.read_text(errors="replace")

    def wait_assigned(self, timeout: float) -> None:
        """Return once the worker owns partitions; fail if it exits or takes too long."""
        deadline = time.monotonic() + timeout
        while not self.logged("partitions_assigned"):
            if self.proc.poll() is not None:
                raise WorkerExited(f"{self.stage} worker exited {self.proc.returncode} before it "
                                   f"was assigned partitions:\n{self.tail()}", self.proc.returncode)
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.stage} worker got no partitions in {timeout:.0f} s"
                                     f":\n{self.tail()}")
            time.sleep(0.1)

    def kill9(self) -> None:
        """SIGKILL: no drain, no commit, no goodbye to the group."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 90) -> int:
        """SIGTERM, then wait for the drain; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def wait(self, timeout: float) -> int:
        """Wait for the worker to exit by itself (``--until-idle``)."""
        return self.proc.wait(timeout)

    def tail(self, lines: int = 15) -> str:
        """The end of the log, for failure messages."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])[-6000:]


class ThreadWorker:
    """A stage running in this process (its own consumer in the group) until :meth:`stop`."""

    def __init__(self, stage: str, cfg: Any, **kwargs: Any) -> None:
        from workers.run import run_embed, run_write

        self.stage = stage
        self.flag = StopFlag()
        self.code: int | None = None
        self.error: BaseException | None = None
        runner = run_embed if stage == "embed" else run_write

        def target() -> None:
            try:
                self.code = runner(cfg, stop=self.flag, **kwargs)
            except BaseException as exc:  # reported by stop()
                self.error = exc

        self.thread = threading.Thread(target=target, name=f"faults-{stage}", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        """Still running (it has neither been stopped nor failed)."""
        return self.thread.is_alive()

    def stop(self, timeout: float = 120) -> int:
        """Ask the loop to drain and stop; return its exit code."""
        self.flag.set()
        self.thread.join(timeout)
        if self.error is not None:
            raise AssertionError(f"{self.stage} worker raised {self.error!r}") from self.error
        assert self.code is not None, f"{self.stage} worker did not stop within {timeout} s"
        return self.code


class LockedEncoder:
    """The session's model shared by several in-process embedders, one batch at a time.

    Two embed pods each have their own model; in one process they share one, whose tokenizer
    must not be used by two threads at once.
    """

    def __init__(self, real: Any) -> None:
        self.real = real
        self.name, self.revision = real.name, real.revision
        self.backend_tag, self.dimension = real.backend_tag, real.dimension
        self.lock = threading.Lock()

    def encode(self, texts: list[str], batch_size: int | None = None) -> npt.NDArray[np.float32]:
        """Encode under the lock."""
        with self.lock:
            out: npt.NDArray[np.float32] = self.real.encode(texts, batch_size)
            return out


# -- services --------------------------------------------------------------------------------------

def native_home(basetemp: Path, bootstrap: str) -> Path | None:
    """The ``vecpipe services`` home that serves ``bootstrap`` in this pytest run, if any."""
    for state in basetemp.glob("*/services.json"):
        with contextlib.suppress(OSError, ValueError):
            if json.loads(state.read_text())["bootstrap"] == bootstrap:
                return state.parent
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    return True


def restart_postgres(home: Path, down_s: float,
                     probe: Callable[[], None] | None = None) -> float:
    """Stop the home's PostgreSQL (fast shutdown: sessions are cut, open transactions roll back),
    keep it down ``down_s``, and start it again on its port; return the seconds it was away.
    ``probe`` runs right after the stop and right before the start."""
    from vecpipe import devservices as services
    from vecpipe.devservices import postgres as dev_postgres
    from vecpipe.devservices.state import Paths

    paths = Paths(home)
    started = time.monotonic()
    dev_postgres.stop_postgres(paths)
    if probe is not None:
        probe()
    time.sleep(down_s)
    if probe is not None:
        probe()
    services.up(home)
    return time.monotonic() - started


def restart_kafka(home: Path, down_s: float) -> float:
    """SIGKILL the home's broker (no controlled shutdown), keep it down ``down_s``, and start it
    again on the same ports with ``services.up``; return the seconds it was away."""
    from vecpipe import devservices as services

    state = json.loads((home / "services.json").read_text())
    pid = int(state["kafka"]["pid"])
    assert _alive(pid), f"the broker of {home} (pid {pid}) is not running"
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not _alive(pid), 30, "the broker to die", every=0.1)
    time.sleep(down_s)
    services.up(home)
    return time.monotonic() - started


@contextlib.contextmanager
def services_restored(home: Path | None) -> Iterator[None]:
    """Whatever happens in the block, leave the shared services running and answering."""
    try:
        yield
    finally:
        if home is not None:
            from vecpipe import devservices as services

            services.up(home)


# -- the report ------------------------------------------------------------------------------------

@dataclass
class FaultLog:
    """Figures of one fault scenario, for the summary printed and written at the end."""

    test: str
    faults: dict[str, int] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    seconds: float | None = None

    def finish(self) -> None:
        """The scenario is over."""
        self.seconds = round(time.monotonic() - self.started, 1)

    def fault(self, kind: str, n: int = 1) -> None:
        """Count ``n`` injected faults of ``kind``."""
        self.faults[kind] = self.faults.get(kind, 0) + n

    def add(self, name: str, value: Any) -> None:
        """Append ``value`` to the list figure ``name``."""
        self.figures.setdefault(name, []).append(value)

    def note(self, **figures: Any) -> None:
        """Record figures (messages in and out, rows expected and found, dead letters...)."""
        self.figures.update(figures)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        seconds = self.seconds or round(time.monotonic() - self.started, 1)
        return {"test": self.test, "faults": dict(self.faults), **self.figures,
                "seconds": seconds}


def summary_lines(entries: Iterable[FaultLog]) -> list[str]:
    """A text table of the entries."""
    lines = [f"{'scenario':<40} {'faults':<40} {'in':>6} {'out':>6} {'rows exp':>8} "
             f"{'found':>6} {'dlq':>4} {'s':>6}  verdict"]
    for e in entries:
        d = e.as_dict()
        faults = ", ".join(f"{k} {v}" for k, v in e.faults.items()) or "-"
        lines.append(
            f"{e.test.removeprefix('test_')[:40]:<40} {faults[:40]:<40} "
            f"{d.get('messages_in', '-'):>6} {d.get('messages_out', '-'):>6} "
            f"{d.get('rows_expected', '-'):>8} {d.get('rows_found', '-'):>6} "
            f"{d.get('dead_letters', '-'):>4} {d['seconds']:>6}  {d.get('verdict', 'FAILED')}")
    return lines
