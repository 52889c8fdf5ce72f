"""Temporal replay: the global-time cut, the client that plays windows through the serving API, the plot,
and (slow) a whole replay with drift-triggered retraining on a small synthetic dataset."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from serving_support import API_KEY, FileVersionSource, thread_server

from components import replay as rp
from components.data.ingest import load_dataset
from components.serving.app import create_app
from components.serving.auth import ApiKeyAuth
from components.serving.feedback import SQLiteFeedbackStore
from components.serving.holder import ModelHolder


def _frame(n: int = 100, seed: int = 0) -> tuple[list[str], pd.DataFrame]:
    rng = np.random.default_rng(seed)
    header = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
    frame = pd.DataFrame(
        {
            "user_id": [f"u{u}" for u in rng.integers(1, 20, n)],
            "item_id": [f"i{i}" for i in range(n)],
            "rating": rng.integers(1, 6, n).astype(float),
            "timestamp": rng.permutation(np.arange(1000, 1000 + n)).astype(float),
        }
    )
    return header, frame


def test_temporal_cut_is_by_global_time() -> None:
    header, frame = _frame(103)
    plan = rp.temporal_cut(header, frame, 0.5, 4, replay_fraction=0.8)
    assert len(plan.base) == 51
    assert [len(w) for w in plan.windows] == [10, 10, 10, 10]  # 80% of the 52 later rows, cut in four
    assert plan.base["timestamp"].max() < plan.windows[0]["timestamp"].min()
    for before, after in zip(plan.windows, plan.windows[1:], strict=False):
        assert before["timestamp"].max() < after["timestamp"].min()
    assert plan.cut_ts == plan.base["timestamp"].max()
    summary = plan.summary()
    assert [s["rows"] for s in summary] == [10] * 4
    with pytest.raises(ValueError, match="train_fraction"):
        rp.temporal_cut(header, frame, 1.0, 2)
    with pytest.raises(ValueError, match="cannot fill"):
        rp.temporal_cut(header, frame.head(4), 0.5, 3)


def test_written_base_part_is_valid_pipeline_input(tmp_path: Path, tiny_dir: Path) -> None:
    header, frame = rp.read_interactions(tiny_dir / "tiny.inter")
    plan = rp.temporal_cut(header, frame, 0.5, 2)
    for suffix in (".item", ".user", ".kg", ".link"):
        (tmp_path / f"tiny{suffix}").write_bytes((tiny_dir / f"tiny{suffix}").read_bytes())
    rp.write_inter(tmp_path / "tiny.inter", header, plan.base)
    data = load_dataset(tmp_path, "tiny")
    assert len(data.interactions) == len(plan.base)
    assert data.interactions["timestamp"].max() == plan.cut_ts


@pytest.fixture
def served(tmp_path: Path) -> tuple[str, SQLiteFeedbackStore, FileVersionSource]:
    source = FileVersionSource(tmp_path / "champion")
    source.set_version("v1")
    holder = ModelHolder(source, poll_seconds=0.05)
    store = SQLiteFeedbackStore(tmp_path / "feedback.db")
    app = create_app(holder, store, auth=ApiKeyAuth(API_KEY))
    with thread_server(app) as url:
        assert holder.wait_ready(10)
        yield url, store, source


def test_client_plays_a_window_as_impressions_ratings_and_clicks(
    served: tuple[str, SQLiteFeedbackStore, FileVersionSource],
) -> None:
    url, store, source = served
    # u1 is known to the table engine; "new" is not and is ranked from its profile, then its history.
    known = httpx.get(f"{url}/recommendations/u1", params={"k": 10}).json()
    top = [i["item_id"] for i in known["items"]]
    other = next(f"i{j}" for j in range(200, 0, -1) if f"i{j}" not in top)
    window = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "new", "u1"],
            "item_id": [top[0], other, "i3", top[4]],
            "rating": [5.0, 2.0, 4.0, 3.0],
            "timestamp": [100.0, 101.0, 102.0, 103.0],
        }
    )
    client = rp.ReplayClient(url, API_KEY, {"new": {"age": "30", "gender": "F"}}, k=10)
    stats = client.play(0, window, "arm")
    assert (stats.lists, stats.impressions, stats.ratings, stats.cold_requests) == (2, 20, 4, 1)
    assert stats.hits >= 1
    assert stats.versions == {"v1": 2}
    rows = [r.event for r in store.read_since(0)]
    impressions = [e for e in rows if e.type == "impression"]
    assert {e.model_version for e in impressions} == {"v1"}
    assert {e.ts for e in impressions} == {100.0}  # served at the window's start
    mine = sorted((e.position, e.item_id) for e in impressions if e.user_id == "u1")
    assert [i for _, i in mine] == top
    clicks = {(e.user_id, e.item_id) for e in rows if e.type == "click"}
    # A click for each rated item that was in the served list (the cold user's list decides for i3).
    assert {("u1", top[0]), ("u1", top[4])} <= clicks <= {("u1", top[0]), ("u1", top[4]), ("new", "i3")}
    assert stats.clicks == len(clicks)
    ratings = {(e.user_id, e.item_id, e.value, e.ts) for e in rows if e.type == "rating"}
    assert ("u1", other, 2.0, 101.0) in ratings and len(ratings) == 4
    # Replaying the same window again posts the same event ids: nothing is stored twice.
    count = store.count()
    client.play(0, window, "arm")
    assert store.count() == count
    # The cold user's earlier ratings become its history for the next window.
    assert client.history["new"] == ["i3"]
    source.set_version("v2")
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/ready").json().get("model_version") != "v2":
        assert time.monotonic() < deadline, "no hot swap"
        time.sleep(0.05)
    stats2 = client.play(1, window.assign(timestamp=window["timestamp"] + 100), "arm")
    assert stats2.versions == {"v2": 2}
    client.close()


def test_plot_replay_writes_a_png(tmp_path: Path) -> None:
    def row(w: int, version: str, hit: float, drifted: bool) -> dict:
        stats = {
            "item_popularity": {"value": 0.05, "threshold": 0.2},
            "unseen_users": {"value": 0.6, "threshold": 0.3},
        }
        return {
            "window": w,
            "client": {"hit_rate": hit, "versions": {version: 10}},
            "drift": {"drifted": drifted, "statistics": stats},
        }

    arms = {
        "static": [row(0, "1", 0.5, True), row(1, "1", 0.4, True)],
        "retrain": [row(0, "1", 0.5, True), row(1, "2", 0.6, True)],
    }
    path = rp.plot_replay(arms, tmp_path / "replay.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_replay_retrains_on_drift_and_the_server_swaps(tmp_path: Path) -> None:
    """The whole replay on a synthetic dataset: two arms, the monitor per window, retraining, the gate."""
    import mlflow

    from components.data.synthetic import SyntheticSpec, generate
    from flows.replay import replay

    data = tmp_path / "data"
    generate(
        SyntheticSpec(
            n_users=80, n_items=60, n_entities=100, n_relations=3, n_interactions=2400, n_triples=300, seed=1
        ),
        data,
        "syn",
    )
    # A shift the monitor must see: users 51-80 only arrive after everyone else (the replayed part).
    inter = pd.read_csv(data / "syn.inter", sep="\t")
    late = inter["user_id:token"] > 50
    ts = inter["timestamp:float"]
    inter.loc[late, "timestamp:float"] = ts[late] - ts.min() + ts.max() + 1
    inter.to_csv(data / "syn.inter", sep="\t", index=False)
    ws = tmp_path / "ws"
    result = replay(
        workspace=str(ws),
        windows=2,
        train_fraction=0.6,
        overrides=[
            f"data.path={data}",
            "data.name=syn",
            "model.metarec.epochs=5",
            "text.finetune.steps=2",
            "text.finetune.batch_size=4",
            "text.finetune.warmup_steps=1",
            "registry.min_primary=0",
            "registry.min_cold=0",
            "drift.min_events=50",
            "drift.min_lists=10",
        ],
    )
    static, retrained = result["arms"]["static"], result["arms"]["retrain"]
    assert [r["window"] for r in static] == [0, 1] == [r["window"] for r in retrained]
    assert all(r["serving_version"] == "1" for r in static)
    assert all(r["retrain"] is None for r in static)
    first = retrained[0]
    assert "unseen_users" in first["drift"]["fired"]
    # Drift in window 0 retrains; the last window's monitor only reports (nothing left to serve).
    assert first["retrain"] and first["retrain"]["retrained"] and retrained[1]["retrain"] is None
    fired = [first]
    versions = json.loads((ws / "data" / "feedback" / "versions.json").read_text())
    assert [v["version"] for v in versions["versions"]] == [0, 1]
    assert versions["windows"]["retrain-w0"]["status"] == "done"
    for r in fired:
        reg = r["retrain"]["registry"]
        assert reg["version"] and reg["reasons"]  # registered and gated
    # A promotion before the last window is served by the next window (hot swap).
    for before, after in zip(retrained, retrained[1:], strict=False):
        if before["retrain"] and before["retrain"]["registry"]["promoted"]:
            assert after["serving_version"] == before["retrain"]["registry"]["champion"]
    assert (ws / "replay" / "replay.png").exists() and (ws / "replay" / "replay.md").exists()
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    run = mlflow.get_run(result["mlflow_run_id"])
    assert "static.hit_rate_all" in run.data.metrics and "retrain.hit_rate_all" in run.data.metrics
