"""The real thing end to end: a tiny fusion model trained by `metarec run`, exported to ONNX, registered
and promoted by the gate, served by `metarec serve` from the registry, and hot-swapped by an alias move."""

from __future__ import annotations

import csv
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import METAREC, TrainedWorkspace, subprocess_env

KEY = "e2e-secret-key"


def _wait_ready(url: str, proc: subprocess.Popen[str], timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"server exited with {proc.returncode}:\n{proc.stdout.read() if proc.stdout else ''}"
            )
        try:
            response = httpx.get(f"{url}/ready", timeout=2)
            if response.status_code == 200:
                return dict(response.json())
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("server never became ready")


@pytest.fixture(scope="module")
def workspace(metarec_workspace: TrainedWorkspace) -> Path:
    metarec_workspace.check()
    assert "registered model version 1: promoted to champion" in metarec_workspace.stdout
    return metarec_workspace.path


@pytest.fixture(scope="module")
def server(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tmp = tmp_path_factory.mktemp("serve")
    env = {**subprocess_env(tmp), "METAREC_API_KEY": KEY}
    proc = subprocess.Popen(
        [str(METAREC), "serve", "-w", str(workspace), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _offline(workspace: Path, tmp: Path, k: int) -> dict[str, list[tuple[str, float]]]:
    out = tmp / "offline.csv"
    proc = subprocess.run(
        [str(METAREC), "recommend", "-w", str(workspace), "--all-users", "--k", str(k), "--out", str(out)],
        env=subprocess_env(tmp),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lists: dict[str, list[tuple[str, float]]] = {}
    with out.open() as handle:
        for row in csv.DictReader(handle):
            lists.setdefault(row["user_id"], []).append((row["item_id"], float(row["score"])))
    return lists


def test_served_lists_equal_offline_recommend(server: str, workspace: Path, tmp_path: Path) -> None:
    """The champion served through the registry and HTTP ranks exactly like `metarec recommend` offline."""
    offline = _offline(workspace, tmp_path, 3)
    assert offline
    for user, expected in offline.items():
        response = httpx.get(f"{server}/recommendations/{user}", params={"k": 3})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_version"] == "1"
        got = [(item["item_id"], item["score"]) for item in body["items"]]
        assert [i for i, _ in got] == [i for i, _ in expected], user
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], rtol=1e-3, atol=1e-3)
        assert all(item["rank"] == r for r, item in enumerate(body["items"], start=1))
        assert any(item["explanation"] for item in body["items"]), "no metapath explanation at all"


def test_cold_user_and_validation(server: str) -> None:
    """A profile-only user gets finite, repeatable scores; unknown users 404; k out of range 422."""
    payload = {"profile": {"age": "30", "gender": "F", "occupation": "writer"}, "k": 3}
    first = httpx.post(f"{server}/recommendations", json=payload)
    second = httpx.post(f"{server}/recommendations", json=payload)
    assert first.status_code == 200, first.text
    items = first.json()["items"]
    assert len(items) == 3 and all(np.isfinite(i["score"]) for i in items)
    assert [i["item_id"] for i in items] == [i["item_id"] for i in second.json()["items"]]
    assert httpx.get(f"{server}/recommendations/nobody").status_code == 404
    assert httpx.get(f"{server}/recommendations/u1", params={"k": 0}).status_code == 422


def test_feedback_needs_the_key_and_is_idempotent(server: str, workspace: Path) -> None:
    """Writes without the key are 401, with a wrong key 403; a retried event is stored once."""
    event = {"event_id": "e2e-1", "type": "click", "user_id": "u1", "item_id": "i2"}
    assert httpx.post(f"{server}/feedback", json={"events": [event]}).status_code == 401
    wrong = httpx.post(f"{server}/feedback", json={"events": [event]}, headers={"X-API-Key": "nope"})
    assert wrong.status_code == 403
    for expected in ({"inserted": 1, "duplicates": 0}, {"inserted": 0, "duplicates": 1}):
        response = httpx.post(f"{server}/feedback", json={"events": [event]}, headers={"X-API-Key": KEY})
        assert response.status_code == 200, response.text
        assert {k: response.json()[k] for k in expected} == expected
    assert (workspace / "feedback" / "feedback.db").exists()


def test_alias_move_hot_swaps_without_errors(server: str, workspace: Path, tmp_path: Path) -> None:
    """Register the same bundle again, force it to champion: the server switches to it while serving."""
    from registry.store import open_registry

    registry = open_registry(workspace)
    version = str(registry.register(workspace / "models" / "bundle").version)
    assert version == "2"
    env = subprocess_env(tmp_path)
    promote = subprocess.run(
        [
            str(METAREC),
            "registry",
            "promote",
            version,
            "-w",
            str(workspace),
            "--force",
            "--reason",
            "e2e swap",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert promote.returncode == 0, promote.stdout + promote.stderr
    seen, errors = set(), 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "2" not in seen:
        response = httpx.get(f"{server}/recommendations/u1", params={"k": 2})
        if response.status_code != 200:
            errors += 1
        else:
            seen.add(response.json()["model_version"])
    assert "2" in seen and errors == 0
    metrics = httpx.get(f"{server}/metrics").text
    assert "metarec" in metrics and 'route="/recommendations/{user_id}"' in metrics
