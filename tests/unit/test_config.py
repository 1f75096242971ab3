"""Unit tests of vecpipe.config: defaults, layering of file, environment and flags, and errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from vecpipe.config import Config, env_var_names, load_config, redact_text, redact_url, validate
from vecpipe.errors import ConfigError
from vecpipe.kafka.settings import admin_config, consumer_config


def _toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "vecpipe.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_defaults_validate() -> None:
    """The built-in defaults form a valid configuration without any file or variable."""
    cfg = load_config(environ={})
    assert validate(Config()) is not None
    assert cfg.vector.dimension == 384
    assert cfg.vector.metric == "cosine"
    assert cfg.vector.normalize is True
    assert cfg.kafka.dlq_topic(cfg.kafka.chunks_topic) == "vecpipe.chunks.dlq"
    assert cfg.kafka.client == {}


def test_environment_is_read_only_from_the_given_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit ``environ`` hides the process environment completely."""
    monkeypatch.setenv("VECPIPE_METRIC", "l2")
    assert load_config(environ={}).vector.metric == "cosine"
    assert load_config().vector.metric == "l2"


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    """The file is overridden by the environment, which is overridden by flags."""
    path = _toml(tmp_path, "[embed]\nbatch_size = 10\nbatch_tokens = 1000\n")
    env = {"VECPIPE_EMBED_BATCH_SIZE": "20"}
    assert load_config(environ={}, config_file=path).embed.batch_size == 10
    assert load_config(environ=env, config_file=path).embed.batch_size == 20
    cfg = load_config(overrides={"embed": {"batch_size": 30}}, environ=env, config_file=path)
    assert cfg.embed.batch_size == 30
    # A setting only the file gives survives the layers above it.
    assert cfg.embed.batch_tokens == 1000


def test_none_overrides_do_not_hide_the_environment() -> None:
    """An unset flag (None) leaves the environment's value in place."""
    cfg = load_config(overrides={"vector": {"metric": None}},
                      environ={"VECPIPE_METRIC": "ip"})
    assert cfg.vector.metric == "ip"


def test_config_file_named_by_environment(tmp_path: Path) -> None:
    """VECPIPE_CONFIG names the TOML file when no file is passed."""
    path = _toml(tmp_path, '[vector]\nmetric = "l2"\n')
    assert load_config(environ={"VECPIPE_CONFIG": path}).vector.metric == "l2"


def test_toml_sections_are_typed(tmp_path: Path) -> None:
    """Every TOML section lands in its dataclass with the declared types."""
    path = _toml(tmp_path, """
[kafka]
bootstrap = "broker:29092"
partitions = 8

[kafka.client]
"security.protocol" = "SASL_SSL"

[database]
schema = "tenant_a"

[vector]
dimension = 768
metric = "ip"
column_type = "halfvec"

[embed]
reuse_vectors = false

[retry]
initial_wait_s = 0.5

[dead_letter]
max_ratio = 0.25

[ops]
log_format = "json"
""")
    cfg = load_config(environ={}, config_file=path)
    assert cfg.kafka.bootstrap == "broker:29092"
    assert cfg.kafka.partitions == 8
    assert cfg.kafka.client == {"security.protocol": "SASL_SSL"}
    assert admin_config(cfg.kafka)["security.protocol"] == "SASL_SSL"
    assert cfg.database.schema == "tenant_a"
    assert (cfg.vector.dimension, cfg.vector.metric, cfg.vector.column_type) == (
        768, "ip", "halfvec")
    assert cfg.embed.reuse_vectors is False
    assert cfg.retry.initial_wait_s == 0.5
    assert cfg.dead_letter.max_ratio == 0.25
    assert cfg.ops.log_format == "json"


def test_environment_strings_are_coerced() -> None:
    """Numbers and booleans given as text in the environment become int, float and bool."""
    cfg = load_config(environ={
        "VECPIPE_DIMENSION": "1_024",
        "VECPIPE_RETRY_MAX_WAIT_S": "2.5",
        "VECPIPE_EMBED_REUSE_VECTORS": "off",
        "VECPIPE_TOPIC_CHUNKS": "team.chunks",
    })
    assert cfg.vector.dimension == 1024
    assert cfg.retry.max_wait_s == 2.5
    assert cfg.embed.reuse_vectors is False
    assert cfg.kafka.chunks_topic == "team.chunks"


