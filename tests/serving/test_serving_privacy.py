"""Serving logs: user ids as keyed hashes when asked (access log of a real server included), and no
database password in any log line, whatever the feedback store URL."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serving_support import API_KEY, FileVersionSource, ServerProcess, thread_server

from components.core.config import ServeSettings
from components.core.secrets import FEEDBACK_URL_ENV, SecretConfigError
from components.serving import privacy
from components.serving.privacy import SALT_ENV, ServingLogFilter, UserIdSaltError, load_salt, pseudonym
from components.serving.server import build_app

KEY = "k" * 32
SECRET = "s3cr3t-Pa55"


@pytest.fixture(autouse=True)
def plain_filters() -> Iterator[None]:
    """Leave the serving loggers with a filter that hashes nothing, whatever a test installed."""
    yield
    privacy.install(ServeSettings())


def access_record(path: str) -> logging.LogRecord:
    """A record as uvicorn's access logger makes it."""
    return logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", path, "1.1", 200),
        None,
    )


def test_pseudonyms_are_keyed_and_stable() -> None:
    one = pseudonym("196", KEY.encode())
    assert one == pseudonym("196", KEY.encode()) and one.startswith("uid-") and len(one) == 20
    assert one != pseudonym("197", KEY.encode()) and one != pseudonym("196", b"another key 0123456789")


def test_salt_comes_from_the_environment_or_its_file(tmp_path: Path) -> None:
    assert load_salt({SALT_ENV: KEY}) == KEY.encode()
    (tmp_path / "salt").write_text(KEY + "\n")
    assert load_salt({f"{SALT_ENV}_FILE": str(tmp_path / "salt")}) == KEY.encode()
    with pytest.raises(UserIdSaltError, match=f"needs a key: set {SALT_ENV} or {SALT_ENV}_FILE"):
        load_salt({})
    with pytest.raises(UserIdSaltError, match="shorter than 16"):
        load_salt({SALT_ENV: "short"})
    with pytest.raises(SecretConfigError, match="not both"):
        load_salt({SALT_ENV: KEY, f"{SALT_ENV}_FILE": str(tmp_path / "salt")})


def test_filter_hides_user_ids_in_access_paths_and_fields() -> None:
    hashed = ServingLogFilter(KEY.encode())
    record = access_record("/recommendations/u%207?k=5")
    assert hashed.filter(record)
    assert (
        record.getMessage()
        == f'127.0.0.1:5 - "GET /recommendations/{pseudonym("u 7", KEY.encode())}?k=5 HTTP/1.1" 200'
    )
    untouched = access_record("/recommendations/u7?k=5")
    ServingLogFilter(None).filter(untouched)
    assert "/recommendations/u7?k=5" in untouched.getMessage()

    message = logging.LogRecord(
        "components.serving.app",
        logging.WARNING,
        __file__,
        1,
        "slow: user_id=%s {'user_id': 'u8'} %s",
        ("u7", "x"),
        None,
    )
    hashed.filter(message)
    text = message.getMessage()
    assert f"user_id={pseudonym('u7', KEY.encode())}" in text
    assert f"'user_id': '{pseudonym('u8', KEY.encode())}'" in text and "u7" not in text and "u8" not in text


def test_installed_filter_rewrites_serving_records(caplog: pytest.LogCaptureFixture) -> None:
    privacy.install(ServeSettings(hash_user_ids=True), env={SALT_ENV: KEY})
    with caplog.at_level(logging.INFO):
        logging.getLogger("components.serving.app").info("recommended for user_id=%s", "u42")
        logging.getLogger("components.serving.feedback").error("store down: postgresql://m:%s@db/fb", SECRET)
    assert f"user_id={pseudonym('u42', KEY.encode())}" in caplog.text and "u42" not in caplog.text
    assert "postgresql://m:***@db/fb" in caplog.text and SECRET not in caplog.text


