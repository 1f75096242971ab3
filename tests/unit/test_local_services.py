"""The newcomer's path without services: the CLI's defaults come from the local services' record,
explicit settings win, production keeps its defaults, and bin/vecpipe runs the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vecpipe.cli.common import config_from_args
from vecpipe.cli.main import build_parser
from vecpipe.cli.services import reach
from vecpipe.config import Config, OpsConfig, find_local_home, load_config, recorded_services
from vecpipe.devservices import state as dev_state

REPO = Path(__file__).resolve().parents[2]
DEFAULTS = load_config(environ={})


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No VECPIPE_* variable: what a newcomer's shell has."""
    for name in list(os.environ):
        if name.startswith("VECPIPE_"):
            monkeypatch.delenv(name)


def _record(home: Path, kafka_port: int, postgres_port: int, *, running: bool = True) -> None:
    """What `vecpipe services up` writes into ``home`` (the pids of running services: this
    process stands in for both), or what `down` leaves (no pids)."""
    home.mkdir(parents=True, exist_ok=True)
    pid = os.getpid() if running else None
    state = dev_state.State(kafka_port, kafka_port + 1, postgres_port, kafka_pid=pid,
                            postgres_pid=pid)
    dev_state.write_state(dev_state.Paths(home), state)


def _cli_config(*argv: str) -> Config:
    return config_from_args(build_parser().parse_args(list(argv)))


def test_cli_in_a_checkout_uses_the_services_make_demo_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: None
) -> None:
    """From the checkout or a folder below it, the CLI reads the addresses `up` recorded."""
    checkout = tmp_path / "checkout"
    _record(checkout / ".vecpipe", 19092, 15432)
    (checkout / "docs" / "deep").mkdir(parents=True)
    monkeypatch.chdir(checkout / "docs" / "deep")
    cfg = _cli_config("status")
    assert cfg.kafka.bootstrap == "127.0.0.1:19092"
    assert cfg.database.url == "postgresql://postgres@127.0.0.1:15432/vecpipe"
    assert cfg.ops.home == str(checkout / ".vecpipe")
    # What `vecpipe services status --env` prints is exactly what the CLI now takes by itself.
    info = dev_state.info(dev_state.Paths(checkout / ".vecpipe"),
                          dev_state.State(19092, 19093, 15432),
                          kafka_running=False, postgres_running=False)
    assert (cfg.kafka.bootstrap, cfg.database.url) == (info.bootstrap, info.database_url)


def test_explicit_settings_win_over_the_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: None
) -> None:
    """A variable, a TOML file or a flag giving either address turns the record off for both:
    never a production broker with a laptop's database."""
    _record(tmp_path / ".vecpipe", 19092, 15432)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VECPIPE_KAFKA_BOOTSTRAP", "broker:29092")
    cfg = _cli_config("status")
    assert cfg.kafka.bootstrap == "broker:29092"
    assert cfg.database.url == DEFAULTS.database.url

    monkeypatch.delenv("VECPIPE_KAFKA_BOOTSTRAP")
    cfg = _cli_config("status", "--database-url", "postgresql://app@db:5432/prod")
    assert cfg.database.url == "postgresql://app@db:5432/prod"
    assert cfg.kafka.bootstrap == DEFAULTS.kafka.bootstrap

    toml = tmp_path / "vecpipe.toml"
    toml.write_text('[kafka]\nbootstrap = "file-broker:9092"\n', encoding="utf-8")
    cfg = _cli_config("--config", str(toml), "status")
    assert cfg.kafka.bootstrap == "file-broker:9092"
    assert cfg.database.url == DEFAULTS.database.url

    monkeypatch.setenv("VECPIPE_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    cfg = _cli_config("status")
    assert (cfg.kafka.bootstrap, cfg.database.url) == (DEFAULTS.kafka.bootstrap,
                                                      DEFAULTS.database.url)


def test_the_record_of_stopped_services_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: None
) -> None:
    """After `services down` the ports may be another checkout's services by now."""
    _record(tmp_path / ".vecpipe", 19092, 15432, running=False)
    monkeypatch.chdir(tmp_path)
    cfg = _cli_config("status")
    assert (cfg.kafka.bootstrap, cfg.database.url) == (DEFAULTS.kafka.bootstrap,
                                                      DEFAULTS.database.url)


