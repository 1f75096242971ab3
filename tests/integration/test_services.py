"""Integration test of vecpipe.devservices: real Kafka and PostgreSQL started from a tmp home."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import psycopg
import pytest
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from vecpipe import devservices as services
from vecpipe.devservices import procs

pytestmark = pytest.mark.integration


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _topics(bootstrap: str) -> set[str]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    return set(admin.list_topics(timeout=30).topics)


def test_up_is_idempotent_down_keeps_data_and_purge_removes_it(tmp_path: Path) -> None:
    """up starts answering Kafka and pgvector, is idempotent, and down/up keeps topics and rows."""
    if shutil.which("java") is None:
        pytest.skip("Kafka needs `java` (17+) on PATH")
    home = tmp_path / "services"
    kafka_port, postgres_port = _free_ports(2)
    try:
        info = services.up(home, kafka_port=kafka_port, postgres_port=postgres_port)
        assert info.bootstrap == f"127.0.0.1:{kafka_port}"
        assert info.database_url == f"postgresql://postgres@127.0.0.1:{postgres_port}/vecpipe"
        assert info.kafka_running and info.postgres_running

        admin = AdminClient({"bootstrap.servers": info.bootstrap})
        created = admin.create_topics([NewTopic("vecpipe.test.services", 2, 1)])
        created["vecpipe.test.services"].result(timeout=30)
        assert "vecpipe.test.services" in _topics(info.bootstrap)

        with psycopg.connect(info.database_url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            row = conn.execute(
                "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
            ).fetchone()
            assert row is not None and str(row[0]).startswith("0.8")
            distance = conn.execute("SELECT '[1,2,3]'::vector <-> '[1,2,4]'::vector").fetchone()
            assert distance == (1.0,)
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (42)")

        assert services.up(home) == info
        assert services.status(home) == info

        services.down(home)
        stopped = services.status(home)
        assert not stopped.kafka_running and not stopped.postgres_running
        assert not procs.port_open(kafka_port) and not procs.port_open(postgres_port)

        again = services.up(home)
        assert again == info
        assert "vecpipe.test.services" in _topics(again.bootstrap)
        with psycopg.connect(again.database_url) as conn:
            assert conn.execute("SELECT x FROM kept").fetchall() == [(42,)]
    finally:
        services.down(home, purge=True)
    assert not (home / "kafka").exists() and not (home / "postgres").exists()
    assert not (home / "services.json").exists()
