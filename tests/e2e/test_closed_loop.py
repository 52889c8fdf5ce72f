"""The product's closed loop on the production profile, end to end on real parts, in every `make test`.

One stack, brought up as a person does (`metarec services up`: PostgreSQL 15, the MLflow tracking server
and the Prefect server on it, a worker of the process pool ``metarec``), carries the whole loop:
`metarec run` trains a champion, tracked and registered on the MLflow server; `metarec deploy --pool
metarec` registers the monitor and retrain deployments on the pool; two `metarec serve` instances answer
with an API key from that champion and write feedback, posted over HTTP half to each, to the stack's
PostgreSQL; `metarec monitor` reads it there, finds drift and emits `metarec.drift.detected`; the retrain
deployment's `DeploymentEventTrigger` (not the run_deployment fallback) starts a run that the stack's
worker executes: a new DVC data version pushed to a directory remote, a challenger gated and promoted;
both servers swap to it. Around the loop: each health endpoint, runs, model versions and artifacts on the
stack (none in the workspace), no password in any output, command line or file the loop wrote, and
`services down --purge` leaves no process or port behind. Without PostgreSQL it is skipped (under CI it
fails). 220–240 s on 2 cores (it replaced the embedded closed loop, ~230 s, and a separate stack test).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import METAREC, subprocess_env

from components.data.synthetic import SyntheticSpec, generate
from components.replay import ServerProcess
from components.retrain import DataVersions

pytestmark = pytest.mark.usefixtures("postgres_bin")

API_KEY = "k" * 16
WINDOW = "loop-1"
# What `metarec services env` prints; the caller's own values must not reach the stack or the loop.
STACK_ENV = (
    "MLFLOW_TRACKING_URI",
    "METAREC_TRACKING_URI",
    "PREFECT_API_URL",
    "METAREC_FEEDBACK_URL",
    "PGPASSFILE",
)


def _metarec(env: dict[str, str], timeout: float, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(METAREC), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _out(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout[-3000:] + proc.stderr[-3000:]


def _wait(what: str, check: Any, timeout: float, every: float = 1.0, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    tail = log.read_text(encoding="utf-8", errors="replace")[-4000:] if log and log.exists() else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


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


def _remote_object(remote: Path, md5: str) -> Path:
    """Where a DVC 3 remote keeps the object with hash ``md5``."""
    return remote / "files" / "md5" / md5[:2] / md5[2:]


def _loop_overrides(data: Path, remote: Path) -> list[str]:
    return [
        f"data.path={data}",
        "data.name=syn",
        f"data.remote={remote}",
        "model.name=metarec",
        "model.metarec.epochs=5",
        # LoRA, longer metapaths and long latency/parity samples add minutes, not coverage, here.
        "text.finetune.enabled=false",
        "mine.max_length=3",
        "export.latency_runs=100",
        "export.parity_users=64",
        "registry.min_primary=0",
        "registry.min_cold=0",
        "drift.min_events=100",
        "deploy.trigger=event",
        f"deploy.name=loop-{uuid.uuid4().hex[:8]}",
        "serve.poll_seconds=1",
    ]


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """The stack's home; whatever the test leaves running there is stopped and deleted at its end."""
    from components.core import stack

    home = tmp_path / "stack"
    try:
        yield home
    finally:
        stack.stack_down(home, purge=True)


