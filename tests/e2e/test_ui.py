"""``metarec run`` end to end through the CLI, then ``metarec ui`` serving that workspace's MLflow store."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from components.stages import STAGES

if TYPE_CHECKING:
    from conftest import TrainedWorkspace

METAREC = Path(sys.executable).parent / "metarec"
STARTUP_TIMEOUT_S = 60


def test_metarec_run_end_to_end(trained_workspace: TrainedWorkspace) -> None:
    trained_workspace.check()
    out = trained_workspace.stdout
    assert "MLflow run id:" in out
    assert len(trained_workspace.run_id) == 32
    assert f"stages run: {', '.join(STAGES)}" in out
    # The metrics table: a header with both parts and a row per metric.
    assert "pop — full ranking" in out
    assert re.search(r"┃\s*metric\s*┃\s*valid\s*┃\s*test\s*┃", out), (
        "table header with valid and test columns"
    )
    for metric in ("ndcg@5", "recall@2", "n_users"):
        assert metric in out, metric
    metrics = json.loads((trained_workspace.path / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["model"] == "pop"
    assert f"{metrics['test']['ndcg@5']:.4f}" in out


class Api:
    """A tiny JSON client for the MLflow REST API."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, endpoint: str, **query: Any) -> dict[str, Any]:
        url = f"{self.base}{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        with urllib.request.urlopen(url, timeout=30) as resp:
            return dict(json.loads(resp.read()))

    def post(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.base}{endpoint}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            return dict(json.loads(resp.read()))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def ui_server(trained_workspace: TrainedWorkspace, free_port: int, tmp_path: Path) -> Iterator[Api]:
    trained_workspace.check()
    log = tmp_path / "ui.log"
    # The server's background job runner is irrelevant to browsing runs and costs a dozen processes.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("w") as handle:
        # Its own session, so every process the UI spawns can be found (and, failing all else, killed).
        proc = subprocess.Popen(
            [str(METAREC), "ui", "--workspace", str(trained_workspace.path), "--port", str(free_port)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )
    api = Api(free_port)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"metarec ui exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{api.base}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"metarec ui not up after {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield api
    finally:
        pgid = proc.pid
        proc.terminate()  # SIGTERM to `metarec ui` alone must stop the whole server
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        leaked = _group_alive(pgid)
        if leaked:
            os.killpg(pgid, signal.SIGKILL)
        assert not leaked, f"processes of the UI outlived SIGTERM:\n{log.read_text()[-2000:]}"


def test_ui_serves_the_workspace_runs(trained_workspace: TrainedWorkspace, ui_server: Api) -> None:
    run_id = trained_workspace.run_id
    experiment = ui_server.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name="metarec")[
        "experiment"
    ]
    found = ui_server.post(
        "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100}
    )
    runs = {r["info"]["run_id"]: r for r in found["runs"]}
    assert run_id in runs
    parent = runs[run_id]
    assert parent["info"]["run_name"] == "training"
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert params["model.name"] == "pop"
    assert params["data.name"] == "tiny"
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert "test.ndcg_at_5" in metrics
    children = [
        r
        for r in runs.values()
        if {"key": "mlflow.parentRunId", "value": run_id} in r["data"].get("tags", [])
    ]
    assert sorted(c["info"]["run_name"] for c in children) == sorted(STAGES)

    listed = ui_server.get("/api/2.0/mlflow/artifacts/list", run_id=run_id)
    folders = {f["path"] for f in listed["files"] if f["is_dir"]}
    assert {"data", "graph", "evaluation"} <= folders
    graph = ui_server.get("/api/2.0/mlflow/artifacts/list", run_id=run_id, path="graph")
    assert "graph/schema.png" in {f["path"] for f in graph["files"]}