def test_hashing_without_a_key_stops_the_server_before_opening_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SALT_ENV, raising=False)
    monkeypatch.delenv(f"{SALT_ENV}_FILE", raising=False)
    monkeypatch.setenv("METAREC_API_KEY", API_KEY)
    settings = ServeSettings(hash_user_ids=True, feedback_url=f"sqlite:///{tmp_path}/fb.db")
    with pytest.raises(UserIdSaltError, match=SALT_ENV):
        build_app(settings, source=FileVersionSource(tmp_path / "champion"))
    assert not (tmp_path / "fb.db").exists()


def test_feedback_url_from_a_secret_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = FileVersionSource(tmp_path / "champion")
    source.set_version("v1")
    (tmp_path / "url").write_text(f"sqlite:///{tmp_path}/secret.db\n")
    monkeypatch.setenv("METAREC_API_KEY", API_KEY)
    monkeypatch.delenv("METAREC_API_KEY_FILE", raising=False)
    monkeypatch.delenv(FEEDBACK_URL_ENV, raising=False)
    monkeypatch.setenv(f"{FEEDBACK_URL_ENV}_FILE", str(tmp_path / "url"))
    settings = ServeSettings(feedback_url=f"sqlite:///{tmp_path}/configured.db")
    with thread_server(build_app(settings, source=source)) as url:
        event = {"event_id": "e1", "type": "click", "user_id": "u1", "item_id": "i1"}
        answer = httpx.post(f"{url}/feedback", json={"events": [event]}, headers={"X-API-Key": API_KEY})
        assert answer.status_code == 200, answer.text
    assert (tmp_path / "secret.db").exists() and not (tmp_path / "configured.db").exists()


def test_a_database_password_never_reaches_the_server_log(tmp_path: Path) -> None:
    version_file = tmp_path / "champion"
    FileVersionSource(version_file).set_version("v1")
    server = ServerProcess(tmp_path, tmp_path / "fb.db", version_file, name="secret")
    server.cmd[server.cmd.index("--log-level") + 1] = "info"
    server.env[FEEDBACK_URL_ENV] = f"postgresql://metarec:{SECRET}@127.0.0.1:1/feedback"
    try:
        server.start(timeout=60)
    except RuntimeError:
        pass  # no PostgreSQL listens there: the server may refuse to start; what matters is its log
    finally:
        server.stop()
    log = server.log.read_text()
    assert "feedback store postgresql://metarec:***@127.0.0.1:1/feedback" in log
    assert SECRET not in log


@pytest.mark.parametrize("workers", [1, 2])
def test_access_log_of_a_real_server_carries_hashed_user_ids(tmp_path: Path, workers: int) -> None:
    version_file = tmp_path / "champion"
    FileVersionSource(version_file).set_version("v1")
    server = ServerProcess(tmp_path, tmp_path / "fb.db", version_file, workers=workers, name="hashed")
    server.cmd[server.cmd.index("--log-level") + 1] = "info"
    server.cmd += ["--access-log", "--hash-user-ids"]
    server.env[SALT_ENV] = KEY
    server.start(timeout=60)
    try:
        assert httpx.get(f"{server.url}/recommendations/u7", params={"k": 3}).status_code == 200
        assert httpx.get(f"{server.url}/recommendations/no%20body").status_code == 404
        body = {"user_id": "u9", "k": 2}
        assert httpx.post(f"{server.url}/recommendations", json=body).status_code == 200
        deadline = time.monotonic() + 10
        while "/recommendations/uid-" not in server.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.stop()
    log = server.log.read_text()
    assert f'"GET /recommendations/{pseudonym("u7", KEY.encode())}?k=3 HTTP/1.1" 200' in log
    assert f'"GET /recommendations/{pseudonym("no body", KEY.encode())} HTTP/1.1" 404' in log
    assert '"POST /recommendations HTTP/1.1" 200' in log
    for user in ("/recommendations/u7", "/recommendations/no", "u9"):
        assert user not in log
