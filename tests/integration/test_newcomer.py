"""The newcomer's path on the real services: with no address in the environment, the CLI run in a
checkout finds the services its .vecpipe/services.json records (scripts/newcomer-check.sh runs
the whole `make demo` path from a fresh clone in CI)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import env_for, run_stage

pytestmark = pytest.mark.integration


def _checkout(tmp_path: Path, bootstrap: str, database_url: str) -> Path:
    """A folder below a checkout whose .vecpipe records these addresses, as `up` writes them."""
    home = tmp_path / "checkout" / ".vecpipe"
    home.mkdir(parents=True)
    # The pids of running services (this test's own stands in: the session's services are not
    # `up`'s, and a record whose services stopped is not followed).
    running = {"pid": os.getpid()}
    document = {"version": 1, "bootstrap": bootstrap, "database_url": database_url,
                "kafka": running, "postgres": running}
    (home / "services.json").write_text(json.dumps(document), encoding="utf-8")
    below = tmp_path / "checkout" / "docs"
    below.mkdir()
    return below


def _names_only(cfg: Any) -> dict[str, str]:
    """A newcomer's environment: this test's topic, group and schema names, and no address."""
    env = env_for(cfg)
    del env["VECPIPE_KAFKA_BOOTSTRAP"], env["VECPIPE_DATABASE_URL"]
    # This checkout's code, wherever the shared virtualenv's editable install points right now.
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return env


def _vecpipe(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vecpipe.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


def test_readme_commands_find_the_recorded_services(migrated: Any, tmp_path: Path) -> None:
    """produce, search, status and dlq inspect reach the recorded broker and database unaided."""
    cfg = migrated
    cwd = _checkout(tmp_path, cfg.kafka.bootstrap, cfg.database.url)
    env = _names_only(cfg)
    (cwd / "guide.md").write_text(
        "# Command lines\n\nargparse parses command line arguments into options.\n",
        encoding="utf-8")

    done = _vecpipe(cwd, env, "produce", "guide.md", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_stage("embed", cfg) == 0
    assert run_stage("write", cfg) == 0

    found = _vecpipe(cwd, env, "search", "parse command line arguments", "-k", "3")
    assert found.returncode == 0, found.stderr[-3000:]
    assert "  1. " in found.stdout and "guide" in found.stdout, found.stdout

    status = _vecpipe(cwd, env, "status")
    assert status.returncode == 0, status.stdout + status.stderr[-3000:]
    assert cfg.kafka.chunks_topic in status.stdout
    assert "database:" not in status.stdout, status.stdout  # the database answered too
    rows = [line.split() for line in status.stdout.splitlines() if line.startswith("default ")]
    assert rows and int(rows[0][1]) >= 1, status.stdout

    inspect = _vecpipe(cwd, env, "dlq", "inspect", "chunks")
    assert inspect.returncode == 0, inspect.stderr[-3000:]


def test_a_recorded_address_is_the_one_tried(migrated: Any, tmp_path: Path) -> None:
    """With the record naming a closed port, the error names that address and its variable."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = int(sock.getsockname()[1])
    url = f"postgresql://postgres@127.0.0.1:{closed}/vecpipe"
    cwd = _checkout(tmp_path, migrated.kafka.bootstrap, url)
    done = _vecpipe(cwd, _names_only(migrated), "search", "anything")
    assert done.returncode == 2
    assert f"127.0.0.1:{closed}" in done.stderr and "VECPIPE_DATABASE_URL" in done.stderr
    assert "Traceback" not in done.stderr
