"""The retrain gate on real bundles: champion and challenger measured side by side on the new split.

The session's ``metarec_workspace`` (the fusion model trained on the tiny dataset) provides a real
bundle and split. A copy of its data plays the retrain: new feedback enters the train split and the
split gets a new data version; bundles re-labelled with a data version play the trained versions:

* ``good``: the trained model;
* ``broken``: the same model trained on worse data: a feedback join that mislabelled every item id
  (``x-<id>``), so none of its items is one the split ranks. Its own metrics claim what it was told to.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from components.bundle.format import MANIFEST, write_manifest
from components.core.config import Config, load_config
from components.retrain import BundleScorer, SplitReevaluator
from registry.promotion import register_and_gate
from registry.store import CHAMPION, open_registry
from tests.conftest import TrainedWorkspace

# New feedback: (user, item) pairs in none of the split's parts, appended to train after its last event.
FEEDBACK = [(0, 5), (3, 0)]


@dataclass
class Retrain:
    """The retrained workspace, its config and the bundles of the story."""

    ws: Path
    cfg: Config
    trained: Path  # the workspace the bundle was trained in (the old data version)
    bundles: dict[str, Path]


def relabel(
    src: Path, dest: Path, data_version: dict[str, str], claims: dict[str, Any], mislabel: bool = False
) -> Path:
    """A copy of a bundle with another data version and metrics (and its item ids broken if asked)."""
    shutil.copytree(src, dest)
    manifest = json.loads((dest / MANIFEST).read_text(encoding="utf-8"))
    if mislabel:
        items = pd.read_parquet(dest / "items.parquet")
        items["item_id"] = "x-" + items["item_id"].astype(str)
        items.to_parquet(dest / "items.parquet", index=False)
    (dest / MANIFEST).unlink()
    fields = {k: manifest[k] for k in ("config", "git_commit", "model_card")}
    write_manifest(dest, **fields, metrics=claims, data_version=data_version)
    return dest


def new_data_version(trained: Path, ws: Path) -> None:
    """Copy the trained workspace's data and append the feedback to its train split, as a new version."""
    for part in ("processed", "split"):
        shutil.copytree(trained / "data" / part, ws / "data" / part)
    train = pd.read_parquet(ws / "data" / "split" / "train.parquet")
    last = float(pd.read_parquet(ws / "data" / "split" / "test.parquet")["timestamp"].max())
    rows = [
        {"user": u, "item": i, "rating": 1.0, "timestamp": last + 10 * (k + 1)}
        for k, (u, i) in enumerate(FEEDBACK)
    ]
    pd.concat([train, pd.DataFrame(rows).astype(train.dtypes.to_dict())]).to_parquet(
        ws / "data" / "split" / "train.parquet", index=False
    )
    # The split stage would have recorded the new content's hash; the gate fingerprints it.
    lock = yaml.safe_load((trained / "dvc.lock").read_text(encoding="utf-8"))
    for stage in lock["stages"].values():
        for entry in [*(stage.get("deps") or []), *(stage.get("outs") or [])]:
            if entry["path"] == "data/split":
                entry["md5"] = "retrained-" + entry["md5"]
    (ws / "dvc.lock").write_text(yaml.safe_dump(lock), encoding="utf-8")


@pytest.fixture(scope="module")
def retrain(
    metarec_workspace: TrainedWorkspace, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Retrain]:
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from components.core.tracking import data_version

    metarec_workspace.check()
    trained = metarec_workspace.path
    root = tmp_path_factory.mktemp("retrain-gate")
    ws = root / "ws"
    new_data_version(trained, ws)
    base = load_config(trained / "params.yaml")
    cfg = base.model_copy(
        update={
            "tracking": base.tracking.model_copy(update={"uri": ""}),
            # A 0.1 ms scorer's p99 is partly scheduling jitter on a shared machine: the latency check
            # runs on numbers measured side by side, with room for that jitter.
            "registry": base.registry.model_copy(update={"name": "retrain-gate", "max_latency_growth": 3.0}),
        }
    )
    (ws / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    bundle = trained / "models" / "bundle"
    claims = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))["metrics"]
    inflated = json.loads(json.dumps(claims))
    inflated["warm"]["ndcg@5"] = inflated["cold"]["recall@5"] = 0.99
    old, new = data_version(trained), data_version(ws)
    assert old["data/split"] != new["data/split"]
    bundles = {
        "old-broken": relabel(bundle, root / "old-broken", old, claims, mislabel=True),
        "good": relabel(bundle, root / "good", new, claims),
        "broken": relabel(bundle, root / "broken", new, inflated, mislabel=True),
        "twin": relabel(bundle, root / "twin", new, claims),
    }
    previous = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    yield Retrain(ws, cfg, trained, bundles)
    # Logging points MLflow's process-wide tracking URI at this store: put it back for later modules.
    tracking_utils._tracking_uri = previous[0]
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if previous[1] is not None:
        os.environ["MLFLOW_TRACKING_URI"] = previous[1]


