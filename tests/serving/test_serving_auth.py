"""API-key auth: key loading, 401 vs 403, reads optionally protected, writes refused without a key, logs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from serving_support import API_KEY, FileVersionSource, events, thread_server

from components.core.config import ServeSettings
from components.serving.app import create_app
from components.serving.auth import ApiKeyAuth, ApiKeyConfigError, fingerprint, load_api_key
from components.serving.feedback import SQLiteFeedbackStore
from components.serving.holder import ModelHolder

WRONG_KEY = "not-the-key-42"


@contextmanager
def server(
    tmp: Path, auth: ApiKeyAuth | None, settings: ServeSettings | None = None
) -> Iterator[httpx.Client]:
    tmp.mkdir(parents=True, exist_ok=True)
    source = FileVersionSource(tmp / "champion")
    source.set_version("v1")
    holder = ModelHolder(source, poll_seconds=0.05)
    app = create_app(holder, SQLiteFeedbackStore(tmp / "feedback.db"), settings, auth=auth)
    with thread_server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert holder.wait_ready(10)
        yield client


def write(client: httpx.Client, headers: dict[str, str] | None = None) -> httpx.Response:
    return client.post("/feedback", json={"events": events("auth", 1)}, headers=headers or {})


def test_load_api_key_from_env_or_file(tmp_path: Path) -> None:
    assert load_api_key({}) is None
    assert load_api_key({"METAREC_API_KEY": "  "}) is None
    assert load_api_key({"METAREC_API_KEY": " abc \n"}) == "abc"
    secret = tmp_path / "key"
    secret.write_text("from-file\n")
    assert load_api_key({"METAREC_API_KEY_FILE": str(secret)}) == "from-file"
    with pytest.raises(ApiKeyConfigError, match="not both"):
        load_api_key({"METAREC_API_KEY": "abc", "METAREC_API_KEY_FILE": str(secret)})
    with pytest.raises(ApiKeyConfigError, match="cannot read"):
        load_api_key({"METAREC_API_KEY_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ApiKeyConfigError, match="is empty"):
        load_api_key({"METAREC_API_KEY_FILE": str(tmp_path / "empty")})


def test_reads_needing_a_key_need_one_configured() -> None:
    with pytest.raises(ApiKeyConfigError, match="require_key_for_reads"):
        ApiKeyAuth(None, require_key_for_reads=True)


def test_writes_need_the_key_and_refusals_are_logged_without_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="components.serving.auth")
    with server(tmp_path, ApiKeyAuth(API_KEY)) as client:
        assert client.get("/recommendations/u1").status_code == 200  # reads open by default
        missing = write(client)
        assert missing.status_code == 401
        assert "missing API key" in missing.json()["detail"]
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = write(client, {"X-API-Key": WRONG_KEY})
        assert wrong.status_code == 403
        assert wrong.json()["detail"] == "wrong API key"
        assert write(client, {"Authorization": f"Bearer {WRONG_KEY}"}).status_code == 403
        assert write(client, {"X-API-Key": API_KEY}).status_code == 200
        assert write(client, {"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("401 missing API key for write POST /feedback from 127.0.0.1") for m in messages)
    assert any(f"403 wrong API key (fingerprint {fingerprint(WRONG_KEY)})" in m for m in messages)
    assert not any(API_KEY in m or WRONG_KEY in m for m in messages)
    assert not any(API_KEY in m or WRONG_KEY in m for m in caplog.text.splitlines())


def test_reads_can_require_the_key(tmp_path: Path) -> None:
    with server(tmp_path, ApiKeyAuth(API_KEY, require_key_for_reads=True)) as client:
        assert client.get("/recommendations/u1").status_code == 401
        assert client.get("/recommendations/u1", headers={"X-API-Key": WRONG_KEY}).status_code == 403
        assert client.get("/recommendations/u1", headers={"X-API-Key": API_KEY}).status_code == 200
        assert client.post("/recommendations", json={"history": ["i1"]}).status_code == 401
        # Probes and scrapes stay open: they reveal no user data.
        for path in ("/health", "/ready", "/metrics"):
            assert client.get(path).status_code == 200


def test_without_a_configured_key_writes_are_refused(tmp_path: Path) -> None:
    with server(tmp_path, ApiKeyAuth(None)) as client:
        assert client.get("/recommendations/u1").status_code == 200
        for headers in ({}, {"X-API-Key": "anything"}):
            response = write(client, headers)
            assert response.status_code == 503
            assert "no API key configured" in response.json()["detail"]


def test_anonymous_writes_only_when_asked_for_and_no_key_is_set(tmp_path: Path) -> None:
    with server(tmp_path / "anon", ApiKeyAuth(None, allow_anonymous_writes=True)) as client:
        assert write(client).status_code == 200
    # A configured key always wins: the demo switch does not open a protected server.
    with server(tmp_path / "keyed", ApiKeyAuth(API_KEY, allow_anonymous_writes=True)) as client:
        assert write(client).status_code == 401


def test_app_reads_the_key_file_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret"
    secret.write_text(f"{API_KEY}\n")
    monkeypatch.delenv("METAREC_API_KEY", raising=False)
    monkeypatch.setenv("METAREC_API_KEY_FILE", str(secret))
    with server(tmp_path, None, ServeSettings(require_key_for_reads=True)) as client:
        assert client.get("/recommendations/u1").status_code == 401
        assert client.get("/recommendations/u1", headers={"X-API-Key": API_KEY}).status_code == 200
        assert write(client, {"X-API-Key": API_KEY}).status_code == 200