def test_following_the_record_says_so_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: None,
    capsys: pytest.CaptureFixture[str]
) -> None:
    _record(tmp_path / ".vecpipe", 19092, 15432)
    monkeypatch.chdir(tmp_path)
    _cli_config("status")
    err = capsys.readouterr().err
    assert "using the local services recorded in" in err and "127.0.0.1:19092" in err


def test_an_explicit_home_is_the_one_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: None
) -> None:
    """VECPIPE_HOME names the home to read, even from inside another checkout."""
    _record(tmp_path / "checkout" / ".vecpipe", 19092, 15432)
    _record(tmp_path / "elsewhere", 29092, 25432)
    monkeypatch.chdir(tmp_path / "checkout")
    monkeypatch.setenv("VECPIPE_HOME", str(tmp_path / "elsewhere"))
    cfg = _cli_config("dlq", "inspect", "chunks")
    assert cfg.kafka.bootstrap == "127.0.0.1:29092"
    assert cfg.database.url == "postgresql://postgres@127.0.0.1:25432/vecpipe"
    assert cfg.ops.home == str(tmp_path / "elsewhere")


def test_without_a_record_the_defaults_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: None
) -> None:
    """Production (no local services anywhere) gets the same defaults as before."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VECPIPE_HOME", str(tmp_path / "never-started"))
    cfg = _cli_config("status")
    assert cfg.kafka.bootstrap == DEFAULTS.kafka.bootstrap == "127.0.0.1:9092"
    assert cfg.database.url == DEFAULTS.database.url
    assert find_local_home(tmp_path) is None


def test_a_purged_checkout_keeps_its_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: None
) -> None:
    """After `services down --purge` the checkout's .vecpipe stays the home, with no record."""
    (tmp_path / ".vecpipe").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = _cli_config("services", "up")
    assert cfg.ops.home == str(tmp_path / ".vecpipe")
    assert cfg.kafka.bootstrap == DEFAULTS.kafka.bootstrap
    assert cfg.database.url == DEFAULTS.database.url


def test_the_library_api_never_reads_a_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: None
) -> None:
    """load_config without local_services (tests, the Python API) ignores the working folder."""
    _record(tmp_path / ".vecpipe", 19092, 15432)
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert cfg.kafka.bootstrap == DEFAULTS.kafka.bootstrap
    assert cfg.ops.home == DEFAULTS.ops.home


@pytest.mark.parametrize("content", ["{not json", '{"bootstrap": 1}', "[]", '{"kafka": {}}'])
def test_a_damaged_record_leaves_the_defaults(tmp_path: Path, content: str) -> None:
    """A services.json the CLI cannot read adds nothing (`services status` reports it)."""
    (tmp_path / "services.json").write_text(content, encoding="utf-8")
    assert recorded_services(tmp_path) == {}
    assert recorded_services(tmp_path / "missing") == {}


def test_services_up_says_who_finds_them(tmp_path: Path) -> None:
    """`services up` says in one line which commands reach its services unaided."""
    checkout_home = tmp_path / "checkout" / ".vecpipe"
    assert str(tmp_path / "checkout") in reach(checkout_home)
    assert f"VECPIPE_HOME={checkout_home}" in reach(checkout_home)
    assert "by themselves" in reach(Path(OpsConfig.home).expanduser().resolve())
    assert f"VECPIPE_HOME={tmp_path / 'x'}" in reach(tmp_path / "x")


# -- bin/vecpipe ----------------------------------------------------------------------------------

_FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*" >> "{log}"
if [[ "$1" == "-I" ]]; then echo "{points_at}/vecpipe/__init__.py"; fi
"""
_FAKE_VECPIPE = """#!/usr/bin/env bash
echo "home=${VECPIPE_HOME:-} args=$*"
"""


def _checkout_with_fake_venv(tmp_path: Path, points_at: str) -> tuple[Path, Path, Path]:
    """A copy of the wrapper, Makefile and pyproject.toml, and a fake virtualenv for it."""
    if shutil.which("make") is None and os.environ.get("CI") != "true":
        pytest.skip("make is not installed")
    checkout = tmp_path / "checkout"
    (checkout / "bin").mkdir(parents=True)
    for name in ("bin/vecpipe", "Makefile", "pyproject.toml"):
        shutil.copy2(REPO / name, checkout / name)
    cache = tmp_path / "cache"
    venv_path = subprocess.run(
        ["make", "-s", "--no-print-directory", "-C", str(checkout), "venv-path"],
        env={**os.environ, "VECPIPE_CACHE": str(cache)},
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    venv = Path(venv_path)
    assert venv.parent == cache
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls.log"
    where = str(checkout) if points_at == "here" else points_at
    for name, body in (("python", _FAKE_PYTHON.format(log=log, points_at=where)),
                       ("vecpipe", _FAKE_VECPIPE)):
        (venv / "bin" / name).write_text(body, encoding="utf-8")
        (venv / "bin" / name).chmod(0o755)
    (venv / ".installed").touch()
    stamp_time = (checkout / "pyproject.toml").stat().st_mtime + 10
    os.utime(venv / ".installed", (stamp_time, stamp_time))
    return checkout, cache, log


def _run_wrapper(checkout: Path, cache: Path, *args: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VECPIPE_")}
    done = subprocess.run(
        [str(checkout / "bin" / "vecpipe"), *args],
        env={**environ, "VECPIPE_CACHE": str(cache), **env},
        capture_output=True, text=True, timeout=60, check=True,
    )
    return done.stdout.strip()


def test_wrapper_runs_the_checkout_with_its_home(tmp_path: Path) -> None:
    """bin/vecpipe execs the virtualenv's vecpipe with the checkout's .vecpipe as the home."""
    checkout, cache, log = _checkout_with_fake_venv(tmp_path, "here")
    out = _run_wrapper(checkout, cache, "search", "two words", "-k", "3")
    assert out == f"home={checkout / '.vecpipe'} args=search two words -k 3"
    assert "-m pip" not in log.read_text()  # installed and pointing here: nothing to do

    assert _run_wrapper(checkout, cache, "status", VECPIPE_HOME="/srv/h") == \
        "home=/srv/h args=status"
    assert _run_wrapper(checkout, cache, "--config", "x.toml", "status") == \
        "home= args=--config x.toml status"


def test_wrapper_repoints_an_install_of_another_checkout(tmp_path: Path) -> None:
    """When the shared virtualenv runs another checkout's code, bin/vecpipe re-points it, and
    only that: no dependencies, no make (which could rebuild or delete virtualenvs)."""
    checkout, cache, log = _checkout_with_fake_venv(tmp_path, "/elsewhere")
    os.utime(checkout / "pyproject.toml")  # newer than the stamp, as after a git pull
    out = _run_wrapper(checkout, cache, "status")
    assert out == f"home={checkout / '.vecpipe'} args=status"
    calls = log.read_text()
    assert f"-m pip install -qq --no-deps --no-build-isolation -e {checkout}" in calls
    assert "-m pip install -q " not in calls and "--upgrade" not in calls


# -- librdkafka's log lines -----------------------------------------------------------------------

@pytest.fixture
def just_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process started a moment ago (retriable lines are left out only in its first
    minute)."""
    import time

    from vecpipe.kafka import settings

    monkeypatch.setattr(settings, "_STARTED", time.monotonic())


