"""`metarec services up|status|env|down`: the production stack on one machine, from packages only.

One test brings up PostgreSQL, the MLflow tracking server, the Prefect server and a worker in a fresh home
(through the CLI, as a person does), checks each health endpoint, that MLflow runs and registered models
land in PostgreSQL and artifacts under the stack home, that the worker serves the ``metarec`` process pool,
that no password shows on a command line or in the output, then stops the stack and checks nothing of it
still runs. About a minute on 2 cores (most of it the first Prefect migration on PostgreSQL).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from conftest import METAREC, subprocess_env

pytestmark = pytest.mark.usefixtures("postgres_bin")


def _cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(METAREC), "services", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.status, answer.read().decode()


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies of our own children do not count as running.
    return any(
        Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
        if _pgid(pid) == pgid
    )


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def test_stack_up_health_tracking_worker_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.core import services, stack

    home = tmp_path / "stack"
    env = subprocess_env(tmp_path)
    for key in ("METAREC_SERVICES_HOME", "MLFLOW_TRACKING_URI", "METAREC_TRACKING_URI", "PGPASSFILE"):
        env.pop(key, None)
    try:
        up = _cli("up", "--home", str(home), env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "started postgres, mlflow, prefect, worker" in up.stdout

        again = _cli("up", "--home", str(home), env=env)
        assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr

        status = _cli("status", "--home", str(home), env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        for name in ("postgres", "mlflow", "prefect", "worker"):
            assert f"{name}" in status.stdout

        exported = _cli("env", "--home", str(home), env=env)
        assert exported.returncode == 0, exported.stderr
        values = dict(line.removeprefix("export ").split("=", 1) for line in exported.stdout.splitlines())
        assert set(values) == {
            "MLFLOW_TRACKING_URI",
            "METAREC_TRACKING_URI",
            "PREFECT_API_URL",
            "METAREC_FEEDBACK_URL",
            "PGPASSFILE",
        }
        tracking, api = values["MLFLOW_TRACKING_URI"], values["PREFECT_API_URL"]

        # No password in the output, on any command line, or in a URL; it is in the 0600 files only.
        password = (home / "postgres" / "password").read_text().strip()
        assert oct((home / "postgres" / "password").stat().st_mode & 0o777) == "0o600"
        state = json.loads((home / "stack.json").read_text())
        pids = [proc["pid"] for proc in state["procs"].values()]
        pg = services.read_state(home / "postgres")
        assert pg is not None
        for text in (up.stdout, up.stderr, again.stdout, status.stdout, exported.stdout):
            assert password not in text
        for pid in pids:
            assert password not in Path(f"/proc/{pid}/cmdline").read_text()

        # Health endpoints.
        assert _get(f"{tracking}/health") == (200, "OK")
        assert _get(f"{api}/health")[0] == 200

        # MLflow talks to the tracking server, which keeps runs and registered models in PostgreSQL and
        # artifacts under the stack home.
        import mlflow
        import psycopg
        from mlflow import MlflowClient

        monkeypatch.setenv("PGPASSFILE", values["PGPASSFILE"])
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
        mlflow.set_tracking_uri(tracking)
        experiment = mlflow.create_experiment("stack-check")
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_metric("ndcg_at_10", 0.25)
            mlflow.log_text("hello", "notes/hello.txt")
        client = MlflowClient(tracking)
        client.create_registered_model("metarec-stack-check")
        client.create_model_version("metarec-stack-check", f"runs:/{run.info.run_id}/notes", run.info.run_id)
        with psycopg.connect(values["METAREC_FEEDBACK_URL"].rsplit("/", 1)[0] + "/mlflow") as conn:
            runs = {row[0] for row in conn.execute("SELECT run_uuid FROM runs")}
            models = {row[0] for row in conn.execute("SELECT name FROM registered_models")}
        assert run.info.run_id in runs
        assert "metarec-stack-check" in models
        stored = list((home / "mlflow" / "artifacts").rglob("hello.txt"))
        assert stored and stored[0].read_text() == "hello"
        with psycopg.connect(values["METAREC_FEEDBACK_URL"]) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("feedback",)

        # The worker serves the process pool on the Prefect server.
        workers = stack.pool_workers(api)
        assert workers, f"no worker in pool {stack.POOL}"
        assert any(w["name"] == state["procs"]["worker"]["name"] for w in workers)

        ports = [proc["port"] for proc in state["procs"].values() if proc.get("port")] + [pg.port]
        down = _cli("down", "--home", str(home), "--purge", env=env)
        assert down.returncode == 0, down.stdout + down.stderr
        assert "stopped worker, prefect, mlflow, postgres" in down.stdout
        for pid in [*pids, pg.pid]:
            assert not _group_alive(pid), f"process group {pid} still runs"
        assert not any(_listening(port) for port in ports)
        assert not Path(pg.datadir).exists()
        status = _cli("status", "--home", str(home), env=env)
        assert status.returncode == 3
    finally:
        stack.stack_down(home, purge=True)
