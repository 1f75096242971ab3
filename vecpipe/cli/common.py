"""What the command modules share: the common flags, the configuration they build, argument types.

Importing this (and ``vecpipe.config``) loads no client library: every ``vecpipe`` command,
``--help`` included, builds the whole parser.
"""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from vecpipe.config import BACKENDS, DEVICES, LOG_FORMATS, PRECISIONS, Config, load_config
from vecpipe.errors import CommandError

__all__ = [
    "add_db_flags",
    "add_kafka_flags",
    "add_model_flags",
    "add_worker_flags",
    "config_from_args",
    "home_of",
    "parse_time",
    "partition_list",
    "positive_float",
    "positive_int",
]

# Flags that several commands share: argparse dest -> (section, setting).
_COMMON_FLAGS = {
    "bootstrap": ("kafka", "bootstrap"),
    "database_url": ("database", "url"),
    "schema": ("database", "schema"),
    "tenant": ("produce", "tenant"),
    "model": ("model", "name"),
    "device": ("model", "device"),
    "backend": ("model", "backend"),
    "precision": ("model", "precision"),
    "metrics_port": ("ops", "metrics_port"),
    "log_format": ("ops", "log_format"),
}


def config_from_args(args: argparse.Namespace, **sections: dict[str, Any]) -> Config:
    """The configuration: ``--config`` file, environment, then the common flags and
    ``sections`` (a command's own flags, by section; ``None`` values are not given); the
    addresses none of them gives come from the local services (``vecpipe services up``)."""
    overrides: dict[str, dict[str, Any]] = {k: dict(v) for k, v in sections.items()}
    for flag, (section, name) in _COMMON_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.setdefault(section, {})[name] = value
    return load_config(overrides, config_file=args.config, local_services=True)


def home_of(args: argparse.Namespace) -> Path:
    """Where local services keep their data: ``--home``, else ``ops.home`` (by default the
    nearest ``.vecpipe`` folder from the working directory up)."""
    if getattr(args, "home", None):
        return Path(args.home)
    return Path(config_from_args(args).ops.home)


def add_kafka_flags(p: argparse.ArgumentParser) -> None:
    """``--bootstrap``."""
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (VECPIPE_KAFKA_BOOTSTRAP)")


def add_db_flags(p: argparse.ArgumentParser) -> None:
    """``--database-url`` and ``--schema``."""
    p.add_argument("--database-url", help="PostgreSQL URL (VECPIPE_DATABASE_URL)")
    p.add_argument("--schema", help="database schema (VECPIPE_DB_SCHEMA)")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--backend`` and ``--precision``."""
    p.add_argument("--model", help="sentence-transformers model folder or name (VECPIPE_MODEL)")
    p.add_argument("--device", choices=DEVICES)
    p.add_argument("--backend", choices=BACKENDS)
    p.add_argument("--precision", choices=PRECISIONS)


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    """The flags of a long-running stage."""
    p.add_argument("--until-idle", type=float, metavar="SECONDS",
                   help="exit 0 once nothing has arrived for this long")
    p.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz, /readyz here")
    p.add_argument("--log-format", choices=LOG_FORMATS)
    p.add_argument("--batch-size", type=int)


# -- argument types (argparse reports their errors with the flag's name) -----------------------

def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """A number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def partition_list(text: str) -> list[int]:
    """A partition number, or a comma-separated list of them."""
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a partition number (or a comma-separated list of them)") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a partition number")
    return values


# -- the one time grammar of --since and --until -----------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(w|d|h|m|s)", re.I)
_UNIT_S = {"w": 604_800, "d": 86_400, "h": 3600, "m": 60, "s": 1}


def parse_time(text: str, now: datetime | None = None, flag: str = "--since") -> datetime:
    """An ISO 8601 date or time (UTC unless it says otherwise) or a duration back from ``now``
    (``90s``, ``15m``, ``2h``, ``1d12h``, ``1w``); a sentence naming ``flag`` when it is neither.
    """
    now = now or datetime.now(UTC)
    raw = text.strip()
    compact = raw.replace(" ", "")
    if compact and _DURATION.sub("", compact) == "":
        seconds = sum(float(n) * _UNIT_S[u.lower()] for n, u in _DURATION.findall(compact))
        return now - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise CommandError(
            f"{flag} {text!r} is neither an ISO 8601 date or time (2025-01-31, "
            "2024-05-01T03:00:00Z) nor a "
            "duration back from now (90s, 15m, 2h, 1d12h, 1w)."
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
