"""Which failures are transient (retried with backoff) and which are the record's fault.

This is the one place that says so, for our own errors (``vecpipe.errors``) and for those of
the client libraries (confluent-kafka, psycopg). Stages wrap their side effects in
:func:`retrying`; what :func:`is_transient` does not accept is never retried.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from confluent_kafka import KafkaError, KafkaException
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from vecpipe.config import RetryConfig
from vecpipe.errors import PermanentError, TransientError

__all__ = [
    "call_with_retry",
    "is_fatal",
    "is_permanent",
    "is_transient",
    "retrying",
]

T = TypeVar("T")


# SQLSTATEs that mean "try again": serialization failure, deadlock, statement completion
# unknown, lock not available; and whole classes: 08 connection exception, 53 insufficient
# resources (disk full, out of memory, too many connections), 57 operator intervention
# (statement timeout, admin shutdown, crash recovery), 58 system error (I/O).
_TRANSIENT_SQLSTATES = ("40001", "40P01", "40003", "55P03")
_TRANSIENT_SQL_CLASSES = ("08", "53", "57", "58")


def _is_transient_kafka(exc: KafkaException) -> bool:
    err = exc.args[0] if exc.args else None
    if isinstance(err, KafkaError):
        return bool(err.retriable() or not err.fatal())
    return True


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: outages, deadlocks, timeouts, out-of-memory."""
    if isinstance(exc, TransientError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, KafkaException):
        return _is_transient_kafka(exc)
    # The server's SQLSTATE decides first: psycopg files "program limit exceeded" (an index
    # row too large for its B-tree, say) under OperationalError, yet no retry can help it.
    if isinstance(exc, psycopg.Error) and exc.sqlstate:
        return exc.sqlstate in _TRANSIENT_SQLSTATES or exc.sqlstate[:2] in _TRANSIENT_SQL_CLASSES
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


# SQLSTATE classes that say the deployment is wrong, not the record: 42 syntax error or access
# rule violation (a missing table, column or function; a revoked grant), 3D and 3F a missing
# database or schema, 28 invalid authorization, 25 invalid transaction state (a read-only
# replica), 0A a feature the server does not support.
_FATAL_SQL_CLASSES = ("42", "3D", "3F", "28", "25", "0A")


def is_fatal(exc: BaseException) -> bool:
    """True when the deployment is broken whatever the record (a missing table, a revoked
    grant): the worker stops instead of blaming, and dead-lettering, its input."""
    return isinstance(exc, psycopg.Error) and (exc.sqlstate or "")[:2] in _FATAL_SQL_CLASSES


def is_permanent(exc: BaseException) -> bool:
    """True for failures of the record itself, which go to the dead-letter topic: everything
    that is neither transient (retried) nor fatal (stops the worker). Raised while converting
    or storing one record, any other error is that record's fault (a value psycopg cannot adapt,
    an integer too large for its column, a row the database refuses)."""
    if isinstance(exc, PermanentError):
        return True
    return not is_transient(exc) and not is_fatal(exc)


def retrying(
    cfg: RetryConfig,
    on_retry: Callable[[BaseException, int], None] | None = None,
) -> Retrying:
    """A tenacity policy: transient failures only, exponential backoff with full jitter."""

    def before_sleep(state: RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None:
            exc = state.outcome.exception()
            if exc is not None:
                on_retry(exc, state.attempt_number)

    return Retrying(
        retry=retry_if_exception(is_transient),
        wait=wait_random_exponential(multiplier=cfg.initial_wait_s, max=cfg.max_wait_s),
        stop=stop_after_attempt(cfg.attempts),
        before_sleep=before_sleep,
        reraise=True,
    )


def call_with_retry(
    cfg: RetryConfig, fn: Callable[..., T], *args: Any,
    on_retry: Callable[[BaseException, int], None] | None = None,
) -> T:
    """Run ``fn(*args)`` under :func:`retrying`."""
    result: T = retrying(cfg, on_retry)(fn, *args)
    return result
