"""Unit tests of the database layer's client-side limits: the deadline that cuts a connection,
and the bounded set of tenant locks."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

import pytest

from vecpipe.db.erase import TENANT_LOCKS, tenant_lock
from vecpipe.db.pool import Deadline, deadline


@dataclass
class FakePgConn:
    socket: int


@dataclass
class FakeConn:
    """What deadline() uses of a psycopg connection: the socket of its libpq connection."""

    pgconn: FakePgConn


def cut_within(seconds: float, body: Any, limit: float) -> bool:
    """Whether a socket under ``deadline(seconds)`` is shut down while ``body(clock)`` runs and
    ``limit`` seconds after; the peer sees EOF when it is."""
    ours, peer = socket.socketpair()
    try:
        conn: Any = FakeConn(FakePgConn(ours.fileno()))
        with deadline(conn, seconds) as clock:
            body(clock)
        peer.settimeout(limit)
        try:
            return peer.recv(1) == b""
        except TimeoutError:
            return False
    finally:
        ours.close()
        peer.close()


def test_a_call_that_outlives_its_deadline_is_cut() -> None:
    assert cut_within(0.05, lambda clock: time.sleep(0.3), limit=2.0)


def test_renewing_the_deadline_keeps_a_progressing_call_alive() -> None:
    """Eight steps of 0.25 s, twice the deadline in all, renewed after each: never cut (each
    step has four times its time to spare, for a busy machine)."""
    def steps(clock: Any) -> None:
        for _ in range(8):
            time.sleep(0.25)
            clock.renew()

    assert not cut_within(1.0, steps, limit=0.3)


def test_a_deadline_never_cuts_after_its_block_has_ended() -> None:
    """The connection goes back to the pool (or to another caller) when the block ends; a timer
    that fires after that, even one already running, must not touch it."""
    assert not cut_within(0.1, lambda clock: None, limit=0.4)
    ours, peer = socket.socketpair()
    try:
        conn: Any = FakeConn(FakePgConn(ours.fileno()))
        clock = Deadline(conn, 0.0)
        clock.stop()
        clock._fire()  # the timer's callback, arriving after stop()
        peer.settimeout(0.2)
        with pytest.raises(TimeoutError):
            peer.recv(1)
    finally:
        ours.close()
        peer.close()


def test_tenant_locks_are_bounded_and_stable() -> None:
    """Ten thousand tenants share at most TENANT_LOCKS keys; a tenant always has the same key,
    per schema."""
    keys = {tenant_lock("vecpipe", f"tenant-{i}") for i in range(10_000)}
    assert len(keys) == TENANT_LOCKS
    assert tenant_lock("vecpipe", "acme") == tenant_lock("vecpipe", "acme")
    assert tenant_lock("vecpipe", "acme") != tenant_lock("other", "acme")
