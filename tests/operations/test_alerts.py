"""The Prometheus alerts in deploy/prometheus: promtool's checks and unit tests, and their metrics.

``promtool`` comes from the Debian package ``prometheus``. Without it these tests skip, except under CI
(``CI`` set), where a missing promtool is a failure: the alerts would otherwise go untested there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from serving_support import API_KEY, FileVersionSource, events, thread_server

from components.drift import report
from components.serving.app import create_app
from components.serving.auth import ApiKeyAuth
from components.serving.feedback import SQLiteFeedbackStore
from components.serving.holder import ModelHolder

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = PROJECT_ROOT / "deploy" / "prometheus"
RULES = RULES_DIR / "alerts.yml"
RULE_TESTS = sorted(RULES_DIR.glob("alerts*_test.yml"))
# Metrics the alerts may use that no metarec code writes: Prometheus's own per-target `up`.
PROMETHEUS_OWN = {"up"}

PAYLOAD: dict[str, Any] = {
    "workspace": "/srv/metarec/ws",
    "champion": "3",
    "fired": ["unseen_items"],
    "n_events": 420,
    "statistics": {"unseen_items": {"status": "drift"}, "rating_mean": {"status": "ok"}},
}


def promtool() -> str:
    """The promtool executable; skips without it, or fails under CI."""
    found = shutil.which("promtool")
    if found:
        return found
    message = (
        "promtool not found on PATH; install the Debian package: "
        "apt-get install -y --no-install-recommends prometheus"
    )
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so the alert rules must be tested here)")
    pytest.skip(message)


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=300, check=False
    )


def rules() -> list[dict[str, Any]]:
    """Every alerting rule of alerts.yml."""
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def rule_tests() -> list[dict[str, Any]]:
    """Every test group of the promtool test files."""
    return [group for path in RULE_TESTS for group in yaml.safe_load(path.read_text("utf-8"))["tests"]]


def metric_names(text: str) -> set[str]:
    """Every sample name (``_total``, ``_bucket``, ... included) in a Prometheus text exposition."""
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    assert [p.name for p in RULE_TESTS] == ["alerts_days_test.yml", "alerts_test.yml"]
    result = run_promtool("test", "rules", *(p.name for p in RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS), result.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    names = {rule["alert"] for rule in rules()}
    firing: set[str] = set()
    quiet: set[str] = set()
    for group in rule_tests():
        for case in group.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert firing == names, f"alerts never shown firing: {sorted(names - firing)}"
    assert quiet == names, f"alerts never shown quiet: {sorted(names - quiet)}"
    # A test of an alert that does not exist would pass vacuously.
    assert firing | quiet <= names
    # Every runbook link points at a section of docs/alerts.md.
    doc = (PROJECT_ROOT / "docs" / "alerts.md").read_text(encoding="utf-8").lower()
    for rule in rules():
        anchor = rule["annotations"]["runbook"].partition("#")[2]
        assert anchor == rule["alert"].lower() and f"### {anchor}" in doc, rule["alert"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """Every metric name the code exports: the serving app's /metrics and the drift textfile."""
    tmp = tmp_path_factory.mktemp("alerts")
    source = FileVersionSource(tmp / "champion")
    source.set_version("v1")
    holder = ModelHolder(source, poll_seconds=0.05)
    store = SQLiteFeedbackStore(tmp / "feedback.db")
    app = create_app(holder, store, auth=ApiKeyAuth(API_KEY))
    with thread_server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert holder.wait_ready(10)
        # Labelled series appear once used: one request of each kind the rules look at.
        assert client.get("/recommendations/u1").status_code == 200
        assert client.post("/recommendations", json={"history": ["i1"]}).status_code == 200
        response = client.post(
            "/feedback", json={"events": events("alerts", 3)}, headers={"X-API-Key": API_KEY}
        )
        assert response.status_code == 200
        served = metric_names(client.get("/metrics").text)
    (tmp / "textfile").mkdir()
    written = report.write_textfile(PAYLOAD, tmp / "textfile", now=1_700_000_000.0)
    assert written is not None
    yield served | metric_names(written.read_text(encoding="utf-8"))


