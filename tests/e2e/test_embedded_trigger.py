"""The embedded profile's event path: `metarec deploy` serving in-process, a drift event, the triggered run.

The production-profile loop (test_closed_loop.py) covers the whole loop on a worker; this covers what a
single user runs without the stack: `metarec deploy` (``prefect.serve`` in the CLI process) on the
session's local Prefect server, a ``metarec.drift.detected`` event for the workspace, and the retrain run
its ``DeploymentEventTrigger`` starts and the CLI process executes. The workspace has no feedback, so the
run records the window with nothing to retrain (a whole retraining is the other test's business): about
half a minute.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from components.retrain import DataVersions
from tests.conftest import METAREC, subprocess_env


@pytest.mark.usefixtures("prefect_harness")
def test_embedded_deploy_runs_the_retrain_an_event_triggers(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    from components.pipeline import prepare_workspace
    from flows.monitor import emit_drift_event

    api = os.environ["PREFECT_API_URL"]
    ws = tmp_path / "ws"
    name = f"embedded-{uuid.uuid4().hex[:8]}"
    prepare_workspace(ws, [*tiny_overrides, f"deploy.name={name}", "deploy.trigger=event"])
    log = tmp_path / "deploy.log"
    with open(log, "wb") as handle:
        deploy = subprocess.Popen(
            [str(METAREC), "deploy", "-w", str(ws)],
            env=subprocess_env(tmp_path),
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while sum(d["name"] == name for d in httpx.post(f"{api}/deployments/filter", json={}).json()) < 2:
            assert deploy.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        # What `metarec monitor` emits on drift (no champion here: the payload needs only these fields).
        event_id = emit_drift_event(str(ws), {"window": "embedded-1", "fired_text": "unseen_items"})
        assert event_id is not None

        def finished() -> dict | None:
            record = DataVersions(ws).window("embedded-1")
            return record if record and record.get("status") == "done" else None

        deadline = time.monotonic() + 180
        while (record := finished()) is None:
            assert deploy.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        assert record["result"]["retrained"] is False  # no feedback: nothing to append or train
        runs = [
            r
            for r in httpx.post(f"{api}/flow_runs/filter", json={}).json()
            if r["parameters"].get("window") == "embedded-1"
        ]
        assert len(runs) == 1 and runs[0]["deployment_id"] is not None, runs
        assert runs[0]["parameters"] == {
            "workspace": str(ws.resolve()),
            "window": "embedded-1",
            "reason": "drift: unseen_items",
        }
        assert (runs[0].get("created_by") or {}).get("type") == "AUTOMATION", runs[0].get("created_by")
    finally:
        deploy.terminate()
        try:
            deploy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            deploy.kill()
