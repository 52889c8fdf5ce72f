"""The monitor flow's window logic, the drift event and its retrain fallback, and feedback data versions.

Fast tests: a synthetic catalogue (Zipf items, genres, clustered text embeddings) packed as a serving
bundle, feedback written to a real SQLite feedback store and read back window by window, the monitor
flow under the session's Prefect server, and data versions on the committed tiny dataset. The whole
loop (feedback through the API, drift, the event trigger, retrain, gate, swap) is
tests/e2e/test_closed_loop.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from components.core.config import Config, RetrainConfig, build_config
from components.data.kg import HeteroGraph, Relation, save_graph
from components.drift import reference as monitoring
from components.retrain import DataVersions, append_version, ensure_base, new_interactions, read_inter
from components.serving.feedback import FeedbackEvent, SQLiteFeedbackStore
from registry import promotion

N_ITEMS, N_NEW, N_USERS, N_GENRES, DIM = 300, 120, 200, 10, 8
WINDOW = 1500
# Thresholds as in params.yaml, with the sample floors scaled to the synthetic windows.
DRIFT = ["drift.min_events=500"]


# ---- a synthetic catalogue packed as a champion's bundle ----------------------------------------


class World:
    """Item popularity, user activity, genres and embeddings; ids are strings as in the store."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.item_p = 1.0 / (np.arange(N_ITEMS) + 5.0) ** 0.9
        self.item_p /= self.item_p.sum()
        self.user_p = rng.lognormal(0.0, 1.0, N_USERS)
        self.user_p /= self.user_p.sum()
        genre_p = 1.0 / (np.arange(N_GENRES) + 2.0)
        genre_p /= genre_p.sum()
        self.first = np.array([rng.choice(N_GENRES, p=genre_p) for _ in range(N_ITEMS + N_NEW)])
        centroids = rng.normal(size=(N_GENRES, DIM)) * 2
        self.emb = centroids[self.first] + rng.normal(size=(N_ITEMS + N_NEW, DIM))
        self.item_ids = np.array([f"i{k}" for k in range(N_ITEMS + N_NEW)])
        self.user_ids = np.array([f"u{k}" for k in range(N_USERS)])

    def train(self, n: int, rng: np.random.Generator) -> sp.csr_matrix:
        users = rng.choice(N_USERS, n, p=self.user_p)
        items = rng.choice(N_ITEMS, n, p=self.item_p)
        # Distinct pairs, as a training split is; repeats would only be counted once anyway.
        m = sp.csr_matrix((np.ones(n), (users, items)), shape=(N_USERS, N_ITEMS + N_NEW))
        m.data[:] = 1.0
        return m

    def ratings(
        self, rng: np.random.Generator, t0: float, n: int = WINDOW, item_p: np.ndarray | None = None
    ) -> list[FeedbackEvent]:
        p = self.item_p if item_p is None else item_p
        users = rng.choice(N_USERS, n, p=self.user_p)
        items = rng.choice(len(p), n, p=p)
        ts = t0 + np.sort(rng.uniform(0, 999, n))
        return [
            FeedbackEvent(
                event_id=f"t{t0:.0f}-{k}",
                type="rating",
                user_id=str(self.user_ids[u]),
                item_id=str(self.item_ids[i]),
                ts=float(t),
                value=float(rng.integers(1, 6)),
            )
            for k, (u, i, t) in enumerate(zip(users, items, ts, strict=True))
        ]


