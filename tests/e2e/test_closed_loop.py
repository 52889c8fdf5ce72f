"""The product's closed loop, end to end on real parts, in every `make test`.

`metarec run` trains and registers a champion; `metarec deploy` serves the monitor and retrain
deployments on the session's real Prefect server (the one `metarec` itself starts, see conftest);
`metarec serve` answers with an API key; feedback goes in over HTTP; `metarec monitor` finds drift and
emits `metarec.drift.detected`; the deployment's `DeploymentEventTrigger` (not the run_deployment
fallback) starts the retrain run; the challenger is gated and promoted; the running server swaps to it.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from components.data.synthetic import SyntheticSpec, generate
from components.replay import ServerProcess
from components.retrain import DataVersions
from tests.conftest import METAREC, subprocess_env

API_KEY = "k" * 16


def _metarec(env: dict[str, str], timeout: float, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(METAREC), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait(what: str, check: object, timeout: float, every: float = 1.0, log: Path | None = None) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()  # type: ignore[operator]
        if found:
            return found
        time.sleep(every)
    tail = log.read_text(encoding="utf-8", errors="replace")[-4000:] if log and log.exists() else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def test_feedback_drift_event_retrain_gate_promote_swap(tmp_path: Path) -> None:
    import os

    api = os.environ["PREFECT_API_URL"]
    data = tmp_path / "data"
    # Small enough for `make test`, large enough for the drift checks' minimum counts.
    generate(
        SyntheticSpec(
            n_users=80, n_items=60, n_entities=100, n_relations=3, n_interactions=1800, n_triples=300, seed=3
        ),
        data,
        "syn",
    )
    ws = tmp_path / "ws"
    env = subprocess_env(tmp_path)
    name = f"loop-{uuid.uuid4().hex[:8]}"  # deployments of this test only, on the shared session server
    overrides = [
        f"data.path={data}",
        "data.name=syn",
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
        f"deploy.name={name}",
        "serve.poll_seconds=1",
    ]
    proc = _metarec(env, 900, "run", "-w", str(ws), *(arg for o in overrides for arg in ("-S", o)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "registered model version 1: promoted to champion" in proc.stdout

    deploy_log = tmp_path / "deploy.log"
    with open(deploy_log, "wb") as handle:
        deploy = subprocess.Popen(
            [str(METAREC), "deploy", "-w", str(ws)], env=env, stdout=handle, stderr=subprocess.STDOUT
        )
    serve = ServerProcess(ws, f"sqlite:///{ws / 'feedback' / 'feedback.db'}", API_KEY, tmp_path / "serve.log")
    try:
        serve.start()
        assert serve.serving() == "1"
        # Feedback over HTTP: a flood of top ratings on the items the champion knows least.
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
        for start in range(0, len(events), 1000):
            answer = httpx.post(
                f"{serve.url}/feedback",
                json={"events": events[start : start + 1000]},
                headers={"X-API-Key": API_KEY},
                timeout=30,
            )
            assert answer.status_code == 200, answer.text
        # Without the key, feedback is refused.
        refused = httpx.post(f"{serve.url}/feedback", json={"events": events[:1]}, timeout=10)
        assert refused.status_code in (401, 403)

        def deployed() -> bool:
            found = httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()
            return sum(d["name"] == name for d in found) == 2

        _wait("metarec deploy to register monitor/ and retrain/ deployments", deployed, 180, 2, deploy_log)
        mon = _metarec(env, 600, "monitor", "-w", str(ws), "--window", "loop-1")
        assert mon.returncode == 0, mon.stdout[-3000:] + mon.stderr[-3000:]
        assert "DRIFT" in mon.stdout and "emitted metarec.drift.detected" in mon.stdout
        assert "started" not in mon.stdout  # the event alone starts the retrain, not run_deployment

        def retrained() -> dict | None:
            record = DataVersions(ws).window("loop-1")
            return record if record and record.get("status") == "done" else None

        record = _wait("the event-triggered retrain run", retrained, 900, 5, deploy_log)
        result = record["result"]  # type: ignore[index]
        assert result["retrained"] and result["data_version"] == 1

        # The Prefect run: from the retrain deployment, started by the trigger with the event's window.
        runs = [
            r
            for r in httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
            if r["parameters"].get("window") == "loop-1" and "reason" in r["parameters"]
        ]
        assert len(runs) == 1 and runs[0]["deployment_id"] is not None, runs
        assert runs[0]["parameters"]["reason"].startswith("drift: ")
        assert runs[0]["parameters"]["workspace"] == str(ws.resolve())
        created_by = runs[0].get("created_by") or {}
        assert created_by.get("type") == "AUTOMATION", created_by

        # Gated (no force) and promoted; the running server swaps to the new version.
        from registry.store import open_registry

        registry = open_registry(ws)
        version = result["registry"]["version"]
        assert version == "2"
        tags = registry.version(version).tags
        assert tags.get("metarec.gate")
        assert result["registry"]["promoted"], result["registry"]
        assert registry.aliases().get("champion") == "2"
        serve.wait_for_version("2", timeout=120)
        answer = httpx.get(f"{serve.url}/recommendations/1", params={"k": 5}, timeout=10)
        assert answer.status_code == 200 and answer.json()["model_version"] == "2", answer.text

        # A second event for the same window retrains nothing.
        again = _metarec(env, 300, "retrain", "-w", str(ws), "--window", "loop-1")
        assert again.returncode == 0 and "already retrained" in again.stdout, again.stdout + again.stderr
    finally:
        serve.stop()
        _stop(deploy)
