"""The production database topology, locally: PgBouncer in transaction mode in front of the
server, and a hot standby streaming from it.

``vecpipe services up --pgbouncer`` runs Debian's PgBouncer (``pool_mode = transaction``, the
mode that breaks session state) in front of the embedded server; ``--replica`` makes a hot
standby with ``pg_basebackup -R`` and starts it on a port of its own. Both run as the same system
user as PostgreSQL (PgBouncer refuses to run as root), with their files in the home::

    pgbouncer/      pgbouncer.ini, userlist.txt, pgbouncer.pid, pgbouncer.log
    replica/        the standby's data directory
    replica.log     the standby's server log
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

from vecpipe.devservices.postgres import (
    POSTGRES_START_TIMEOUT_S,
    POSTGRES_STOP_TIMEOUT_S,
    pg_command,
    running_postmaster,
    write_postgres_settings,
)
from vecpipe.devservices.procs import pid_alive, port_open
from vecpipe.devservices.state import PG_SUPERUSER, Paths
from vecpipe.errors import ServiceError

__all__ = [
    "PGBOUNCER_POOL_SIZE",
    "pgbouncer_binary",
    "running_pgbouncer",
    "start_pgbouncer",
    "start_replica",
    "stop_pgbouncer",
    "stop_replica",
]

# Server connections per database and user. A client holds one only for a transaction, so this
# bounds the server's load however many worker pools connect (PostgreSQL allows 200 here).
PGBOUNCER_POOL_SIZE = 40

_PGBOUNCER_START_S = 20.0


def pgbouncer_binary() -> str:
    """The pgbouncer program, or a ServiceError that says how to install it."""
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/local/bin/pgbouncer") if os.access(p, os.X_OK)),
        None)
    if found is None:
        raise ServiceError(
            "PgBouncer is not installed; run `bash scripts/install-pgbouncer.sh` (Debian's "
            "pgbouncer package) or put a pgbouncer binary on PATH."
        )
    return found


def _pgbouncer_ini(paths: Paths, port: int, pg_port: int) -> str:
    folder = paths.pgbouncer_dir
    settings = {
        "listen_addr": "127.0.0.1",
        "listen_port": str(port),
        "unix_socket_dir": "",
        "auth_type": "trust",
        "auth_file": str(folder / "userlist.txt"),
        "pool_mode": "transaction",
        "max_client_conn": "1000",
        "default_pool_size": str(PGBOUNCER_POOL_SIZE),
        "reserve_pool_size": "5",
        # psycopg sends it at connect; PgBouncer 1.18 refuses unknown startup parameters.
        "ignore_startup_parameters": "extra_float_digits",
        "server_reset_query": "",
        "server_check_delay": "5",
        # A restarted server is found by the next transaction, not after a long login retry.
        "server_login_retry": "1",
        "logfile": str(folder / "pgbouncer.log"),
        "pidfile": str(folder / "pgbouncer.pid"),
        "admin_users": PG_SUPERUSER,
    }
    return ("# Written by `vecpipe services up --pgbouncer` on every start.\n"
            f"[databases]\n* = host=127.0.0.1 port={pg_port}\n\n[pgbouncer]\n"
            + "".join(f"{k} = {v}\n" for k, v in settings.items()))


def running_pgbouncer(paths: Paths) -> int | None:
    """The pid of this home's PgBouncer, from its pid file, while it runs."""
    try:
        pid = int((paths.pgbouncer_dir / "pgbouncer.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid, "pgbouncer") else None


def start_pgbouncer(paths: Paths, bin_dir: Path, port: int, pg_port: int,
                    progress: Callable[[str], None]) -> int:
    """Start PgBouncer (transaction pooling) on 127.0.0.1:``port`` in front of ``pg_port``;
    return its pid. ``bin_dir`` is PostgreSQL's (run as its user, like its tools)."""
    binary = pgbouncer_binary()
    folder = paths.pgbouncer_dir
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pgbouncer.ini").write_text(_pgbouncer_ini(paths, port, pg_port), encoding="utf-8")
    # trust still looks the user up in auth_file: the superuser the local URLs log in as.
    (folder / "userlist.txt").write_text(f'"{PG_SUPERUSER}" ""\n', encoding="utf-8")
    progress(f"Starting PgBouncer (transaction pooling) on 127.0.0.1:{port} "
             f"(log: {folder / 'pgbouncer.log'})")
    # -d: PgBouncer daemonises once it listens, and writes its pid file.
    pg_command(paths, bin_dir, [binary, "-d", str(folder / "pgbouncer.ini")],
               "Starting PgBouncer", _PGBOUNCER_START_S, target=folder,
               succeeded=lambda: running_pgbouncer(paths) is not None,
               owned=tuple(folder.iterdir()))
    deadline = time.monotonic() + _PGBOUNCER_START_S
    while time.monotonic() < deadline:
        pid = running_pgbouncer(paths)
        if pid is not None and port_open(port):
            return pid
        time.sleep(0.1)
    raise ServiceError(
        f"PgBouncer did not start listening on 127.0.0.1:{port} within "
        f"{_PGBOUNCER_START_S:.0f} s; see {folder / 'pgbouncer.log'}."
    )


def stop_pgbouncer(paths: Paths) -> None:
    """Stop this home's PgBouncer (SIGINT: it lets running transactions finish first)."""
    pid = running_pgbouncer(paths)
    if pid is None:
        return
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + 15
    while pid_alive(pid, "pgbouncer") and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid, "pgbouncer"):
        os.kill(pid, signal.SIGTERM)


def start_replica(paths: Paths, bin_dir: Path, port: int, pg_port: int,
                  progress: Callable[[str], None]) -> None:
    """Make a hot standby of the server on ``pg_port`` (once) and start it on ``port``."""
    if not (paths.replica / "PG_VERSION").exists():
        progress(f"Copying the server into a streaming replica {paths.replica} (pg_basebackup)")
        staging = paths.replica_staging

        def fresh_staging() -> None:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(mode=0o700)

        # -R writes standby.signal and primary_conninfo; -X stream copies the WAL the copy needs.
        command = [str(bin_dir / "pg_basebackup"), "-D", str(staging), "-h", "127.0.0.1",
                   "-p", str(pg_port), "-U", PG_SUPERUSER, "-X", "stream", "-R", "-c", "fast"]
        try:
            pg_command(paths, bin_dir, command, "pg_basebackup", 600, target=staging,
                       before=fresh_staging)
        except ServiceError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        os.replace(staging, paths.replica)
    write_postgres_settings(paths.replica)
    socket_dir = str(paths.replica) if len(str(paths.replica)) < 90 else ""
    options = f"-h 127.0.0.1 -p {port} -k {shlex.quote(socket_dir)}"
    progress(f"Starting the replica on 127.0.0.1:{port} (log: {paths.replica_log})")
    paths.replica_log.touch(exist_ok=True)
    command = [str(bin_dir / "pg_ctl"), "-D", str(paths.replica), "-l", str(paths.replica_log),
               "-w", "-t", str(POSTGRES_START_TIMEOUT_S), "-o", options, "start"]
    pg_command(paths, bin_dir, command, "Starting the replica", POSTGRES_START_TIMEOUT_S + 30,
               target=paths.replica, owned=(paths.replica_log,),
               succeeded=lambda: running_postmaster(paths.replica) is not None
               and port_open(port))


def stop_replica(paths: Paths, bin_dir: Path) -> None:
    """Stop the standby (fast shutdown); its data directory stays."""
    if running_postmaster(paths.replica) is None:
        return
    command = [str(bin_dir / "pg_ctl"), "-D", str(paths.replica), "-m", "fast", "-w",
               "-t", str(POSTGRES_STOP_TIMEOUT_S), "stop"]
    pg_command(paths, bin_dir, command, "Stopping the replica", POSTGRES_STOP_TIMEOUT_S + 30,
               target=paths.replica, succeeded=lambda: running_postmaster(paths.replica) is None)
