"""Structured logging: JSON lines in production, readable key=value on a terminal.

Every event of a worker carries ``stage`` and ``worker_id``; secrets never reach a log line,
because every event passes through :func:`redact` before it is rendered.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from vecpipe.config import redact_text

__all__ = ["configure_logging", "get_logger", "redact"]

_SECRET_KEYS = re.compile(r"(password|passwd|secret|token|sasl\.|ssl\.key|credential)", re.I)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {
            k: ("***" if isinstance(k, str) and _SECRET_KEYS.search(k) else _scrub(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    return value


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask passwords in URLs and values of secret-looking keys."""
    for key in list(event):
        if _SECRET_KEYS.search(key) and key != "event":
            event[key] = "***"
        else:
            event[key] = _scrub(event[key])
    return event


def configure_logging(fmt: str = "auto", level: str = "info", **context: Any) -> None:
    """Set up structlog once per process; ``context`` (stage, worker_id) joins every event."""
    json_out = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_out
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**context)


def get_logger(**initial: Any) -> Any:
    """A structlog logger bound with ``initial`` values."""
    return structlog.get_logger().bind(**initial)
