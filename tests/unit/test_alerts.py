"""Unit tests of the alert rules (helm/vecpipe/files/vecpipe-alerts.yml), with promtool.

`promtool check rules` and `promtool test rules` (tests/monitoring/vecpipe-alerts.test.yml) run
the real rule engine over synthetic series; no Prometheus server and no network. promtool comes
from Debian's `prometheus` package (/usr/bin/promtool) or VECPIPE_PROMTOOL; without it these tests
skip, except in CI (CI=true), where they fail. Each alert's runbook link must name a section of
the README's "Monitoring and alerts".
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "helm" / "vecpipe" / "files" / "vecpipe-alerts.yml"
RULE_TESTS = ROOT / "tests" / "monitoring" / "vecpipe-alerts.test.yml"
README = ROOT / "README.md"
COMPOSE = ROOT / "docker-compose.yml"
RUNBOOK_BASE = "https://github.com/vecpipe/vecpipe/blob/main/README.md"
MONITORING_SECTION = "Monitoring and alerts"
SEVERITIES = {"critical", "warning", "info"}


def _find_promtool() -> str | None:
    if os.environ.get("VECPIPE_PROMTOOL"):
        return os.environ["VECPIPE_PROMTOOL"]
    found = shutil.which("promtool")
    if found:
        return found
    debian = Path("/usr/bin/promtool")
    return str(debian) if os.access(debian, os.X_OK) else None


@pytest.fixture(scope="module")
def promtool() -> str:
    """The promtool binary; its absence fails the test in CI and skips it elsewhere."""
    found = _find_promtool()
    if found is None:
        message = ("promtool not found (VECPIPE_PROMTOOL, PATH or /usr/bin/promtool); "
                   "install Debian's prometheus package (scripts/install-prometheus.sh)")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def _run(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120,
                          check=False)


@functools.cache
def _alerts() -> dict[str, dict[str, Any]]:
    """The alerting rules of the rules file, by alert name."""
    data = yaml.safe_load(RULES.read_text())
    return {rule["alert"]: rule for group in data["groups"] for rule in group["rules"]
            if "alert" in rule}


def _rule_tests() -> dict[str, Any]:
    data = yaml.safe_load(RULE_TESTS.read_text())
    assert isinstance(data, dict)
    return data


def _cases(tests: dict[str, Any], alert: str, firing: bool) -> list[tuple[int, int]]:
    """(test group, alert_rule_test) positions that expect ``alert`` firing, or quiet."""
    return [(g, c) for g, group in enumerate(tests["tests"])
            for c, case in enumerate(group.get("alert_rule_test", []))
            if case["alertname"] == alert and bool(case.get("exp_alerts")) == firing]


# -- promtool over the rules ------------------------------------------------------------------

def test_rules_file_passes_promtool_check(promtool: str) -> None:
    """`promtool check rules` accepts the rules file: every expression parses."""
    done = _run(promtool, "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in done.stdout


def test_rule_unit_tests_pass(promtool: str) -> None:
    """`promtool test rules` passes: each alert fires, with its labels and annotations, exactly
    where its cases say, and stays quiet where they say so."""
    done = _run(promtool, "test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    """Each alert of the rules file is tested both firing and not firing, and the tests name no
    alert the file does not have."""
    tests = _rule_tests()
    named = {case["alertname"] for group in tests["tests"]
             for case in group.get("alert_rule_test", [])}
    assert named == set(_alerts())
    for alert in _alerts():
        assert _cases(tests, alert, firing=True), f"{alert} is never tested firing"
        assert _cases(tests, alert, firing=False), f"{alert} is never tested quiet"


def _one_group(tests: dict[str, Any], group: int, case: int, rules: Path) -> dict[str, Any]:
    """Test group ``group`` of ``tests`` with only its case ``case``, over ``rules``."""
    picked = dict(tests["tests"][group])
    picked["alert_rule_test"] = [dict(picked["alert_rule_test"][case])]
    return {"rule_files": [str(rules)],
            "evaluation_interval": tests.get("evaluation_interval", "1m"),
            "tests": [picked]}


def _always_firing(alert: str, path: Path) -> Path:
    """A copy of the rules file in which ``alert`` fires at once, whatever the series."""
    data = yaml.safe_load(RULES.read_text())
    for group in data["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = "vector(1)"
                rule.pop("for", None)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("alert", sorted(_alerts()))
def test_each_case_can_fail(promtool: str, alert: str, tmp_path: Path) -> None:
    """No case passes whatever the rule does: a firing case fails once it expects no alert, and
    a quiet case fails once the rule fires on anything."""
    tests = _rule_tests()
    broken = _always_firing(alert, tmp_path / "always-firing.yml")
    assert _run(promtool, "check", "rules", str(broken)).returncode == 0
    for firing in (True, False):
        for group, case in _cases(tests, alert, firing):
            # The case alone, unchanged, passes: what fails below is the change.
            control = tmp_path / f"g{group}-c{case}.control.test.yml"
            control.write_text(yaml.safe_dump(_one_group(tests, group, case, RULES)))
            done = _run(promtool, "test", "rules", str(control))
            assert done.returncode == 0, done.stdout + done.stderr
            one = _one_group(tests, group, case, RULES if firing else broken)
            if firing:
                one["tests"][0]["alert_rule_test"][0]["exp_alerts"] = []
            path = tmp_path / f"g{group}-c{case}.test.yml"
            path.write_text(yaml.safe_dump(one))
            done = _run(promtool, "test", "rules", str(path))
            name = tests["tests"][group]["name"]
            assert done.returncode != 0, f"{name!r} passes whatever {alert} does"
            assert "FAILED" in done.stdout + done.stderr


# -- labels, annotations and runbooks -----------------------------------------------------------

def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _headings(markdown: str) -> list[tuple[int, str]]:
    """(level, text) of every heading outside fenced code blocks."""
    found, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        match = re.match(r"(#{1,6}) (.+)$", line)
        if match and not fenced:
            found.append((len(match.group(1)), match.group(2)))
    return found


def _anchors_by_section() -> dict[str, str]:
    """Each README anchor (GitHub's numbering of repeats included), with its ## section."""
    anchors: dict[str, str] = {}
    seen: dict[str, int] = {}
    section = ""
    for level, text in _headings(README.read_text()):
        if level == 2:
            section = text
        slug = _slug(text)
        if slug in seen:
            seen[slug] += 1
            slug = f"{slug}-{seen[slug]}"
        else:
            seen[slug] = 0
        anchors[slug] = section
    return anchors


def test_slug_follows_github() -> None:
    """Anchors are computed as GitHub computes them."""
    assert _slug("Runbook: dead letters") == "runbook-dead-letters"
    assert _slug("Vector indexes: `vecpipe index`") == "vector-indexes-vecpipe-index"
    assert _slug("The database: indexes, capacity, tenants, search, audit") == (
        "the-database-indexes-capacity-tenants-search-audit")


def test_alerts_have_severity_summary_description_and_runbook() -> None:
    """Every alert has a severity label, a summary and a description, and a runbook_url whose
    anchor is a section of the README's "Monitoring and alerts"."""
    anchors = _anchors_by_section()
    assert _alerts()
    for name, rule in _alerts().items():
        assert rule["labels"]["severity"] in SEVERITIES, name
        notes = rule["annotations"]
        assert notes["summary"].strip() and notes["description"].strip(), name
        base, _, anchor = notes["runbook_url"].partition("#")
        assert base == RUNBOOK_BASE, name
        assert anchor == name.lower(), name
        assert anchors.get(anchor) == MONITORING_SECTION, (
            f"{name}: README.md has no #{anchor} under '## {MONITORING_SECTION}'")


# -- docker-compose's Prometheus --------------------------------------------------------------

def test_compose_prometheus_config_loads_the_rules(promtool: str, tmp_path: Path) -> None:
    """`promtool check config` accepts compose's Prometheus configuration with the files compose
    mounts where it mounts them, rules file included."""
    service = yaml.safe_load(COMPOSE.read_text())["services"]["prometheus"]
    config = None
    for mount in service["volumes"]:
        source, target = mount.split(":")[:2]
        host = (ROOT / source).resolve()
        assert host.is_file(), f"compose mounts {source}, which does not exist"
        inside = tmp_path / target.lstrip("/")
        inside.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(host, inside)
        if target == "/etc/prometheus/prometheus.yml":
            config = inside
    assert config is not None, "compose mounts no /etc/prometheus/prometheus.yml"
    done = _run(promtool, "check", "config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in done.stdout