def test_librdkafka_lines_skip_only_what_it_retries(capsys: pytest.CaptureFixture[str],
                                                    just_started: None) -> None:
    """Coordinator-loading retries are left out; real errors still reach stderr, redacted."""
    import structlog

    from vecpipe.kafka.settings import LIBRDKAFKA_LOG, consumer_config, producer_config

    structlog.reset_defaults()  # a command that set up no logging: librdkafka's own format

    cfg = DEFAULTS.kafka
    assert consumer_config(cfg, "g")["logger"] is LIBRDKAFKA_LOG
    assert producer_config(cfg)["logger"] is LIBRDKAFKA_LOG
    LIBRDKAFKA_LOG.warning(
        "COMMITFAIL [rdkafka#consumer-1] [thrd:main]: Offset commit (manual) failed for 1/1 "
        "partition(s) in join-state wait-join: Broker: Coordinator load in progress")
    LIBRDKAFKA_LOG.error("OFFSETFETCH [rdkafka#consumer-1]: Group coordinator not available")
    assert capsys.readouterr().err == ""
    LIBRDKAFKA_LOG.error(
        "FAIL [rdkafka#producer-1]: sasl://u:hunter2@broker:9093: SASL authentication error")
    err = capsys.readouterr().err
    assert err.startswith("librdkafka error: FAIL [rdkafka#producer-1]")
    assert "SASL authentication error" in err and "hunter2" not in err


def test_librdkafka_lines_join_a_workers_structured_log(capsys: pytest.CaptureFixture[str],
                                                        just_started: None) -> None:
    """In a worker, a librdkafka line is a JSON event with the worker's context, redacted."""
    import json

    from vecpipe.kafka.settings import LIBRDKAFKA_LOG
    from vecpipe.logs import configure_logging

    configure_logging("json", stage="embed", worker_id="w-1")
    LIBRDKAFKA_LOG.warning("JOINGROUP [rdkafka#consumer-1]: Broker: Coordinator load in progress")
    LIBRDKAFKA_LOG.error("FAIL [rdkafka#consumer-1]: postgres://u:hunter2@db/x refused")
    [line] = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert (line["event"], line["level"], line["stage"]) == ("librdkafka", "error", "embed")
    assert "refused" in line["line"] and "hunter2" not in line["line"]


def test_a_home_with_ports_of_its_own_leaves_the_default_controller_port() -> None:
    """Only a broker on 9092 takes 9093 for its controller; others take a free port."""
    from vecpipe import devservices
    from vecpipe.devservices import procs

    assert devservices.controller_default(9092) == 9093
    assert devservices.controller_default(41234) is None
    chosen = procs.choose_port(None, None, None, {9093})
    assert chosen != 9093 and procs.port_free(chosen)


def test_a_broker_that_is_down_is_said_once(capsys: pytest.CaptureFixture[str]) -> None:
    """librdkafka's reconnect attempts, every 50 ms while a broker is down, print one line."""
    import structlog

    from vecpipe.kafka.settings import LIBRDKAFKA_LOG

    structlog.reset_defaults()
    for after in (0, 1, 3):
        LIBRDKAFKA_LOG.error(
            "FAIL [rdkafka#consumer-7] [thrd:127.0.0.1:1/bootstrap]: 127.0.0.1:1/bootstrap: "
            f"Connect to ipv4#127.0.0.1:1 failed: Connection refused (after {after}ms in state "
            "CONNECT)")
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_a_retriable_condition_that_lasts_past_the_first_minute_is_said(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A coordinator that never loads (a replication factor above the broker count) or an
    offline partition is not noise once the client has had its minute: it is said, once."""
    import time

    import structlog

    from vecpipe.kafka import settings

    structlog.reset_defaults()
    monkeypatch.setattr(settings, "_STARTED", time.monotonic() - 61)
    for n in (1, 7):
        settings.LIBRDKAFKA_LOG.warning(
            "FAIL [rdkafka#consumer-9]: Group coordinator not available (after 31000ms in state "
            f"UP, {n} identical error(s) suppressed)")
    assert len(capsys.readouterr().err.splitlines()) == 1