def test_kafka_passthrough_variables() -> None:
    """VECPIPE_KAFKA__SASL_USERNAME becomes the librdkafka setting sasl.username."""
    cfg = load_config(environ={
        "VECPIPE_KAFKA__SASL_USERNAME": "alice",
        "VECPIPE_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
    })
    assert cfg.kafka.client == {"sasl.username": "alice", "security.protocol": "SASL_SSL"}
    conf = consumer_config(cfg.kafka, "g")
    assert conf["sasl.username"] == "alice"
    assert conf["bootstrap.servers"] == cfg.kafka.bootstrap
    assert conf["group.id"] == "g"


def test_passthrough_variables_join_the_file_client_table(tmp_path: Path) -> None:
    """Pass-through variables add to, and win over, the file's [kafka.client] table."""
    path = _toml(tmp_path, '[kafka.client]\n"sasl.username" = "file"\n"acks" = "all"\n')
    cfg = load_config(environ={"VECPIPE_KAFKA__SASL_USERNAME": "env"}, config_file=path)
    assert cfg.kafka.client == {"sasl.username": "env", "acks": "all"}


@pytest.mark.parametrize(
    ("environ", "setting", "env_var"),
    [
        ({"VECPIPE_METRIC": "hamming"}, "vector.metric", "VECPIPE_METRIC"),
        ({"VECPIPE_DIMENSION": "0"}, "vector.dimension", "VECPIPE_DIMENSION"),
        ({"VECPIPE_DIMENSION": "16001"}, "vector.dimension", "VECPIPE_DIMENSION"),
        ({"VECPIPE_DIMENSION": "many"}, "vector.dimension", "VECPIPE_DIMENSION"),
        ({"VECPIPE_EMBED_BATCH_SIZE": "-1"}, "embed.batch_size", "VECPIPE_EMBED_BATCH_SIZE"),
        ({"VECPIPE_EMBED_BATCH_SIZE": "1.5"}, "embed.batch_size", "VECPIPE_EMBED_BATCH_SIZE"),
        ({"VECPIPE_WRITE_BATCH_SIZE": "0"}, "write.batch_size", "VECPIPE_WRITE_BATCH_SIZE"),
        ({"VECPIPE_EMBED_REUSE_VECTORS": "maybe"}, "embed.reuse_vectors",
         "VECPIPE_EMBED_REUSE_VECTORS"),
        ({"VECPIPE_TOPIC_CHUNKS": "bad topic"}, "kafka.chunks_topic", "VECPIPE_TOPIC_CHUNKS"),
        ({"VECPIPE_TOPIC_EMBEDDINGS": "x" * 250}, "kafka.embeddings_topic",
         "VECPIPE_TOPIC_EMBEDDINGS"),
        ({"VECPIPE_TENANT": "acme/eu"}, "produce.tenant", "VECPIPE_TENANT"),
        ({"VECPIPE_TENANT": "  "}, "produce.tenant", "VECPIPE_TENANT"),
        ({"VECPIPE_PRODUCE_CHUNK_SIZE": "64", "VECPIPE_PRODUCE_CHUNK_OVERLAP": "64"},
         "produce.chunk_overlap", "VECPIPE_PRODUCE_CHUNK_OVERLAP"),
        ({"VECPIPE_DB_SCHEMA": "Bad-Schema"}, "database.schema", "VECPIPE_DB_SCHEMA"),
        ({"VECPIPE_DATABASE_URL": "mysql://h/db"}, "database.url", "VECPIPE_DATABASE_URL"),
        ({"VECPIPE_DEVICE": "tpu"}, "model.device", "VECPIPE_DEVICE"),
        ({"VECPIPE_DEAD_LETTER_MAX_RATIO": "1.5"}, "dead_letter.max_ratio",
         "VECPIPE_DEAD_LETTER_MAX_RATIO"),
        ({"VECPIPE_METRICS_PORT": "70000"}, "ops.metrics_port", "VECPIPE_METRICS_PORT"),
        ({"VECPIPE_LOG_LEVEL": "loud"}, "ops.log_level", "VECPIPE_LOG_LEVEL"),
        pytest.param(
            {"VECPIPE_DIMENSION": "3000"}, "vector.dimension", "VECPIPE_DIMENSION",
            id="dimension-too-large-for-index"),
        pytest.param(
            {"VECPIPE_DATABASE_APP_ROLE": "Bad Role"}, "database.app_role",
            "VECPIPE_DATABASE_APP_ROLE",
            id="app-role"),
        pytest.param(
            {"VECPIPE_DATABASE_STATEMENT_TIMEOUT_MS": "-1"}, "database.statement_timeout_ms",
            "VECPIPE_DATABASE_STATEMENT_TIMEOUT_MS",
            id="statement-timeout"),
        pytest.param(
            {"VECPIPE_VECTOR_HNSW_EF_CONSTRUCTION": "4"}, "vector.hnsw_ef_construction",
            "VECPIPE_VECTOR_HNSW_EF_CONSTRUCTION",
            id="ef-construction"),
    ],
)
def test_bad_value_names_setting_and_variable(
    environ: dict[str, str], setting: str, env_var: str
) -> None:
    """A bad value stops loading with a ConfigError naming the setting and its variable."""
    with pytest.raises(ConfigError) as info:
        load_config(environ=environ)
    message = str(info.value)
    assert setting in message
    assert env_var in message


