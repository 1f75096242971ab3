"""The state of one home: its files and folders, ``services.json`` (ports and pids), its lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vecpipe.config import SERVICES_FILE
from vecpipe.errors import ServiceError

__all__ = [
    "DATABASE",
    "PG_SUPERUSER",
    "STATE_FILE",
    "STATE_VERSION",
    "Paths",
    "ServiceInfo",
    "State",
    "info",
    "locked",
    "read_state",
    "write_state",
]


DATABASE = "vecpipe"


# The CLI reads its "bootstrap" and "database_url" (vecpipe.config.recorded_services).
STATE_FILE = SERVICES_FILE


STATE_VERSION = 1


PG_SUPERUSER = "postgres"

# The machine this targets has two cores: a small heap, and Kafka's own kafka-server-start.sh GC
# settings. A broker that ran out of memory is worse than a dead one, which `status` does detect.


@dataclass(frozen=True)
class ServiceInfo:
    """Where the local services of one home listen, and whether they are running now."""

    home: Path
    bootstrap: str
    database_url: str
    kafka_running: bool
    postgres_running: bool
    kafka_log: Path
    postgres_log: Path
    # PgBouncer (transaction pooling) in front of the server, and a streaming replica: set
    # while `vecpipe services up --pgbouncer` / `--replica` started them.
    pooled_url: str | None = None
    replica_url: str | None = None


@dataclass(frozen=True)
class Paths:
    """Every file and folder of one home, named in one place."""

    home: Path

    @property
    def state(self) -> Path:
        return self.home / STATE_FILE

    @property
    def lock(self) -> Path:
        return self.home / ".services.lock"

    @property
    def kafka_dir(self) -> Path:
        return self.home / "kafka"

    @property
    def kafka_data(self) -> Path:
        return self.kafka_dir / "data"

    @property
    def kafka_config(self) -> Path:
        return self.kafka_dir / "server.properties"

    @property
    def kafka_log4j(self) -> Path:
        return self.kafka_dir / "log4j2.properties"

    @property
    def kafka_log(self) -> Path:
        return self.home / "kafka.log"

    @property
    def pgdata(self) -> Path:
        return self.home / "postgres"

    @property
    def postgres_log(self) -> Path:
        return self.home / "postgres.log"

    @property
    def pg_staging(self) -> Path:
        return self.home / "postgres.initdb"

    @property
    def pgbouncer_dir(self) -> Path:
        return self.home / "pgbouncer"

    @property
    def replica(self) -> Path:
        return self.home / "replica"

    @property
    def replica_staging(self) -> Path:
        return self.home / "replica.basebackup"

    @property
    def replica_log(self) -> Path:
        return self.home / "replica.log"


@dataclass(frozen=True)
class State:
    """What ``services.json`` records: the ports of the last ``up`` and the pids it started."""

    kafka_port: int
    controller_port: int
    postgres_port: int
    kafka_pid: int | None = None
    postgres_pid: int | None = None
    kafka_libs: str | None = None
    pgbouncer_port: int | None = None
    pgbouncer_pid: int | None = None
    replica_port: int | None = None
    replica_pid: int | None = None


def _url(port: int | None) -> str | None:
    return None if port is None else f"postgresql://{PG_SUPERUSER}@127.0.0.1:{port}/{DATABASE}"


def info(
    paths: Paths, state: State, *, kafka_running: bool, postgres_running: bool,
    pgbouncer_running: bool = False, replica_running: bool = False,
) -> ServiceInfo:
    return ServiceInfo(
        home=paths.home,
        bootstrap=f"127.0.0.1:{state.kafka_port}",
        database_url=_url(state.postgres_port) or "",
        kafka_running=kafka_running,
        postgres_running=postgres_running,
        kafka_log=paths.kafka_log,
        postgres_log=paths.postgres_log,
        pooled_url=_url(state.pgbouncer_port) if pgbouncer_running else None,
        replica_url=_url(state.replica_port) if replica_running else None,
    )


def write_state(paths: Paths, state: State) -> None:
    document = {
        "version": STATE_VERSION,
        "bootstrap": f"127.0.0.1:{state.kafka_port}",
        "database_url": info(
            paths, state, kafka_running=False, postgres_running=False
        ).database_url,
        "kafka": {
            "port": state.kafka_port,
            "controller_port": state.controller_port,
            "pid": state.kafka_pid,
            "libs": state.kafka_libs,
            "data": str(paths.kafka_data),
            "config": str(paths.kafka_config),
            "log": str(paths.kafka_log),
        },
        "postgres": {
            "port": state.postgres_port,
            "pid": state.postgres_pid,
            "data": str(paths.pgdata),
            "log": str(paths.postgres_log),
        },
        "pgbouncer": {"port": state.pgbouncer_port, "pid": state.pgbouncer_pid,
                      "url": _url(state.pgbouncer_port)},
        "replica": {"port": state.replica_port, "pid": state.replica_pid,
                    "url": _url(state.replica_port), "data": str(paths.replica)},
    }
    # Written to a side file and renamed, so a crash never leaves half a JSON document behind.
    partial = paths.state.with_name(paths.state.name + ".tmp")
    partial.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, paths.state)


def read_state(paths: Paths, *, strict: bool = True) -> State | None:
    """Return the recorded state or None if there is none; a damaged file raises when strict."""
    try:
        document = json.loads(paths.state.read_text(encoding="utf-8"))
        kafka, postgres = document["kafka"], document["postgres"]
        return State(
            kafka_port=int(kafka["port"]),
            controller_port=int(kafka["controller_port"]),
            postgres_port=int(postgres["port"]),
            kafka_pid=_optional_int(kafka.get("pid")),
            postgres_pid=_optional_int(postgres.get("pid")),
            kafka_libs=kafka.get("libs"),
            pgbouncer_port=_optional_int(document.get("pgbouncer", {}).get("port")),
            pgbouncer_pid=_optional_int(document.get("pgbouncer", {}).get("pid")),
            replica_port=_optional_int(document.get("replica", {}).get("port")),
            replica_pid=_optional_int(document.get("replica", {}).get("pid")),
        )
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as err:
        if not strict:
            return None
        raise ServiceError(
            f"{paths.state} is damaged ({err}); delete it and run `vecpipe services up` again "
            "(the data folders are kept)."
        ) from err


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``: two `up`s on one home (or one cache) take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
