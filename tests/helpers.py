"""Helpers shared by the integration tests: run stages, read back what they did."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from confluent_kafka import Consumer
from psycopg import sql

from vecpipe.kafka.consumer import StopFlag


def connect(db: Any, *, vector_types: bool = True,
            autocommit: bool = False) -> psycopg.Connection[Any]:
    """A connection for a test's own SQL: to the server itself (database.direct_url behind a
    pooler), with search_path on the test's schema. The product never relies on session state;
    the tests' inspection queries read better with unqualified table names."""
    from vecpipe.db import pool

    conn = pool.connect(pool.session_database(db, "A test's own SQL"),
                        vector_types=vector_types, autocommit=autocommit)
    conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(db.schema)))
    if not autocommit:
        conn.commit()
    return conn


def through_pgbouncer(db: Any, pooled_url: str) -> Any:
    """``db`` (a DatabaseConfig) on the pooler at ``pooled_url``, in transaction pooling mode,
    with the server itself as database.direct_url."""
    from dataclasses import replace

    return replace(db, url=pooled_url, proxy="transaction", direct_url=db.url)


def env_for(cfg: Any) -> dict[str, str]:
    """Environment variables that give a subprocess ``cfg``'s addresses and names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VECPIPE_")}
    env.update({
        "VECPIPE_KAFKA_BOOTSTRAP": cfg.kafka.bootstrap,
        "VECPIPE_DATABASE_URL": cfg.database.url,
        "VECPIPE_DATABASE_PROXY": cfg.database.proxy,
        "VECPIPE_DATABASE_DIRECT_URL": cfg.database.direct_url,
        "VECPIPE_SEARCH_DATABASE_URL": cfg.database.search_url,
        "VECPIPE_DB_SCHEMA": cfg.database.schema,
        "VECPIPE_DATABASE_APP_ROLE": cfg.database.app_role,
        "VECPIPE_TOPIC_CHUNKS": cfg.kafka.chunks_topic,
        "VECPIPE_TOPIC_EMBEDDINGS": cfg.kafka.embeddings_topic,
        "VECPIPE_KAFKA_EMBED_GROUP": cfg.kafka.embed_group,
        "VECPIPE_KAFKA_WRITE_GROUP": cfg.kafka.write_group,
        "VECPIPE_EMBED_BATCH_WAIT_MS": str(cfg.embed.batch_wait_ms),
        "VECPIPE_WRITE_BATCH_WAIT_MS": str(cfg.write.batch_wait_ms),
        "VECPIPE_LOG_FORMAT": "json",
        "HF_HUB_OFFLINE": "1",
    })
    return env


def run_cli(cfg: Any, *args: str, timeout: float = 300, check: bool = True,
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``vecpipe ARGS`` in a subprocess configured for ``cfg``."""
    env = env_for(cfg)
    env.update(extra_env or {})
    proc = subprocess.run([sys.executable, "-m", "vecpipe.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"vecpipe {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def run_stage(stage: str, cfg: Any, until_idle_s: float = 3.0, **kwargs: Any) -> int:
    """Run a stage in this process until it has been idle for ``until_idle_s``."""
    from workers.run import run_embed, run_write

    runner = run_embed if stage == "embed" else run_write
    return runner(cfg, until_idle_s=until_idle_s, stop=StopFlag(), **kwargs)


@contextmanager
def background_stage(stage: str, cfg: Any, **kwargs: Any) -> Iterator[StopFlag]:
    """Run a stage in a thread until the block ends."""
    from workers.run import run_embed, run_write

    stop = StopFlag()
    runner = run_embed if stage == "embed" else run_write
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(runner(cfg, stop=stop, **kwargs)), daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(120)


def read_topic(cfg: Any, topic: str, timeout: float = 10.0) -> list[Any]:
    """Every record currently on ``topic`` (a throwaway consumer group reads from the start)."""
    consumer = Consumer({"bootstrap.servers": cfg.kafka.bootstrap,
                         "group.id": f"reader-{os.urandom(4).hex()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    out: list[Any] = []
    idle = 0.0
    try:
        while idle < timeout:
            msgs = consumer.consume(500, 1.0)
            if not msgs:
                idle += 1.0
                if out:
                    idle += 2.0  # once data came, a short quiet spell means the end
                continue
            out.extend(m for m in msgs if m.error() is None)
    finally:
        consumer.close()
    return out


class BlackHoleProxy:
    """A TCP relay to ``target`` that can turn into a black hole: with :meth:`black_hole` it
    keeps every connection open but stops relaying, as a network that swallows packets does;
    :meth:`restore` relays again for new connections."""

    def __init__(self, host: str, port: int) -> None:
        import socket

        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def black_hole(self) -> None:
        """Stop relaying; connections stay open and silent."""
        self._open.clear()

    def restore(self) -> None:
        """Relay again (new connections; the silent ones stay dead)."""
        self._open.set()

    def close(self) -> None:
        """Stop accepting connections."""
        self._closed = True
        self.listener.close()

    def _accept(self) -> None:
        import socket

        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: Any, dst: Any) -> None:
        generation = self._open.is_set()
        try:
            while generation and self._open.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if not self._open.is_set():
                    # Swallowed: the black hole holds this connection forever.
                    self._open.wait()
                    return
                dst.sendall(data)
        except OSError:
            pass