def write_bundle(
    world: World, dest: Path, train: sp.csr_matrix, metrics: dict[str, Any] | None = None
) -> Path:
    """The files of a serving bundle the monitor reads (not a servable bundle)."""
    dest.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"user": np.arange(N_USERS), "user_id": world.user_ids}).to_parquet(dest / "users.parquet")
    pd.DataFrame(
        {"item": np.arange(N_ITEMS + N_NEW), "item_id": world.item_ids, "title": world.item_ids}
    ).to_parquet(dest / "items.parquet")
    coo = train.tocoo()
    np.savez(
        dest / "profiles.npz",
        profile=np.zeros((N_USERS, 4), np.float32),
        train_rows=coo.row,
        train_cols=coo.col,
        train_shape=np.asarray(train.shape),
    )
    np.savez(
        dest / "item_embeddings.npz", ids=world.item_ids.astype(str), vectors=world.emb.astype(np.float32)
    )
    genre_matrix = sp.csr_matrix(
        (np.ones(N_ITEMS + N_NEW), (np.arange(N_ITEMS + N_NEW), world.first)),
        shape=(N_ITEMS + N_NEW, N_GENRES),
    )
    graph = HeteroGraph(
        node_ids={
            "user": list(world.user_ids),
            "item": list(world.item_ids),
            "genre": [f"g{g}" for g in range(N_GENRES)],
        },
        relations={"item.genre": Relation("item.genre", "item", "genre", genre_matrix, ["class"])},
    )
    save_graph(graph, dest / "graph")
    manifest = {"metrics": metrics or {}, "config": {"kg": {"item_fields": {"class": "genre"}}, "data": {}}}
    (dest / "bundle.json").write_text(json.dumps(manifest), encoding="utf-8")
    return dest


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@pytest.fixture(scope="module")
def bundle(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    train = world.train(20_000, np.random.default_rng(1))
    return write_bundle(world, tmp_path_factory.mktemp("bundle"), train)


def test_reference_from_bundle_uses_original_ids(world: World, bundle: Path) -> None:
    ref = monitoring.reference_from_bundle(bundle, Config(), "3")
    assert ref.version == "3" and ref.reference.model_version == "3"
    assert set(ref.reference.item_counts.index) <= set(world.item_ids[:N_ITEMS])
    assert set(ref.reference.user_counts.index) <= set(world.user_ids)
    assert ref.reference.genre_weights is not None
    assert set(ref.reference.genre_weights["genre"]) <= {f"g{g}" for g in range(N_GENRES)}
    # Embeddings of the trained items only; every catalogue item stays available for new ones.
    assert ref.reference.item_embeddings is not None
    assert ref.reference.item_embeddings.shape == (len(ref.reference.item_counts), DIM)
    assert len(ref.item_vectors) == N_ITEMS + N_NEW
    assert ref.reference.baseline == {}


def test_stationary_store_windows_rarely_fire_and_shifts_fire_at_once(
    world: World, bundle: Path, tmp_path: Path
) -> None:
    """24 stationary windows written to the store and read back by event time: at most 1 fires (≤ 5%).
    The window right after a flood of new items, or a genre swap, fires."""
    cfg = build_config(Config().model_dump(mode="json"))
    ref = monitoring.reference_from_bundle(bundle, cfg, "3")
    store = SQLiteFeedbackStore(tmp_path / "feedback.db")
    rng = np.random.default_rng(2)
    n_stationary = 24
    for w in range(n_stationary):
        store.write(world.ratings(rng, w * 1000.0))
    # Window 24: 40% of the traffic goes to items the champion never saw.
    flood = np.concatenate([world.item_p * 0.6, np.full(N_NEW, 0.4 / N_NEW)])
    store.write(world.ratings(rng, n_stationary * 1000.0, item_p=flood))
    # Window 25: the most common genre loses 90% of its traffic to the rarest one.
    common, rare = 0, N_GENRES - 1
    weights = np.ones(N_ITEMS)
    weights[world.first[:N_ITEMS] == common] = 0.1
    weights[world.first[:N_ITEMS] == rare] = 12.0
    swapped = world.item_p * weights / (world.item_p * weights).sum()
    store.write(world.ratings(rng, (n_stationary + 1) * 1000.0, item_p=swapped))

    results = []
    for w in range(n_stationary + 2):
        events, last = monitoring.read_events(store, 0, w * 1000.0, w * 1000.0 + 999.0)
        assert len(events) == WINDOW and last == store.count()
        results.append(monitoring.check_window(ref, events, cfg))
    stationary = results[:n_stationary]
    for r in stationary:
        # Enough data for every input check: a quiet window is a real "no drift", not a skip.
        assert r.get("item_popularity").status in ("ok", "drift")
        assert r.get("genre_mix").status in ("ok", "drift")
    fired = [r.fired for r in stationary]
    assert sum(bool(f) for f in fired) <= 0.05 * n_stationary, fired
    assert "unseen_items" in results[n_stationary].fired
    assert results[n_stationary].get("unseen_items").statistic == pytest.approx(0.4, abs=0.05)
    assert "genre_mix" in results[n_stationary + 1].fired
    store.close()


def test_read_events_pages_and_cuts_by_sequence(world: World, tmp_path: Path) -> None:
    store = SQLiteFeedbackStore(tmp_path / "f.db")
    store.write(world.ratings(np.random.default_rng(0), 0.0, n=25_000))
    events, last = monitoring.read_events(store, 0)
    assert len(events) == 25_000 and last == 25_000  # more than one page of 10k
    later, last2 = monitoring.read_events(store, 24_990)
    assert len(later) == 10 and last2 == 25_000
    none, last3 = monitoring.read_events(store, 25_000)
    assert none.empty and last3 == 25_000
    store.close()


# ---- the flow: report, event, run_deployment fallback ------------------------------------------------


def _flood_store(world: World, url_path: Path) -> None:
    store = SQLiteFeedbackStore(url_path)
    rng = np.random.default_rng(7)
    flood = np.concatenate([world.item_p * 0.5, np.full(N_NEW, 0.5 / N_NEW)])
    store.write(world.ratings(rng, 0.0, item_p=flood))
    store.close()


@pytest.mark.usefixtures("prefect_harness")
def test_monitor_flow_reports_emits_and_starts_the_retrain_deployment(
    world: World, bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from prefect.client.orchestration import get_client

    from flows.deploy import deployments
    from flows.monitor import monitor

    ws = tmp_path / "ws"
    ws.mkdir()
    _flood_store(world, ws / "feedback" / "feedback.db")
    monkeypatch.setattr(promotion, "champion_bundle", lambda workspace, cfg: ("3", bundle))
    cfg = Config()
    # The deployments `metarec deploy` serves, registered on the test server (not executed here).
    monitor_dep, retrain_dep = deployments(ws, cfg)
    assert retrain_dep.triggers[0].expect == {monitoring.DRIFT_EVENT}
    assert retrain_dep.triggers[0].parameters["window"] == "{{ event.payload.window }}"
    assert (
        retrain_dep.triggers[0].match.model_dump()["prefect.resource.id"]
        == (monitoring.workspace_resource(ws)["prefect.resource.id"])
    )
    monitor_dep.apply()
    retrain_dep.apply()

    result = monitor(workspace=str(ws), trigger="run_deployment")
    assert result["drifted"] and "unseen_items" in result["fired"]
    assert result["window"] == f"seq-0-{WINDOW}"
    assert result["event_id"] is not None
    assert result["statistics"]["unseen_items"]["value"] == pytest.approx(0.5, abs=0.05)

    # The report and the statistics are in MLflow.
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    run = mlflow.get_run(result["mlflow_run_id"])
    assert run.data.metrics["drift.unseen_items.fired"] == 1.0
    assert run.data.metrics["drift.unseen_items.share"] == pytest.approx(0.5, abs=0.05)
    assert run.data.tags["drift.fired"] == ",".join(result["fired"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "drift")}
    assert {"drift/drift_report.html", "drift/drift_unseen_items.png", "drift/payload.json"} <= artifacts

    # The fallback created a run of retrain/<name> with the event's parameters.
    triggered = result["triggered"]
    assert triggered["mode"] == "run_deployment" and triggered["deployment"] == "retrain/metarec"
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(triggered["flow_run_id"])
        deployment = client.read_deployment(flow_run.deployment_id)
    assert deployment.name == "metarec"
    assert flow_run.parameters == {
        "workspace": str(ws.resolve()),
        "window": result["window"],
        "reason": "drift: " + ",".join(result["fired"]),
    }


@pytest.mark.usefixtures("prefect_harness")
def test_monitor_flow_without_drift_emits_nothing(
    world: World, bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.monitor import monitor

    ws = tmp_path / "ws"
    ws.mkdir()
    store = SQLiteFeedbackStore(ws / "feedback" / "feedback.db")
    store.write(world.ratings(np.random.default_rng(9), 0.0))
    store.close()
    monkeypatch.setattr(promotion, "champion_bundle", lambda workspace, cfg: ("3", bundle))
    result = monitor(workspace=str(ws), window="quiet", trigger="run_deployment")
    assert not result["drifted"] and result["event_id"] is None and result["triggered"] is None
    assert result["window"] == "quiet"


# ---- feedback → data versions ------------------------------------------------------------------------


def test_new_interactions_dedupes_and_prefers_ratings() -> None:
    cfg = RetrainConfig(click_rating=1.0)
    events = pd.DataFrame(
        [
            ("a", "click", "u1", "i9", None, 10.0),
            ("a", "click", "u1", "i9", None, 10.0),  # the same event twice
            ("b", "rating", "u1", "i9", 4.0, 12.0),
            ("c", "click", "u2", "i8", None, 11.0),
            ("d", "impression", "u2", "i7", None, 5.0),
            ("e", "rating", "u1", "i1", 5.0, 13.0),  # already in the data
            ("f", "rating", "stranger", "i1", 5.0, 13.0),
        ],
        columns=["event_id", "type", "user_id", "item_id", "value", "ts"],
    )
    rows, counts = new_interactions(events, {("u1", "i1")}, cfg, known_users={"u1", "u2"})
    assert rows.to_dict("records") == [
        {"user_id": "u1", "item_id": "i9", "rating": 4.0, "timestamp": 10.0},
        {"user_id": "u2", "item_id": "i8", "rating": 1.0, "timestamp": 11.0},
    ]
    assert counts["feedback_events"] == 5 and counts["already_in_data"] == 1
    assert counts["skipped_unknown_users"] == 1 and counts["new_interactions"] == 2


def test_data_versions_append_feedback_and_keep_the_old_version(
    tmp_path: Path, tiny_dir: Path, tiny_overrides: list[str]
) -> None:
    from components.data.ingest import load_dataset
    from components.pipeline import prepare_workspace

    ws = tmp_path / "ws"
    cfg = prepare_workspace(ws, tiny_overrides)
    url = monitoring.feedback_url(ws, cfg)
    store = monitoring.open_feedback(ws, cfg)
    store.write(
        [
            FeedbackEvent("r1", "rating", "u1", "i8", 100.0, value=5.0),
            FeedbackEvent("c1", "click", "u4", "i8", 101.0),
            FeedbackEvent("c2", "click", "u1", "i8", 102.0),  # same pair as r1: one row
            FeedbackEvent("m1", "impression", "u3", "i8", 99.0, model_version="1"),
        ]
    )
    with DataVersions(ws).locked() as versions:
        base = ensure_base(versions, cfg, url)
        events, high = monitoring.read_events(store, 0)
        v1, counts = append_version(versions, base, events, high, url, cfg, "w1")
    assert base.version == 0 and v1 is not None and v1.version == 1
    assert (v1.parent, v1.feedback_seq, v1.n_appended) == (0, 4, 2)
    assert counts["new_interactions"] == 2
    v0_dir, v1_dir = ws / base.path, ws / v1.path
    # v0 is the untouched original; v1 = v0 + the two new rows, and the other files are copies.
    assert (v0_dir / "tiny.inter").read_bytes() == (tiny_dir / "tiny.inter").read_bytes()
    _, old = read_inter(v0_dir / "tiny.inter")
    _, new = read_inter(v1_dir / "tiny.inter")
    assert len(new) == len(old) + 2
    assert new.tail(2).values.tolist() == [["u1", "i8", "5", "100"], ["u4", "i8", "1", "101"]]
    for suffix in (".item", ".user", ".kg", ".link"):
        assert (v1_dir / f"tiny{suffix}").read_bytes() == (v0_dir / f"tiny{suffix}").read_bytes()
    # Both versions are DVC-tracked, and the new one is valid pipeline input.
    assert (ws / "data" / "feedback" / "v0.dvc").exists() and (ws / "data" / "feedback" / "v1.dvc").exists()
    assert v1.dvc_md5.endswith(".dir") and v1.dvc_md5 != base.dvc_md5
    assert any((ws / ".dvc" / "cache").rglob("*.dir"))
    assert len(load_dataset(v1_dir, "tiny").interactions) == len(old) + 2
    # Nothing new after the high-water mark: no version.
    with DataVersions(ws).locked() as versions:
        events, high2 = monitoring.read_events(store, v1.feedback_seq)
        again, _ = append_version(versions, v1, events, high2, url, cfg)
    assert again is None
    assert [v.version for v in DataVersions(ws).versions] == [0, 1]
    store.close()


@pytest.mark.usefixtures("prefect_harness")
def test_retrain_is_idempotent_per_window(tmp_path: Path, tiny_overrides: list[str]) -> None:
    """A window already retrained returns its recorded result; no new feedback retrains nothing."""
    from components.pipeline import prepare_workspace
    from flows.retrain import retrain

    ws = tmp_path / "ws"
    prepare_workspace(ws, tiny_overrides)
    versions = DataVersions(ws)
    recorded = {"window": "w7", "retrained": True, "data_version": 3, "registry": {"version": "4"}}
    versions.set_window("w7", status="done", result=recorded)
    # A retrain that died during training left registration off: the next one turns it back on.
    prepare_workspace(ws, ["registry.enabled=false"])
    versions.registry_paused = True
    versions.save()
    again = retrain(workspace=str(ws), window="w7")
    assert again == {**recorded, "reused": True}
    from components.core.config import load_config

    assert load_config(ws / "params.yaml").registry.enabled is True
    assert DataVersions(ws).registry_paused is False

    nothing = retrain(workspace=str(ws), window="w8")
    assert nothing["retrained"] is False and nothing["data_version"] is None
    assert [v.version for v in DataVersions(ws).versions] == [0]  # v0 made, nothing appended
    assert retrain(workspace=str(ws), window="w8")["reused"] is True


@pytest.mark.usefixtures("prefect_harness")
def test_cli_retrain_monitor_deploy_replay_are_wired(tmp_path: Path, tiny_overrides: list[str]) -> None:
    from typer.testing import CliRunner

    from components.pipeline import prepare_workspace
    from metarec.cli import app

    runner = CliRunner()
    for command in ("monitor", "retrain", "deploy", "replay"):
        shown = runner.invoke(app, [command, "--help"])
        assert shown.exit_code == 0 and "--workspace" in shown.output, shown.output
    ws = tmp_path / "ws"
    prepare_workspace(ws, tiny_overrides)
    versions = DataVersions(ws)
    versions.set_window(
        "w1", status="done", result={"window": "w1", "retrained": False, "message": "nothing"}
    )
    versions.save()
    result = runner.invoke(app, ["retrain", "-w", str(ws), "--window", "w1"])
    assert result.exit_code == 0, result.output
    assert "already retrained" in result.output and "nothing" in result.output
    # No registered model yet: the monitor says so instead of a traceback.
    result = runner.invoke(app, ["monitor", "-w", str(ws), "--trigger", "none"])
    assert result.exit_code == 1 and "no MLflow store" in result.output