def test_bad_value_message_quotes_the_value() -> None:
    """The error says which value was wrong."""
    with pytest.raises(ConfigError, match="'hamming'"):
        load_config(environ={"VECPIPE_METRIC": "hamming"})
    with pytest.raises(ConfigError, match=r"whole number.*'many'"):
        load_config(environ={"VECPIPE_DIMENSION": "many"})


def test_bad_value_in_file_names_setting_and_variable(tmp_path: Path) -> None:
    """A wrongly typed value in the TOML file names the setting and its variable."""
    path = _toml(tmp_path, '[embed]\nbatch_size = "lots"\n')
    with pytest.raises(ConfigError, match=r"embed\.batch_size \(VECPIPE_EMBED_BATCH_SIZE\)"):
        load_config(environ={}, config_file=path)


def test_bad_override_names_setting() -> None:
    """A bad flag value is checked like any other."""
    with pytest.raises(ConfigError, match=r"vector\.metric \(VECPIPE_METRIC\)"):
        load_config(overrides={"vector": {"metric": "manhattan"}}, environ={})


def test_unknown_section_in_file(tmp_path: Path) -> None:
    """An unknown [section] in the file is named, with the known ones."""
    path = _toml(tmp_path, "[embedder]\nbatch_size = 4\n")
    with pytest.raises(ConfigError, match=r"Unknown section \[embedder\].*embed"):
        load_config(environ={}, config_file=path)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    """An unknown key is named as section.key, with the known ones."""
    path = _toml(tmp_path, "[embed]\nbatch = 4\n")
    with pytest.raises(ConfigError, match=r"Unknown setting embed\.batch.*batch_size"):
        load_config(environ={}, config_file=path)


def test_unknown_key_in_overrides() -> None:
    """An unknown flag key is refused like an unknown file key."""
    with pytest.raises(ConfigError, match=r"Unknown setting embed\.batch\b"):
        load_config(overrides={"embed": {"batch": 4}}, environ={})


