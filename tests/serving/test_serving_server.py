"""Server wiring: settings through the environment, the engine source import string, build_app's checks."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from serving_support import API_KEY, VERSION_FILE_ENV, FileVersionSource, thread_server

from components.core.config import SETTINGS_ENV, ServeSettings
from components.serving.auth import ApiKeyConfigError
from components.serving.feedback import StoreUnavailableError
from components.serving.server import TcpNoDelayConfig, app_factory, build_app, load_source


def test_settings_defaults_and_env_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = ServeSettings()
    assert defaults.host == "127.0.0.1"  # loopback unless asked otherwise
    assert not defaults.allow_anonymous_writes and not defaults.require_key_for_reads
    monkeypatch.delenv(SETTINGS_ENV, raising=False)
    assert ServeSettings.from_env() == defaults
    custom = ServeSettings(port=9001, workers=3, feedback_url="sqlite:////tmp/x.db")
    monkeypatch.setenv(SETTINGS_ENV, custom.model_dump_json())
    assert ServeSettings.from_env() == custom
    with pytest.raises(ValidationError):
        ServeSettings(workrs=2)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        ServeSettings(port=70000)


def test_load_source_needs_a_module_callable() -> None:
    with pytest.raises(ValueError, match="no engine source configured"):
        load_source(ServeSettings())
    with pytest.raises(ValueError, match="package.module:callable"):
        load_source(ServeSettings(source="serving_support.make_source"))


def test_app_factory_builds_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = FileVersionSource(tmp_path / "champion")
    source.set_version("v5")
    settings = ServeSettings(source="serving_support:make_source", feedback_url=f"sqlite:///{tmp_path}/fb.db")
    monkeypatch.setenv(SETTINGS_ENV, settings.model_dump_json())
    monkeypatch.setenv(VERSION_FILE_ENV, str(source.version_file))
    monkeypatch.setenv("METAREC_API_KEY", API_KEY)
    monkeypatch.delenv("METAREC_API_KEY_FILE", raising=False)
    with thread_server(app_factory()) as url:
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.get(f"{url}/recommendations/u1").json()["model_version"] == "v5"
    assert (tmp_path / "fb.db").exists()


def test_bad_key_configuration_stops_the_server_before_opening_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METAREC_API_KEY", API_KEY)
    monkeypatch.setenv("METAREC_API_KEY_FILE", str(tmp_path / "key"))
    settings = ServeSettings(feedback_url=f"sqlite:///{tmp_path}/fb.db")
    with pytest.raises(ApiKeyConfigError):
        build_app(settings, source=FileVersionSource(tmp_path / "champion"))
    assert not (tmp_path / "fb.db").exists()
    monkeypatch.delenv("METAREC_API_KEY_FILE")
    # With a good key the store is opened: an unreachable PostgreSQL store is a clear error, no password.
    with pytest.raises(StoreUnavailableError, match="cannot connect") as caught:
        build_app(
            settings.model_copy(update={"feedback_url": "postgresql://u:secret@127.0.0.1:1/x"}),
            source=FileVersionSource(tmp_path / "champion"),
        )
    assert "secret" not in str(caught.value)


def test_worker_socket_is_tcp_so_connections_get_nodelay() -> None:
    config = TcpNoDelayConfig("components.serving.server:app_factory", host="127.0.0.1", port=0, workers=2)
    sock = config.bind_socket()
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.get_inheritable()
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()
