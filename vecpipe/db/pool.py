"""PostgreSQL connections: a pool whose every connection has pgvector types and session limits.

Every connection also has client-side limits, so that a network that swallows packets (a
black-holed route, a stuck proxy) cannot hold a worker in one call: TCP keepalives and
``tcp_user_timeout`` (libpq), and :func:`deadline`, which cuts a connection whose call outlives
``database.call_timeout_s``; the cut call fails as a lost connection, which is retried.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import psycopg
from pgvector.psycopg import register_vector
from psycopg_pool import ConnectionPool

from vecpipe.config import DatabaseConfig, redact_url
from vecpipe.errors import ConfigError, Unreachable

__all__ = ["Deadline", "check_database", "connect", "deadline", "local_timeout", "make_pool",
           "search_database", "session_database"]


def _network_options(db: DatabaseConfig) -> dict[str, Any]:
    """libpq options that find a dead or silent peer from the client's side."""
    idle = max(1, db.network_timeout_s // 3)
    return {"connect_timeout": db.connect_timeout_s, "keepalives": 1,
            "keepalives_idle": idle, "keepalives_interval": max(1, idle // 2),
            "keepalives_count": 3, "tcp_user_timeout": db.network_timeout_s * 1000}


class Deadline:
    """The clock of :func:`deadline`: ``renew()`` restarts it (long work that shows progress,
    such as a large tenant deletion, is cut only when a step stalls, not when the whole runs
    long), and once the block has ended it never cuts."""

    def __init__(self, conn: psycopg.Connection[Any], seconds: float) -> None:
        self._conn = conn
        self._seconds = seconds
        self._lock = threading.Lock()
        self._due = time.monotonic() + seconds
        self._done = False
        self._timer: threading.Timer | None = None

    def renew(self) -> None:
        """Give the block another ``seconds`` from now."""
        with self._lock:
            self._due = time.monotonic() + self._seconds

    def _arm(self, after: float) -> None:
        self._timer = threading.Timer(after, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            left = self._due - time.monotonic()
            if left > 0:
                self._arm(left)
                return
            # shutdown() acts on the socket itself, so a duplicate descriptor reaches it, and
            # the blocked read in libpq returns at once. The lock keeps this from running after
            # the block has ended (on a connection back in the pool, or in another's hands).
            with (contextlib.suppress(OSError, psycopg.Error),
                  socket.socket(fileno=os.dup(self._conn.pgconn.socket)) as sock):
                sock.shutdown(socket.SHUT_RDWR)

    def start(self) -> None:
        """Start the clock."""
        with self._lock:
            self._arm(self._seconds)

    def stop(self) -> None:
        """The block has ended: the clock never cuts from now on."""
        with self._lock:
            self._done = True
            if self._timer is not None:
                self._timer.cancel()


@contextlib.contextmanager
def deadline(conn: psycopg.Connection[Any], seconds: float) -> Iterator[Deadline]:
    """Cut ``conn`` if the block takes longer than ``seconds`` (since it began, or since its
    last ``renew()``): the call under way then fails with psycopg.OperationalError (transient:
    retried on a new connection) instead of waiting for a server that will never answer. The
    pool discards the cut connection."""
    clock = Deadline(conn, seconds)
    clock.start()
    try:
        yield clock
    finally:
        clock.stop()


def _connect_options(db: DatabaseConfig) -> dict[str, Any]:
    """Everything ``psycopg.connect`` gets besides the URL.

    Nothing here is session state set after connecting, which a transaction pooler would leave
    on one server connection and hand the next transaction another: statement_timeout goes in
    the startup packet on a direct connection (a pooler refuses ``options``), and every
    transaction that needs it sets it again with :func:`local_timeout`. Tables are always
    schema-qualified, so no search_path is set at all. Behind a pooler, psycopg never prepares
    a statement on the server: the next execution could reach a server that lacks it.
    """
    options = _network_options(db)
    if db.proxy == "none":
        options["options"] = f"-c statement_timeout={db.statement_timeout_ms}"
    else:
        options["prepare_threshold"] = None
    return options


def local_timeout(conn: psycopg.Connection[Any], milliseconds: int) -> None:
    """``SET LOCAL statement_timeout``: for this transaction only, on whatever server runs it."""
    conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(milliseconds),))


def session_database(db: DatabaseConfig, what: str) -> DatabaseConfig:
    """The settings for an operation that needs a session of its own (``what``, e.g. "CREATE
    INDEX CONCURRENTLY"): ``db`` itself without a pooler, else its direct_url."""
    if db.proxy == "none":
        return db
    if not db.direct_url:
        raise ConfigError(
            f"{what} needs a session of its own, which a transaction pooler does not keep "
            "(database.proxy is 'transaction'); set database.direct_url "
            "(VECPIPE_DATABASE_DIRECT_URL) to the server's own address."
        )
    return replace(db, url=db.direct_url, proxy="none")


def search_database(db: DatabaseConfig) -> DatabaseConfig:
    """The settings searches and status read with: database.search_url (a streaming replica)
    when set, else ``db``."""
    return replace(db, url=db.search_url) if db.search_url else db


def connect(db: DatabaseConfig, *, vector_types: bool = True,
            autocommit: bool = False) -> psycopg.Connection[Any]:
    """One connection (with pgvector types unless told otherwise)."""
    try:
        conn = psycopg.connect(db.url, autocommit=autocommit, **_connect_options(db))
    except psycopg.OperationalError as exc:
        raise Unreachable(
            f"Cannot connect to PostgreSQL at {redact_url(db.url)} (database.url, "
            f"VECPIPE_DATABASE_URL): {str(exc).strip().splitlines()[-1]}."
        ) from None
    if vector_types:
        _register(conn, db)
        if not autocommit:
            conn.commit()
    return conn


def _register(conn: psycopg.Connection[Any], db: DatabaseConfig) -> None:
    try:
        register_vector(conn)
    except psycopg.ProgrammingError:
        raise Unreachable(
            f"The vector extension is not installed in {redact_url(db.url)}; run "
            "'vecpipe migrate' first."
        ) from None


def check_database(db: DatabaseConfig, *, migrated: bool = False) -> None:
    """Raise :class:`Unreachable` with a one-sentence reason unless the database answers.

    With ``migrated``, also require the vector extension and the chunks table.
    """
    with connect(db, vector_types=migrated, autocommit=True) as conn:
        if migrated and conn.execute(
            "SELECT to_regclass(format('%%I.chunks', %s::text))", (db.schema,)
        ).fetchone() == (None,):
            raise Unreachable(
                f"The schema {db.schema!r} (database.schema, VECPIPE_DB_SCHEMA) has no chunks "
                "table; run 'vecpipe migrate' first."
            )


def _check(conn: psycopg.Connection[Any], db: DatabaseConfig) -> None:
    """The pool's check of a connection before it is handed out.

    Directly, a round trip (cut after network_timeout_s). Behind a transaction pooler a round
    trip waits for one of the pooler's server connections, so while the server restarts the
    check itself would hold every caller, the optional vector cache's included, for as long as
    the pooler queues it: there the check is the client connection's own state, and a caller's
    query finds a dead server (and is retried) within its own deadline.
    """
    if db.proxy != "none":
        if conn.closed or conn.pgconn.status != psycopg.pq.ConnStatus.OK:
            raise psycopg.OperationalError("the connection to the pooler is closed")
        return
    with deadline(conn, db.network_timeout_s):
        ConnectionPool.check_connection(conn)


def make_pool(db: DatabaseConfig, *, name: str = "vecpipe") -> ConnectionPool[Any]:
    """A connection pool whose connections have pgvector types and timeouts."""

    def configure(conn: psycopg.Connection[Any]) -> None:
        register_vector(conn)
        conn.commit()

    check_database(db, migrated=True)
    pool: ConnectionPool[Any] = ConnectionPool(
        db.url,
        min_size=db.pool_min,
        max_size=db.pool_max,
        kwargs=_connect_options(db),
        configure=configure,
        name=name,
        open=False,
        # A connection that died with the server is found and replaced before it is handed out
        # (and one on a silent network is cut, then replaced, rather than waited on).
        check=lambda conn: _check(conn, db),
    )
    pool.open(wait=True, timeout=db.connect_timeout_s * 3)
    return pool
