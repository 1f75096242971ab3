"""Searching on a streaming replica: how far it is behind the primary, and waiting for it.

Writes and deletes always go to database.url (the primary, or PgBouncer in front of it);
searches and status read database.search_url when it is set. A version the writer committed is
searchable on the replica once the replica has replayed the commit's WAL position: read-your-
writes is "the replica's replay position has passed the primary's position after the commit".
An upstream without database access reads the stored version of its document where searches
read (``documents.version``, see the README) and waits until it is the one it published.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from vecpipe.config import DatabaseConfig
from vecpipe.db.pool import connect, search_database
from vecpipe.errors import Unreachable

__all__ = ["ReplicaLag", "replica_lag", "wait_replayed"]


@dataclass(frozen=True)
class ReplicaLag:
    """How far database.search_url is behind database.url."""

    is_replica: bool
    # WAL bytes the replica has still to replay (0 when it is the primary itself).
    bytes_behind: int
    # Seconds since the last transaction it replayed was committed on the primary (None: it
    # replayed none since it started, or it is not a replica).
    replay_age_s: float | None


def _primary_position(db: DatabaseConfig) -> str:
    with connect(db, vector_types=False, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def replica_lag(db: DatabaseConfig) -> ReplicaLag:
    """Compare the search URL's replay position with the primary's current WAL position."""
    if not db.search_url:
        return ReplicaLag(False, 0, None)
    position = _primary_position(db)
    search = search_database(db)
    with connect(search, vector_types=False, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_is_in_recovery(),"
            " coalesce(pg_wal_lsn_diff(%s::pg_lsn, pg_last_wal_replay_lsn()), 0)::bigint,"
            " extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8",
            (position,)).fetchone()
    assert row is not None
    standby, behind, age = row
    return ReplicaLag(bool(standby), max(0, int(behind)) if standby else 0,
                      float(age) if standby and age is not None else None)


def wait_replayed(db: DatabaseConfig, timeout_s: float = 30.0) -> float:
    """Wait until database.search_url has replayed everything committed on the primary so far;
    return the seconds waited. Raises Unreachable after ``timeout_s``."""
    started = time.monotonic()
    if not db.search_url:
        return 0.0
    position = _primary_position(db)
    search = search_database(db)
    with connect(search, vector_types=False, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT NOT pg_is_in_recovery() OR pg_last_wal_replay_lsn() >= %s::pg_lsn",
                (position,)).fetchone()
            if row == (True,):
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise Unreachable(
                    f"The search replica (database.search_url) has not replayed position "
                    f"{position} of the primary within {timeout_s:.0f} s; see its log and "
                    "pg_stat_replication on the primary.")
            time.sleep(0.05)
