"""Unit tests of vecpipe.retry: which failures are transient, which are the record's, retrying."""

from __future__ import annotations

import psycopg
import psycopg.errors
import pytest

from vecpipe.config import RetryConfig
from vecpipe.errors import DeliveryFailed, InvalidMessage, ModelOutOfMemory, PermanentError
from vecpipe.retry import call_with_retry, is_fatal, is_permanent, is_transient, retrying

FAST = RetryConfig(attempts=4, initial_wait_s=0.001, max_wait_s=0.002)

TRANSIENT: list[BaseException] = [
    psycopg.errors.SerializationFailure("could not serialize access"),
    psycopg.errors.DeadlockDetected("deadlock detected"),
    psycopg.errors.ConnectionFailure("connection lost"),
    psycopg.errors.LockNotAvailable("lock timeout"),
    psycopg.errors.QueryCanceled("statement timeout"),
    psycopg.errors.AdminShutdown("terminating connection"),
    psycopg.errors.TooManyConnections("too many clients"),
    psycopg.errors.DiskFull("could not extend file"),
    psycopg.errors.OutOfMemory("out of memory"),
    psycopg.errors.CannotConnectNow("the database system is starting up"),
    psycopg.errors.IoError("could not read block"),
    psycopg.OperationalError("server closed the connection unexpectedly"),
    psycopg.InterfaceError("the connection is closed"),
    DeliveryFailed("1 message was not acknowledged"),
    ModelOutOfMemory("CUDA out of memory"),
    ConnectionResetError("reset"),
    TimeoutError("timed out"),
]

PERMANENT: list[BaseException] = [
    InvalidMessage("not valid JSON"),
    PermanentError("zero vector"),
    ValueError("bad"),
    UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
    psycopg.errors.DataException("data exception"),
    psycopg.errors.UniqueViolation("duplicate key"),
    psycopg.errors.NotNullViolation("null value"),
    # An OperationalError in psycopg's classes, but a record too large for an index row.
    psycopg.errors.ProgramLimitExceeded("index row size 3024 exceeds btree version 4 maximum"),
]


def _name(exc: BaseException) -> str:
    return type(exc).__name__


def test_transient_sqlstates() -> None:
    """The psycopg error classes used below carry the SQLSTATEs that retry.py lists."""
    assert psycopg.errors.SerializationFailure().sqlstate == "40001"
    assert psycopg.errors.DeadlockDetected().sqlstate == "40P01"
    assert psycopg.errors.ConnectionFailure().sqlstate == "08006"


@pytest.mark.parametrize("exc", TRANSIENT, ids=_name)
def test_transient(exc: BaseException) -> None:
    """Outages, deadlocks, serialization failures, timeouts and out-of-memory are retried."""
    assert is_transient(exc)
    assert not is_permanent(exc)


@pytest.mark.parametrize("exc", PERMANENT, ids=_name)
def test_permanent(exc: BaseException) -> None:
    """Invalid input, value errors and data or integrity errors go to the dead letters."""
    assert is_permanent(exc)
    assert not is_transient(exc)


@pytest.mark.parametrize("exc", [
    psycopg.errors.InvalidTextRepresentation("invalid input syntax"),
    psycopg.errors.UntranslatableCharacter("unsupported Unicode escape sequence"),
    psycopg.errors.NumericValueOutOfRange("value out of range"),
    psycopg.errors.CharacterNotInRepertoire("invalid byte sequence"),
], ids=_name)
def test_every_data_error_is_permanent(exc: BaseException) -> None:
    """Every SQLSTATE class 22 (data exception) error is a failure of the record itself."""
    assert is_permanent(exc)
    assert not is_transient(exc)


@pytest.mark.parametrize("exc", [
    psycopg.errors.UndefinedTable("relation chunks does not exist"),
    psycopg.errors.UndefinedColumn("column published_at does not exist"),
    psycopg.errors.InsufficientPrivilege("permission denied for table chunks"),
    psycopg.errors.InvalidSchemaName("schema vecpipe does not exist"),
    psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT in a read-only transaction"),
    psycopg.errors.InvalidPassword("password authentication failed"),
], ids=_name)
def test_a_broken_deployment_is_fatal(exc: BaseException) -> None:
    """A missing table, a revoked grant or a read-only replica is no record's fault: neither
    retried nor dead-lettered, it stops the worker."""
    assert is_fatal(exc)
    assert not is_transient(exc)
    assert not is_permanent(exc)


@pytest.mark.parametrize("exc", [
    KeyError("k"), RuntimeError("unexpected"), OverflowError("int too big to convert"),
    RecursionError("maximum recursion depth exceeded"), TypeError("not JSON serializable"),
], ids=_name)
def test_anything_else_raised_for_a_record_is_its_fault(exc: BaseException) -> None:
    """Whatever else converting or storing one record raises is that record's fault (the
    writer isolates it by halving and dead-letters it alone); the dead-letter cap stops a worker
    whose every record fails so."""
    assert is_permanent(exc)
    assert not is_fatal(exc)


class Flaky:
    """Fails with ``exc`` for the first ``failures`` calls, then returns the call count."""

    def __init__(self, exc: BaseException, failures: int) -> None:
        self.exc = exc
        self.failures = failures
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return self.calls


def test_retries_a_transient_failure_then_succeeds() -> None:
    """A transient failure is retried, and the eventual result is returned."""
    fn = Flaky(psycopg.errors.DeadlockDetected("deadlock"), failures=2)
    seen: list[tuple[str, int]] = []
    result = call_with_retry(FAST, fn, on_retry=lambda e, n: seen.append((_name(e), n)))
    assert result == 3
    assert fn.calls == 3
    assert seen == [("DeadlockDetected", 1), ("DeadlockDetected", 2)]


def test_does_not_retry_a_permanent_failure() -> None:
    """A permanent failure is raised at once, after a single call."""
    fn = Flaky(InvalidMessage("bad"), failures=5)
    seen: list[int] = []
    with pytest.raises(InvalidMessage):
        call_with_retry(FAST, fn, on_retry=lambda e, n: seen.append(n))
    assert fn.calls == 1
    assert seen == []


def test_stops_after_attempts() -> None:
    """A failure that persists is raised as itself after ``attempts`` calls."""
    fn = Flaky(DeliveryFailed("no ack"), failures=100)
    with pytest.raises(DeliveryFailed, match="no ack"):
        call_with_retry(FAST, fn)
    assert fn.calls == FAST.attempts


def test_retrying_as_an_iterator() -> None:
    """The policy also works as tenacity's ``for attempt in ...`` loop."""
    fn = Flaky(ModelOutOfMemory("oom"), failures=1)
    for attempt in retrying(FAST):
        with attempt:
            result = fn()
    assert result == 2
