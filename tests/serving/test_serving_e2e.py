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


def _offline(workspace: Path, tmp: Path, k: int, *extra: str) -> dict[str, list[tuple[str, float]]]:
    out = tmp / "offline.csv"
    cmd = [str(METAREC), "recommend", "-w", str(workspace), "--all-users", "--k", str(k), "--out", str(out)]
    proc = subprocess.run(
        [*cmd, *extra],
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


def test_remembered_list_shortcut_answers_as_the_app_does(server: str) -> None:
    """The shortcut for remembered lists (components.serving.app.RememberedLists) and the full app agree.

    ``k=%33`` is ``k=3`` to FastAPI but not to the shortcut, which leaves what it does not read exactly
    to the app: the same request answered both ways must carry the same list, scores and explanations.
    """
    for user in ("u1", "u2", "u3"):
        for explain in ("", "&explain=false", "&explain=1"):
            quick = httpx.get(f"{server}/recommendations/{user}?k=3{explain}")
            full = httpx.get(f"{server}/recommendations/{user}?k=%33{explain}")
            assert quick.status_code == full.status_code == 200, (quick.text, full.text)
            assert quick.headers["content-type"] == full.headers["content-type"] == "application/json"
            assert quick.headers["x-metarec-list"] == "remembered" and "x-metarec-list" not in full.headers
            a, b = quick.json(), full.json()
            assert a.pop("request_id") != b.pop("request_id")
            assert a == b and len(a["items"]) == 3
            assert all((i["explanation"] is None) == (explain == "&explain=false") for i in a["items"])
    # What the shortcut leaves to the app still gets the app's answers.
    assert httpx.get(f"{server}/recommendations/u1?k=0").status_code == 422
    assert httpx.get(f"{server}/recommendations/u1?k={'9' * 5000}").status_code == 422  # int() limit
    assert httpx.get(f"{server}/recommendations/u1?k=10&k=3").status_code == 200
    assert httpx.get(f"{server}/recommendations/nobody?k=10").status_code == 404
    # Its answers are counted under the route's template, like the app's.
    metrics = httpx.get(f"{server}/metrics").text
    assert 'route="/recommendations/{user_id}",status="200"' in metrics


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


def _served(server: str, user: str, k: int) -> list[str]:
    response = httpx.get(f"{server}/recommendations/{user}", params={"k": k})
    assert response.status_code == 200, response.text
    return [item["item_id"] for item in response.json()["items"]]


def test_feedback_joins_the_users_history_online_and_offline(
    server: str, workspace: Path, tmp_path: Path
) -> None:
    """A click is part of the user's history within a second: the item leaves their list, and a user the
    model never saw becomes known; `metarec recommend --with-feedback` lists exactly what is served."""
    user = "u3"
    first = _served(server, user, 3)[0]
    newcomer_item = _served(server, "u4", 1)[0]
    assert httpx.get(f"{server}/recommendations/newcomer").status_code == 404
    events = [
        {"event_id": "online-1", "type": "click", "user_id": user, "item_id": first},
        {
            "event_id": "online-2",
            "type": "rating",
            "user_id": "newcomer",
            "item_id": newcomer_item,
            "value": 4,
        },
        # Impressions are not interactions: this one must change nothing.
        {
            "event_id": "online-3",
            "type": "impression",
            "user_id": "u5",
            "item_id": newcomer_item,
            "model_version": "1",
        },
    ]
    posted = httpx.post(f"{server}/feedback", json={"events": events}, headers={"X-API-Key": KEY})
    assert posted.status_code == 200, posted.text
    acknowledged = time.monotonic()
    while first in _served(server, user, 3):
        assert time.monotonic() - acknowledged < 1.0, "the click did not reach the user's history within 1 s"
        time.sleep(0.02)
    newcomer = httpx.get(f"{server}/recommendations/newcomer", params={"k": 3})
    assert newcomer.status_code == 200, newcomer.text
    assert newcomer_item not in [i["item_id"] for i in newcomer.json()["items"]]

    offline = _offline(workspace, tmp_path, 3, "--with-feedback")
    assert "newcomer" in offline and first not in [i for i, _ in offline[user]]
    (tmp_path / "plain").mkdir()
    plain = _offline(workspace, tmp_path / "plain", 3)
    assert plain[user] != offline[user] and "newcomer" not in plain
    assert plain["u5"] == offline["u5"]
    for who, expected in offline.items():
        response = httpx.get(f"{server}/recommendations/{who}", params={"k": 3})
        assert response.status_code == 200, response.text
        got = [(item["item_id"], item["score"]) for item in response.json()["items"]]
        assert [i for i, _ in got] == [i for i, _ in expected], who
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], rtol=1e-3, atol=1e-3)


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
