"""Unit tests of vecpipe.logs: JSON lines on stderr, and secrets never printed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from vecpipe.logs import configure_logging, get_logger, redact

SECRETS = ("s3cr3t-db-pw", "pw-kw-4711", "sasl-pw-0815", "kv-pw-abc")


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Leave structlog as other tests expect it: defaults, no bound context."""
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_lines_never_contain_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    """A URL password, secret-named keys, nested librdkafka secrets and password=... in the
    message are all masked before the JSON line is written."""
    configure_logging("json", stage="write", worker_id="w-1")
    log = get_logger()
    log.info(
        f"connecting with password={SECRETS[3]} to the database",
        database_url=f"postgresql://u:{SECRETS[0]}@h/db",
        password=SECRETS[1],
        client={"sasl.password": SECRETS[2], "sasl.username": "alice",
                "bootstrap.servers": "b:9092"},
    )
    err = capsys.readouterr().err
    for secret in SECRETS:
        assert secret not in err
    [line] = _lines(err)
    assert line["database_url"] == "postgresql://u:***@h/db"
    assert line["password"] == "***"
    assert line["client"]["sasl.password"] == "***"
    assert line["client"]["bootstrap.servers"] == "b:9092"
    assert line["event"] == "connecting with password=*** to the database"
    assert (line["stage"], line["worker_id"], line["level"]) == ("write", "w-1", "info")
    assert "timestamp" in line


def test_secrets_in_lists_and_exceptions_are_masked(capsys: pytest.CaptureFixture[str]) -> None:
    """URLs inside lists and in a logged exception's traceback are masked too."""
    configure_logging("json")
    log = get_logger(component="pool")
    log.warning("targets", urls=[f"postgres://app:{SECRETS[0]}@db:5432/x", "kafka:9092"])
    try:
        raise ConnectionError(f"cannot reach postgresql://app:{SECRETS[0]}@db/x")
    except ConnectionError:
        log.exception("connect_failed")
    err = capsys.readouterr().err
    assert SECRETS[0] not in err
    first, second = _lines(err)
    assert first["urls"] == ["postgres://app:***@db:5432/x", "kafka:9092"]
    assert first["component"] == "pool"
    assert "postgresql://app:***@db/x" in second["exception"]


def test_every_line_is_json(capsys: pytest.CaptureFixture[str]) -> None:
    """Each event is one JSON object per line; levels below the configured one are dropped."""
    configure_logging("json", level="warning")
    log = get_logger()
    log.debug("hidden")
    log.info("hidden too")
    log.warning("first", n=1)
    log.error("second", token="t-999")
    lines = _lines(capsys.readouterr().err)
    assert [line["event"] for line in lines] == ["first", "second"]
    assert lines[1]["token"] == "***"


def test_console_format_masks_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    """The terminal renderer gets the same masking."""
    configure_logging("console")
    get_logger().info("start", database_url=f"postgresql://u:{SECRETS[0]}@h/db")
    err = capsys.readouterr().err
    assert SECRETS[0] not in err
    assert "postgresql://u:***@h/db" in err


def test_redact_processor() -> None:
    """redact masks secret-named keys at any depth and leaves other values alone."""
    event: dict[str, Any] = {
        "event": "x", "api_token": "abc", "nested": {"ssl.key.password": "k", "n": 1},
        "count": 3, "dsn": "host=h password=pw1 user=u",
    }
    out = redact(None, "info", event)
    assert out["api_token"] == "***"
    assert out["nested"] == {"ssl.key.password": "***", "n": 1}
    assert out["count"] == 3
    assert out["dsn"] == "host=h password=*** user=u"
