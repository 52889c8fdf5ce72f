"""Credentials come from the environment or secret files, and no printed or logged URL shows a password."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from components.core import tracking
from components.core.config import Config, ConfigError, ServeSettings, TrackingConfig, load_config
from components.core.secrets import (
    FEEDBACK_URL_ENV,
    TRACKING_URI_ENV,
    RedactingFilter,
    SecretConfigError,
    feedback_url,
    has_password,
    read_secret,
    redact,
    redact_url,
)

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"postgresql://metarec:{SECRET}@db:5432/feedback", "postgresql://metarec:***@db:5432/feedback"),
        (
            f"postgresql+psycopg://metarec:{SECRET}@db/fb?sslmode=require",
            "postgresql+psycopg://metarec:***@db/fb?sslmode=require",
        ),
        (f"http://ci:{SECRET}@mlflow:5000", "http://ci:***@mlflow:5000"),
        (f"postgresql://db/fb?user=m&password={SECRET}&x=1", "postgresql://db/fb?user=m&password=***&x=1"),
        (f"host=db user=m password={SECRET}", "host=db user=m password=***"),
        ("postgresql://metarec@db/feedback", "postgresql://metarec@db/feedback"),
        ("sqlite:////srv/metarec/feedback.db", "sqlite:////srv/metarec/feedback.db"),
        ("models:/metarec@champion", "models:/metarec@champion"),
    ],
)
def test_redact_url_masks_only_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert has_password(url) == (url != shown)
    assert SECRET not in redact(f"could not connect to '{url}': refused")


def test_redact_url_of_nothing() -> None:
    assert redact_url(None) == "" and not has_password(None) and not has_password("")


def test_secrets_come_from_the_variable_or_its_file(tmp_path: Path) -> None:
    name = "METAREC_TEST_SECRET"
    assert read_secret(name, {}) is None
    assert read_secret(name, {name: "  "}) is None  # empty counts as unset
    assert read_secret(name, {name: " value\n"}) == "value"
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    assert read_secret(name, {f"{name}_FILE": str(secret_file)}) == "from-file"
    with pytest.raises(SecretConfigError, match=f"either {name} or {name}_FILE"):
        read_secret(name, {name: "a", f"{name}_FILE": str(secret_file)})
    secret_file.write_text("\n")
    with pytest.raises(SecretConfigError, match="is empty"):
        read_secret(name, {f"{name}_FILE": str(secret_file)})
    with pytest.raises(SecretConfigError, match="cannot read"):
        read_secret(name, {f"{name}_FILE": str(tmp_path / "missing")})


def test_environment_urls_win_over_the_configured_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"postgresql://metarec:{SECRET}@db/feedback"
    assert feedback_url("sqlite:///fb.db", {}) == "sqlite:///fb.db"
    assert feedback_url("sqlite:///fb.db", {FEEDBACK_URL_ENV: url}) == url
    secret_file = tmp_path / "tracking"
    secret_file.write_text(f"http://ci:{SECRET}@mlflow:5000\n")
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    monkeypatch.setenv(f"{TRACKING_URI_ENV}_FILE", str(secret_file))
    assert tracking.tracking_uri(tmp_path, "") == f"http://ci:{SECRET}@mlflow:5000"
    assert tracking.tracking_uri(tmp_path, "http://other:5000") == f"http://ci:{SECRET}@mlflow:5000"
    monkeypatch.delenv(f"{TRACKING_URI_ENV}_FILE")
    assert tracking.tracking_uri(tmp_path, "") == f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"


def test_printed_settings_and_logged_params_never_show_a_password() -> None:
    url = f"postgresql://metarec:{SECRET}@db/feedback"
    settings = ServeSettings(feedback_url=url, tracking_uri=f"http://ci:{SECRET}@mlflow:5000")
    cfg = Config(serve=settings, tracking=TrackingConfig(uri=f"http://ci:{SECRET}@mlflow:5000"))
    for shown in (repr(settings), str(settings), f"{settings}", repr(cfg), str(cfg), str(cfg.flat())):
        assert SECRET not in shown
    assert "postgresql://metarec:***@db/feedback" in repr(settings)
    assert cfg.flat()["serve.feedback_url"] == "postgresql://metarec:***@db/feedback"
    assert settings.feedback_url == url  # the value itself is intact for the code that connects


@pytest.mark.parametrize(
    ("override", "env"),
    [
        (f"serve.feedback_url=postgresql://metarec:{SECRET}@db/feedback", FEEDBACK_URL_ENV),
        (f"tracking.uri=http://ci:{SECRET}@mlflow:5000", TRACKING_URI_ENV),
        (f"serve.tracking_uri=postgresql://m:{SECRET}@db/mlflow", TRACKING_URI_ENV),
    ],
)
def test_params_files_refuse_credentials(override: str, env: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(ROOT / "params.yaml", [override])
    message = str(caught.value)
    assert SECRET not in message
    assert override.split("=", 1)[0] in message and env in message and f"{env}_FILE" in message
    # Without the password (the server's own auth, PGPASSWORD or .pgpass supply it), the URL is fine.
    load_config(ROOT / "params.yaml", [override.replace(f":{SECRET}", "")])


def test_redacting_filter_masks_messages_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("metarec.test.secrets")
    log_filter = RedactingFilter()
    logger.addFilter(log_filter)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.info("feedback store %s", f"postgresql://metarec:{SECRET}@db/feedback")
            try:
                raise ConnectionError(f"cannot reach postgresql://metarec:{SECRET}@db/feedback")
            except ConnectionError:
                logger.exception("store down")
    finally:
        logger.removeFilter(log_filter)
    assert "postgresql://metarec:***@db/feedback" in caplog.text
    assert "ConnectionError" in caplog.text and SECRET not in caplog.text


def test_cli_never_prints_or_logs_the_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from metarec.cli import app

    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.setenv(TRACKING_URI_ENV, f"http://ci:{SECRET}@127.0.0.1:9")
    monkeypatch.delenv(f"{TRACKING_URI_ENV}_FILE", raising=False)
    result = CliRunner().invoke(app, ["ui", "--workspace", str(ws)])
    assert result.exit_code == 1
    assert "tracks to http://ci:***@127.0.0.1:9" in " ".join(result.output.split())
    assert SECRET not in result.output
    assert SECRET not in (ws / "logs" / "metarec.log").read_text()


def test_data_versions_name_the_feedback_store_without_its_password() -> None:
    from components.retrain import DataVersion, feedback_after

    url = f"postgresql://metarec:{SECRET}@db/feedback"
    previous = DataVersion(
        version=1,
        path="p",
        name="n",
        parent=0,
        feedback_url=redact_url(url),
        feedback_seq=7,
        n_interactions=1,
        n_appended=1,
        max_ts=None,
        created="",
    )
    assert feedback_after(previous, url) == 7  # the same store, however its password is given
    assert feedback_after(previous, "postgresql://metarec@other/feedback") == 0