def test_alert_metrics_are_exported(exported: set[str]) -> None:
    used: set[str] = set()
    for rule in rules():
        expr = rule["expr"]
        named = set(re.findall(r"\bmetarec_[A-Za-z0-9_:]*", expr))
        selected = set(re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{", expr))
        assert named or selected, f"{rule['alert']}: no metric in {expr!r}"
        used |= named | selected
    assert used - PROMETHEUS_OWN <= exported, f"not exported: {sorted(used - PROMETHEUS_OWN - exported)}"
    # Every alert family the issue asks for has its metric, and the drift writer's names are the ones used.
    assert {
        "metarec_http_requests_total",
        "metarec_http_request_duration_seconds_bucket",
        "metarec_model_loaded",
        "metarec_model_created_timestamp_seconds",
        "metarec_feedback_write_failures_total",
        "metarec_drift_detected",
        "metarec_drift_last_check_timestamp_seconds",
    } <= used
    assert set(report.TEXTFILE_METRICS) <= exported


def test_rule_tests_use_exported_series(exported: set[str]) -> None:
    # Input series under a name the code does not export would test an alert that can never fire.
    for group in rule_tests():
        for series in group["input_series"]:
            name = series["series"].partition("{")[0].strip()
            assert name in exported | PROMETHEUS_OWN, f"{group['name']}: {name} is not exported"


def test_drift_textfile(tmp_path: Path) -> None:
    path = report.write_textfile(PAYLOAD, tmp_path, now=1_700_000_000.0)
    assert path is not None and path.parent == tmp_path and path.suffix == ".prom"
    assert path == report.textfile_path(tmp_path, PAYLOAD["workspace"])
    values = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(path.read_text(encoding="utf-8"))
        for sample in family.samples
    }
    ws = ("workspace", "/srv/metarec/ws")
    assert values == {
        ("metarec_drift_detected", (("champion", "3"), ws)): 1.0,
        ("metarec_drift_check_fired", (("check", "rating_mean"), ws)): 0.0,
        ("metarec_drift_check_fired", (("check", "unseen_items"), ws)): 1.0,
        ("metarec_drift_window_events", (ws,)): 420.0,
        ("metarec_drift_last_check_timestamp_seconds", (ws,)): 1_700_000_000.0,
    }
    # The next check replaces the file (renamed into place: no temporary file is left behind).
    clean = {**PAYLOAD, "fired": [], "statistics": {"unseen_items": {"status": "ok"}}}
    assert report.write_textfile(clean, tmp_path, now=1_700_003_600.0) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    text = path.read_text(encoding="utf-8")
    assert 'metarec_drift_detected{champion="3",workspace="/srv/metarec/ws"} 0.0' in text
    assert "1.7000036e+09" in text
    # Another workspace on the same host gets its own file.
    assert report.write_textfile({**PAYLOAD, "workspace": "/srv/other"}, tmp_path) != path


def test_drift_textfile_directory_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(report.TEXTFILE_DIR_ENV, raising=False)
    assert report.write_textfile(PAYLOAD) is None
    monkeypatch.setenv(report.TEXTFILE_DIR_ENV, "")
    assert report.write_textfile(PAYLOAD) is None
    monkeypatch.setenv(report.TEXTFILE_DIR_ENV, str(tmp_path))
    path = report.write_textfile(PAYLOAD)
    assert path is not None and path.parent == tmp_path
    monkeypatch.setenv(report.TEXTFILE_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(OSError):
        report.write_textfile(PAYLOAD)


def test_monitor_report_task_writes_the_textfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.logging import disable_run_logger

    from flows import monitor

    checked = {"drifted": True, "payload": PAYLOAD}
    monkeypatch.setattr(monitor.monitoring, "report_window", lambda *args: checked)
    monkeypatch.setenv(report.TEXTFILE_DIR_ENV, str(tmp_path))
    with disable_run_logger():
        assert monitor.drift_report.fn(tmp_path, None, None, None, "w1") is checked  # type: ignore[arg-type]
    assert report.textfile_path(tmp_path, PAYLOAD["workspace"]).exists()
    # An unwritable directory costs the Prometheus file only: the check's result still comes back.
    monkeypatch.setenv(report.TEXTFILE_DIR_ENV, str(tmp_path / "missing"))
    with disable_run_logger():
        assert monitor.drift_report.fn(tmp_path, None, None, None, "w2") is checked  # type: ignore[arg-type]