def test_measurement_is_the_evaluate_stages_protocol(retrain: Retrain) -> None:
    """On the data it was trained on, a bundle measures what its export measured with ONNX."""
    bundle = retrain.trained / "models" / "bundle"
    parity = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))["metrics"]["parity"]
    measured = SplitReevaluator(retrain.trained, retrain.cfg).measure({"1": bundle})["1"]
    assert measured["warm"][parity["ndcg_metric"]] == pytest.approx(parity["ndcg_onnx"], abs=1e-9)
    assert measured["latency"]["scorer_p99_ms"] > 0


def test_champion_is_scored_with_the_histories_it_would_serve(retrain: Retrain) -> None:
    """The champion ranks from the new split's histories, exactly as serving ranks with that history."""
    from components.bundle.engine import load_bundle
    from components.core.workspace import Paths
    from components.model.facade import load_parts

    engine = load_bundle(retrain.bundles["good"])
    loaded = load_parts(Paths(retrain.ws))
    scorer = BundleScorer(engine, loaded.users, loaded.items)
    user, item = FEEDBACK[0]
    assert engine.history[user, item] == 0 and loaded.data.train[user, item] == 1  # new feedback
    with_feedback = scorer.score(np.asarray([user]), loaded.data.train)[0]
    # The bundle's own (frozen) history; its ids are the workspace's, so it indexes alike.
    frozen = scorer.score(np.asarray([user]), engine.history)[0]
    assert not np.allclose(with_feedback, frozen)
    # Serving that user with the feedback as history gives the same scores.
    item_ids = loaded.items.sort_values("item")["item_id"].tolist()
    user_id = loaded.users.sort_values("user")["user_id"].tolist()[user]
    served = engine.recommend(user_id, 8, history=[item_ids[item]], explain=False)
    index = {i: k for k, i in enumerate(item_ids)}
    assert served and all(
        r["score"] == pytest.approx(float(with_feedback[index[r["item_id"]]]), rel=1e-5) for r in served
    )


def test_a_challenger_trained_on_worse_data_is_refused_after_a_retrain(retrain: Retrain) -> None:
    ws, cfg, bundles = retrain.ws, retrain.cfg, retrain.bundles
    primary = cfg.registry.primary
    # Before the retrain: a champion from the old data version (registered mode, floors only).
    first = register_and_gate(ws, bundles["old-broken"], None, cfg)
    assert first["promoted"] and first["gate"] == "registered"

    # The retrained model: measured with the champion on the new split, it wins; an ordinary promotion.
    split = SplitReevaluator(ws, cfg)  # the retrain flow's measurer: the gate's reevaluated mode
    good = register_and_gate(ws, bundles["good"], _run(ws, cfg), cfg, split)
    assert good["promoted"] and good["gate"] == "reevaluated", good["reasons"]
    reg = open_registry(ws, cfg)
    assert reg.aliases()[CHAMPION] == good["version"]
    assert reg.audit(good["version"])[-1]["action"] == "promote"

    # Trained on worse data, its own metrics claim far more than the champion measures on this split,
    # but measured beside the champion with the same histories it ranks none of the split's items.
    run_id = _run(ws, cfg)
    broken = register_and_gate(ws, bundles["broken"], run_id, cfg, split)
    measured = broken["decision"]["compared"]["reevaluation"]["measured"]
    champion_now = measured[good["version"]][primary]
    assert broken["decision"]["compared"][primary]["registered"] == 0.99 > champion_now
    assert measured[broken["version"]][primary] == 0.0 < champion_now
    assert not broken["promoted"] and broken["champion"] == good["version"], broken["reasons"]
    assert any(r.startswith(f"FAIL: {primary}") for r in broken["reasons"])
    tag = json.loads(reg.version(broken["version"]).tags["metarec.gate"])
    assert tag["gate"] == "reevaluated" and tag["promote"] is False
    assert not [e for e in reg.audit() if e["action"] == "force-promote"]

    # A retried task registers nothing new and gates again the same way.
    retried = register_and_gate(ws, bundles["broken"], run_id, cfg, split)
    assert retried["version"] == broken["version"] and not retried["promoted"]
    assert len(reg.versions()) == 3

    # The same model again: measured with the same information, it measures the same; a tie keeps
    # the incumbent.
    twin = register_and_gate(ws, bundles["twin"], _run(ws, cfg), cfg, split)
    measured = twin["decision"]["compared"]["reevaluation"]["measured"]
    ours, theirs = measured[twin["version"]], measured[good["version"]]
    assert (
        ours[primary] == theirs[primary]
        and ours[cfg.registry.cold_metric] == theirs[cfg.registry.cold_metric]
    )
    assert not twin["promoted"] and reg.aliases()[CHAMPION] == good["version"]


def _run(ws: Path, cfg: Config) -> str:
    """A training run in the workspace's store, for registration to log the bundle in."""
    from components.core.tracking import setup

    experiment = setup(ws, cfg.tracking.experiment, cfg.tracking.uri)
    return str(open_registry(ws, cfg).client.create_run(experiment).info.run_id)
