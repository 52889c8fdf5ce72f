"""The local PostgreSQL service: found or clearly missing, started once and reused, password-protected,
stopped and restarted with its data, removed. Most use the session's server (tests/conftest.py); the
lifecycle test runs a throwaway cluster of its own."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from components.core import services
from components.core.services import PostgresServer


def test_missing_postgres_is_a_clear_error_naming_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(services.BIN_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no initdb on PATH
    monkeypatch.setattr(services, "DEBIAN_ROOT", tmp_path / "none")
    with pytest.raises(services.PostgresNotInstalledError, match="install the package `postgresql`"):
        services.find_postgres()
    # The command line says so in one line, without a traceback, and exits non-zero.
    assert services.main(["postgres", "--home", str(tmp_path / "home"), "up"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: PostgreSQL is not installed") and "Traceback" not in err
    monkeypatch.setenv(services.BIN_ENV, str(tmp_path))
    with pytest.raises(services.PostgresNotInstalledError, match=services.BIN_ENV):
        services.find_postgres()


def test_session_server_is_recorded_reused_and_password_protected(postgres_server: PostgresServer) -> None:
    home = Path(postgres_server.home)
    assert services.read_state(home) == postgres_server
    assert services.running(home) == postgres_server
    again, started = services.start_postgres(home)  # a second `up` reuses the running server
    assert (again.pid, started) == (postgres_server.pid, False)
    assert postgres_server.url().startswith(f"postgresql://postgres@127.0.0.1:{postgres_server.port}/")
    # The password lives only in owner-only files, never in the URL or the state file.
    assert postgres_server.password_file and postgres_server.pgpass
    password = Path(postgres_server.password_file).read_text().strip()
    for secret_file in (postgres_server.password_file, postgres_server.pgpass):
        assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
    assert password not in (home / services.STATE_FILE).read_text()
    url = services.create_database(postgres_server, "services_check")
    assert services.create_database(postgres_server, "services_check") == url  # exist_ok
    with pytest.raises(services.ServiceError, match="already exists"):
        services.create_database(postgres_server, "services_check", exist_ok=False)
    with pytest.raises(ValueError, match="plain identifier"):
        services.create_database(postgres_server, 'x"; DROP DATABASE postgres; --')
    psql = [
        str(Path(postgres_server.bindir) / "psql"),
        "-X",
        "-w",
        "-tA",
        "-c",
        "SELECT current_database()",
        url,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    refused = subprocess.run(psql, env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "password" in refused.stderr  # SCRAM: no password, no login
    accepted = subprocess.run(
        psql, env={**env, **postgres_server.env()}, capture_output=True, text=True, timeout=30
    )
    assert accepted.stdout.strip() == "services_check", accepted.stderr


def test_up_status_down_keep_the_data_and_purge_removes_it(postgres_bin: Path, tmp_path: Path) -> None:
    """The command line a developer uses, on a throwaway cluster of its own."""
    home = tmp_path / "pg"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "components.core.services", "postgres", "--home", str(home), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    up = cli("up", "--trust")
    assert up.returncode == 0, up.stderr
    server = services.read_state(home)
    assert server is not None and f"url:  {server.url()}" in up.stdout
    assert cli("status").returncode == 0
    assert cli("createdb", "kept").stdout.strip() == server.url("kept")
    assert cli("down").returncode == 0
    status = cli("status")
    assert (status.returncode, status.stdout.strip()) == (1, "not running")
    assert cli("up", "--trust").returncode == 0  # the same cluster again, on a new free port
    restarted = services.read_state(home)
    assert restarted is not None and restarted.datadir == server.datadir
    check = subprocess.run(
        [str(Path(server.bindir) / "psql"), "-X", "-w", "-tA", "-c", "SELECT 1", restarted.url("kept")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.stdout.strip() == "1", check.stderr  # the database survived the restart
    assert cli("down", "--purge").returncode == 0
    assert services.read_state(home) is None
    assert not Path(server.datadir).exists()


def test_tree_peak_sees_a_child_that_holds_memory() -> None:
    """A process holding 200 MB for a second: its tree's sampled peak passes 200 MB, its parent's is small."""
    import subprocess
    import sys

    from components.core.processes import TreePeak, tree_rss

    hold = "import time; x = b'\\x01' * (200 << 20); time.sleep(1.0)"
    with subprocess.Popen([sys.executable, "-c", hold]) as proc, TreePeak(proc.pid, interval=0.05) as peak:
        proc.wait()
    assert peak.peak_bytes is not None and peak.peak_bytes > 200 << 20
    small = "import time; time.sleep(0.5)"
    with subprocess.Popen([sys.executable, "-c", small]) as proc, TreePeak(proc.pid, interval=0.05) as quiet:
        proc.wait()
    assert quiet.peak_bytes is not None and quiet.peak_bytes < 100 << 20
    assert tree_rss(proc.pid) == 0  # gone: nothing left to count