def test_production_stack_closed_loop(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.core import services, stack

    base = subprocess_env(tmp_path)
    for key in ("METAREC_SERVICES_HOME", *STACK_ENV):
        base.pop(key, None)
    # The worker (which inherits this environment) picks the triggered run up within 2 s, not 10.
    base["PREFECT_WORKER_QUERY_SECONDS"] = "2"
    outputs: list[str] = []
    servers: list[ServerProcess] = []
    deploy: subprocess.Popen[bytes] | None = None
    try:
        # ---- the stack: up (idempotent), status, env, health ------------------------------------------
        up = _metarec(base, 300, "services", "up", "--home", str(home))
        assert up.returncode == 0, _out(up)
        assert "started postgres, mlflow, prefect, worker" in up.stdout
        again = _metarec(base, 120, "services", "up", "--home", str(home))
        assert again.returncode == 0 and "already running" in again.stdout, _out(again)
        status = _metarec(base, 120, "services", "status", "--home", str(home))
        assert status.returncode == 0, _out(status)
        for name in ("postgres", "mlflow", "prefect", "worker"):
            assert name in status.stdout
        exported = _metarec(base, 120, "services", "env", "--home", str(home))
        assert exported.returncode == 0, exported.stderr
        values = dict(line.removeprefix("export ").split("=", 1) for line in exported.stdout.splitlines())
        assert set(values) == set(STACK_ENV)
        outputs += [up.stdout, up.stderr, again.stdout, status.stdout, exported.stdout]
        tracking, api = values["MLFLOW_TRACKING_URI"], values["PREFECT_API_URL"]
        assert values["METAREC_TRACKING_URI"] == tracking
        assert httpx.get(f"{tracking}/health", timeout=10).text == "OK"
        assert httpx.get(f"{api}/health", timeout=10).status_code == 200
        state = json.loads((home / "stack.json").read_text())
        worker = state["procs"]["worker"]
        assert any(w["name"] == worker["name"] for w in stack.pool_workers(api) or [])
        # Every child of this test, and this process's registry and PostgreSQL clients, use the stack.
        env = {**base, **values}
        for key in ("MLFLOW_TRACKING_URI", "METAREC_TRACKING_URI", "PGPASSFILE"):
            monkeypatch.setenv(key, values[key])
        monkeypatch.setenv("METAREC_CACHE_DIR", str(tmp_path / "cache"))  # the servers' bundle downloads

        # ---- train and register a champion on the stack ----------------------------------------------
        data, ws, remote = tmp_path / "data", tmp_path / "ws", tmp_path / "dvc-remote"
        # Small enough for `make test`, large enough for the drift checks' minimum counts.
        generate(
            SyntheticSpec(
                n_users=80,
                n_items=60,
                n_entities=100,
                n_relations=3,
                n_interactions=1800,
                n_triples=300,
                seed=3,
            ),
            data,
            "syn",
        )
        overrides = _loop_overrides(data, remote)
        run = _metarec(env, 900, "run", "-w", str(ws), *(arg for o in overrides for arg in ("-S", o)))
        assert run.returncode == 0, _out(run)
        assert "registered model version 1: promoted to champion" in run.stdout
        outputs += [run.stdout, run.stderr]

        # ---- deployments on the pool, two servers on the PostgreSQL feedback store --------------------
        deploy_log = tmp_path / "deploy.log"
        with open(deploy_log, "wb") as handle:
            deploy = subprocess.Popen(
                [str(METAREC), "deploy", "-w", str(ws), "--pool", stack.POOL],
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        feedback = values["METAREC_FEEDBACK_URL"]
        servers = [ServerProcess(ws, feedback, API_KEY, tmp_path / f"serve-{n}.log") for n in "ab"]
        with ThreadPoolExecutor(2) as pool:  # both load the champion from the tracking server at once
            list(pool.map(ServerProcess.start, servers))
        assert [s.serving() for s in servers] == ["1", "1"]
        assert deploy.wait(timeout=300) == 0, deploy_log.read_text()
        outputs.append(deploy_log.read_text())
        deployments = httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()
        assert sorted(d["work_pool_name"] for d in deployments) == [stack.POOL] * 2, deployments

        # Feedback over HTTP, half to each server: a flood of top ratings on the items the champion
        # knows least.
        events = [
            {
                "event_id": f"e{n}",
                "type": "rating",
                "user_id": str(u),
                "item_id": str(i),
                "value": 5.0,
                "ts": 2e9 + n,
            }
            for n, (u, i) in enumerate((u, i) for u in range(1, 81) for i in range(46, 61))
        ]
        half = len(events) // 2
        for server, part in ((servers[0], events[:half]), (servers[1], events[half:])):
            answer = httpx.post(
                f"{server.url}/feedback", json={"events": part}, headers={"X-API-Key": API_KEY}, timeout=30
            )
            assert answer.status_code == 200, answer.text
        # Without the key, feedback is refused.
        refused = httpx.post(f"{servers[1].url}/feedback", json={"events": events[:1]}, timeout=10)
        assert refused.status_code in (401, 403)
        import psycopg

        with psycopg.connect(feedback) as conn:
            assert conn.execute("SELECT count(*) FROM feedback").fetchone() == (len(events),)

        # ---- drift → event → the worker's retrain run ------------------------------------------------
        mon = _metarec(env, 600, "monitor", "-w", str(ws), "--window", WINDOW)
        assert mon.returncode == 0, _out(mon)
        assert "DRIFT" in mon.stdout and "emitted metarec.drift.detected" in mon.stdout
        assert "started" not in mon.stdout  # the event alone starts the retrain, not run_deployment
        outputs += [mon.stdout, mon.stderr]
        worker_log = Path(worker["log"])

        def retrain_runs() -> list[dict[str, Any]]:
            found = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
            return [
                r for r in found if r["parameters"].get("window") == WINDOW and "reason" in r["parameters"]
            ]

        def retrained() -> dict[str, Any] | None:
            failed = [r for r in retrain_runs() if r["state_type"] in ("FAILED", "CRASHED", "CANCELLED")]
            assert not failed, f"{failed}\n{worker_log.read_text(errors='replace')[-4000:]}"
            record = DataVersions(ws).window(WINDOW)
            return record if record and record.get("status") == "done" else None

        record = _wait("the event-triggered retrain run on the worker", retrained, 900, 3, worker_log)
        result = record["result"]
        assert result["retrained"] and result["data_version"] == 1

        # The Prefect run: started by the trigger with the event's window, on the pool, by the stack's
        # worker.
        runs = retrain_runs()
        assert len(runs) == 1 and runs[0]["deployment_id"] is not None, runs
        (flow_run,) = runs
        assert flow_run["parameters"]["reason"].startswith("drift: ")
        assert flow_run["parameters"]["workspace"] == str(ws.resolve())
        assert (flow_run.get("created_by") or {}).get("type") == "AUTOMATION", flow_run.get("created_by")
        assert flow_run["work_pool_name"] == stack.POOL
        _wait("the run's final state", lambda: retrain_runs()[0]["state_type"] == "COMPLETED", 60)
        submitted = f"Worker '{worker['name']}' submitting flow run '{flow_run['id']}'"
        assert submitted in worker_log.read_text(errors="replace")

        # The new data version, on the DVC remote: v0 and v1 recorded as pushed there, and the remote
        # holds each one's directory object and the bytes of every file it lists.
        versions = DataVersions(ws).versions
        assert [(v.version, v.pushed, v.remote) for v in versions] == [
            (0, True, str(remote)),
            (1, True, str(remote)),
        ]
        v1 = versions[1]
        assert v1.feedback_url == feedback and v1.n_appended > 0
        entries = json.loads(_remote_object(remote, v1.dvc_md5).read_text(encoding="utf-8"))
        assert {e["relpath"] for e in entries} == {p.name for p in (ws / v1.path).iterdir()}
        for entry in entries:
            assert (
                _remote_object(remote, entry["md5"]).read_bytes()
                == (ws / v1.path / entry["relpath"]).read_bytes()
            )

        # Gated (no force) and promoted on the tracking server; both servers swap to the new version.
        from registry.store import open_registry

        registry = open_registry(ws)
        assert registry.uri == tracking
        version = result["registry"]["version"]
        assert version == "2"
        assert registry.version(version).tags.get("metarec.gate")
        assert result["registry"]["promoted"], result["registry"]
        assert registry.aliases().get("champion") == "2"
        for server in servers:
            server.wait_for_version("2", timeout=120)
            answer = httpx.get(
                f"{server.url}/recommendations/1", params={"k": 5}, headers={"X-API-Key": API_KEY}, timeout=10
            )
            assert answer.status_code == 200 and answer.json()["model_version"] == "2", answer.text

        # Runs and model versions are in PostgreSQL, artifacts under the stack home, nothing in the
        # workspace's own stores.
        with psycopg.connect(feedback.rsplit("/", 1)[0] + "/mlflow") as conn:
            runs_in_pg = {row[0] for row in conn.execute("SELECT run_uuid FROM runs")}
            models = conn.execute("SELECT name, version, storage_location FROM model_versions").fetchall()
        assert result["training_run_id"] in runs_in_pg
        assert sorted((name, number) for name, number, _ in models) == [("metarec", 1), ("metarec", 2)]
        artifacts = home / "mlflow" / "artifacts"
        for _, _, location in models:  # each version's bundle, proxied by the tracking server
            assert location.startswith("mlflow-artifacts:/"), location
            assert (artifacts / location.removeprefix("mlflow-artifacts:/") / "MLmodel").is_file(), location
        assert not (ws / "mlflow.db").exists() and not (ws / "mlartifacts").exists()

        # No password in the output, on any command line, or in a file the loop wrote.
        password = (home / "postgres" / "password").read_text().strip()
        assert oct((home / "postgres" / "password").stat().st_mode & 0o777) == "0o600"
        pg = services.read_state(home / "postgres")
        assert pg is not None
        pids = [proc["pid"] for proc in state["procs"].values()]
        for text in outputs:
            assert password not in text
        for pid in [*pids, *(s.proc.pid for s in servers if s.proc)]:
            assert password not in Path(f"/proc/{pid}/cmdline").read_text()
        for path in (ws / "params.yaml", ws / "data" / "feedback" / "versions.json", worker_log):
            assert password not in path.read_text(errors="replace"), path
    finally:
        for server in servers:
            server.stop()
        if deploy is not None and deploy.poll() is None:
            deploy.kill()
            deploy.wait(10)

    # ---- down: nothing of the stack runs, no port is open, the data is gone ---------------------------
    ports = [proc["port"] for proc in state["procs"].values() if proc.get("port")] + [pg.port]
    down = _metarec(base, 300, "services", "down", "--home", str(home), "--purge")
    assert down.returncode == 0, _out(down)
    assert "stopped worker, prefect, mlflow, postgres" in down.stdout
    for pid in [*pids, pg.pid]:
        assert not _group_alive(pid), f"process group {pid} still runs"
    assert not any(_listening(port) for port in ports)
    assert not Path(pg.datadir).exists()
    assert _metarec(base, 120, "services", "status", "--home", str(home)).returncode == 3