def test_unknown_section_in_overrides() -> None:
    """An unknown section in the overrides is a ConfigError, not a KeyError."""
    with pytest.raises(ConfigError, match="embedder"):
        load_config(overrides={"embedder": {"batch_size": 4}}, environ={})


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    """A missing file or invalid TOML is a ConfigError naming the file."""
    missing = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match=r"absent\.toml"):
        load_config(environ={"VECPIPE_CONFIG": missing})
    broken = _toml(tmp_path, "[embed\nbatch_size = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(environ={}, config_file=broken)


@pytest.mark.parametrize("value", ['"sasl.username=x"', "5"])
def test_client_must_be_a_table(tmp_path: Path, value: str) -> None:
    """kafka.client given as a plain value is refused with a ConfigError naming it."""
    path = _toml(tmp_path, f"[kafka]\nclient = {value}\n")
    with pytest.raises(ConfigError, match=r"kafka\.client"):
        load_config(environ={}, config_file=path)


def test_env_var_names_contains_aliases_and_long_forms() -> None:
    """env_var_names lists the short aliases, long forms of the rest, and VECPIPE_CONFIG."""
    names = env_var_names()
    for alias in ("VECPIPE_KAFKA_BOOTSTRAP", "VECPIPE_DATABASE_URL", "VECPIPE_DB_SCHEMA",
                  "VECPIPE_TOPIC_CHUNKS", "VECPIPE_TOPIC_EMBEDDINGS", "VECPIPE_MODEL",
                  "VECPIPE_DEVICE", "VECPIPE_BACKEND", "VECPIPE_DIMENSION", "VECPIPE_METRIC",
                  "VECPIPE_TENANT", "VECPIPE_LOG_FORMAT", "VECPIPE_LOG_LEVEL",
                  "VECPIPE_METRICS_PORT", "VECPIPE_WORKER_ID", "VECPIPE_HOME"):
        assert alias in names
    assert {"VECPIPE_CONFIG", "VECPIPE_EMBED_BATCH_SIZE", "VECPIPE_WRITE_BATCH_SIZE",
            "VECPIPE_OPS_SHUTDOWN_GRACE_S", "VECPIPE_VECTOR_COLUMN_TYPE"} <= names
    assert "VECPIPE_KAFKA_CLIENT" not in names


def test_ops_aliases_are_read() -> None:
    """The short aliases VECPIPE_WORKER_ID and VECPIPE_HOME set the ops section."""
    cfg = load_config(environ={"VECPIPE_WORKER_ID": "w-1", "VECPIPE_HOME": "/srv/vecpipe"})
    assert cfg.ops.worker_id == "w-1"
    assert cfg.ops.home == "/srv/vecpipe"


def test_long_form_of_aliased_setting_is_read() -> None:
    """VECPIPE_VECTOR_METRIC works like its alias VECPIPE_METRIC (or is refused), never ignored."""
    cfg = load_config(environ={"VECPIPE_VECTOR_METRIC": "l2", "VECPIPE_VECTOR_DIMENSION": "768"})
    assert cfg.vector.metric == "l2"
    assert cfg.vector.dimension == 768


@pytest.mark.parametrize(("variable", "value", "says"), [
    ("VECPIPE_KAFKA__ENABLE_AUTO_OFFSET_STORE", "true", "enable.auto.offset.store=true"),
    ("VECPIPE_KAFKA__ACKS", "1", "acks=1"),
    ("VECPIPE_KAFKA__ENABLE_IDEMPOTENCE", "false", "enable.idempotence=false"),
])
def test_pass_through_settings_cannot_switch_a_guarantee_off(variable: str, value: str,
                                                            says: str) -> None:
    """librdkafka settings pass through unchanged, except those that would break 'nothing
    lost' or 'nothing duplicated': they stop the process at start with a sentence."""
    with pytest.raises(ConfigError, match=rf"kafka\.client \(VECPIPE_KAFKA__\*\) sets {says}"):
        load_config(environ={variable: value})
    assert load_config(environ={"VECPIPE_KAFKA__ACKS": "all"}).kafka.client == {"acks": "all"}


@pytest.mark.parametrize("url", [
    "postgresql://vecpipe:hunter2@db:5432/vecpipe",
    "postgresql://vecpipe:hun@ter:2@db:5432/vecpipe",
    "postgresql://vecpipe@db/vecpipe?sslmode=require&password=hunter2",
    "host=db user=vecpipe password=hunter2 dbname=vecpipe",
    "host=db user=vecpipe password='hunter2 with spaces' dbname=vecpipe",
])
def test_passwords_never_reach_a_message(url: str) -> None:
    """A database password is masked in every form a URL can take: user:password@ (even with
    an @ in it), ?password= and a key=value connection string."""
    assert "hunter2" not in redact_url(url) and "***" in redact_url(url)
    assert "hunter2" not in redact_text(f"cannot connect to {url} now")


def test_a_mistyped_scheme_is_reported_without_the_password() -> None:
    """The error for a URL that is no PostgreSQL URL names the setting, not the password."""
    with pytest.raises(ConfigError) as info:
        load_config(environ={"VECPIPE_DATABASE_URL": "postgresqll://vecpipe:hunter2@db/x"})
    assert "database.url" in str(info.value) and "hunter2" not in str(info.value)
