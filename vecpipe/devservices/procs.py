"""Processes and ports: is a pid alive (and still ours), is a port free, start one detached."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from vecpipe.devservices.state import Paths
from vecpipe.errors import ServiceError

__all__ = [
    "choose_port",
    "free_port",
    "last_error",
    "pid_alive",
    "port_free",
    "port_open",
    "require_free_port",
    "spawn_detached",
]


def port_open(port: int, timeout: float = 0.5) -> bool:
    """Return whether something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def port_free(port: int) -> bool:
    """Return whether a server could listen on 127.0.0.1:port now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Servers set SO_REUSEADDR too, so a port held only by TIME_WAIT leftovers counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(taken: set[int]) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in taken:
            return port


def choose_port(
    given: int | None, recorded: int | None, default: int | None, taken: set[int]
) -> int:
    """Pick the port given, else the recorded one, else the default if free, else any free one."""
    if given is not None:
        return given
    if recorded:
        return recorded
    if default is not None and default not in taken and port_free(default):
        return default
    return free_port(taken)


def require_free_port(port: int, what: str, paths: Paths) -> None:
    if not port_free(port):
        raise ServiceError(
            f"Port {port} for {what} is in use by another program; stop that program, or pass "
            f"another port to `vecpipe services up`, or run `vecpipe services down --purge` "
            f"to forget the ports recorded in {paths.state}."
        )


def pid_alive(pid: int, marker: str | None = None) -> bool:
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


def spawn_detached(command: list[str], log: Path, cwd: Path) -> int:
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


def last_error(log: Path) -> str:
    """Return the last ERROR or exception line of a log, for an error message."""
    try:
        lines = log.read_text(errors="replace").splitlines()[-400:]
    except OSError:
        return ""
    for line in reversed(lines):
        if " ERROR " in line or "Exception" in line or line.startswith("Error"):
            return line.strip()[:300]
    return ""
