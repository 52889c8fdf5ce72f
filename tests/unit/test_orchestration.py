"""The Prefect API metarec's flows use: one local server per PREFECT_HOME, started once, found again.

These run `metarec server ...` as a new user would, in a PREFECT_HOME that has never held a database,
with several processes racing to start it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from components.core import orchestration
from tests.conftest import METAREC, QUIET_ENV


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200"}
    env.pop("PREFECT_API_URL", None)  # this test's own server, not the session's
    return {**env, **extra}


def _metarec(env: dict[str, str], *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(METAREC), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_racing_starts_in_a_fresh_home_share_one_server(tmp_path: Path) -> None:
    home = tmp_path / "prefect-home"
    env = _env(home)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: _metarec(env, "server", "start"), range(3)))
    try:
        for proc in results:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        pids = {re.search(r"pid (\d+)", p.stdout).group(1) for p in results}  # type: ignore[union-attr]
        assert len(pids) == 1, [p.stdout for p in results]
        assert sum("started" in p.stdout and "already" not in p.stdout for p in results) == 1
        info = orchestration.running(home)
        assert info is not None and str(info.pid) in pids
        assert orchestration.healthy(info.api_url)
        status = _metarec(env, "server", "status")
        assert status.returncode == 0 and info.url in status.stdout
        # A second PREFECT_HOME gets its own server, never this one.
        assert orchestration.running(tmp_path / "other-home") is None
    finally:
        stopped = _metarec(env, "server", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    gone = _metarec(env, "server", "status")
    assert gone.returncode == 3 and "not running" in gone.stdout
    assert not (home / orchestration.STATE_FILE).exists()


def test_unreachable_configured_api_is_one_clear_error(tmp_path: Path) -> None:
    api = f"http://127.0.0.1:{_unused_port()}/api"
    env = _env(tmp_path / "home", PREFECT_API_URL=api)
    proc = _metarec(env, "run", "-w", str(tmp_path / "ws"), timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and api in errors[0] and "PREFECT_API_URL" in out, out
    assert not (tmp_path / "ws").exists()  # nothing was started or written


def test_server_that_cannot_start_in_time_is_one_clear_error(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = _env(home, METAREC_SERVER_TIMEOUT="0.5")
    proc = _metarec(env, "server", "start", timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out
    assert "did not answer within 0 s" in out or "did not answer within 1 s" in out, out
    assert "METAREC_SERVER_TIMEOUT" in out
    # The half-started server was stopped, not left behind.
    assert orchestration.running(home) is None and orchestration.read_state(home) is None


def test_profile_api_url_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "profiles.toml").write_text(
        'active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://prefect.internal:4200/api"\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    assert orchestration.configured_api_url() == "http://prefect.internal:4200/api"
    monkeypatch.setenv("PREFECT_PROFILE", "ephemeral")
    assert orchestration.configured_api_url() == ""
