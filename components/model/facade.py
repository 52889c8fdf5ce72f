"""The model facade the stages, ablations, retraining and export use: load, fit and refit any model."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from components.core import tracking
from components.core.config import Config
from components.core.workspace import Paths
from components.data import split
from components.evaluation import protocol as evaluate

if TYPE_CHECKING:  # torch: these load only when a model is fitted
    from components.baselines import Recommender
    from components.model.fit import FitData
    from components.model.recommender import MetarecRecommender


@dataclass
class Loaded:
    """Everything a model stage needs: indices, matrices and id tables."""

    users: pd.DataFrame
    items: pd.DataFrame
    data: evaluate.EvalData


def load_parts(paths: Paths) -> Loaded:
    """Read the id tables and the split as binary matrices."""
    users = pd.read_parquet(paths.processed / "users.parquet")
    items = pd.read_parquet(paths.processed / "items.parquet")
    parts = split.load_split(paths.split)
    n_u, n_i = len(users), len(items)
    data = evaluate.EvalData(*(split.to_matrix(parts.part(p), n_u, n_i) for p in split.PARTS))
    return Loaded(users, items, data)


def model_params(cfg: Config) -> dict[str, Any]:
    """The constructor parameters of the configured model."""
    name = cfg.model.name
    sub = getattr(cfg.model, name, None)
    return sub.model_dump() if sub is not None else {}


def load_trained(directory: Path) -> Recommender:
    """Load any trained model directory: the fusion model or a baseline."""
    meta = json.loads((Path(directory) / "model.json").read_text(encoding="utf-8"))
    if meta.get("name") == "metarec":
        from components.model.recommender import MetarecRecommender

        return MetarecRecommender.load(Path(directory))
    from components import baselines  # torch: imported only by the stages that need it

    return baselines.load_model(Path(directory))


def fit_data(paths: Paths, frozen: bool = False) -> FitData:
    """The fusion model's inputs from this workspace's stage outputs."""
    from components.model.fit import load_fit_data

    return load_fit_data(paths.processed, paths.graph, paths.split, paths.metapaths, paths.text, frozen)


def fit_metarec(data: FitData, cfg: Config, log: bool = True) -> tuple[MetarecRecommender, dict[str, Any]]:
    """Train the fusion model, logging each epoch's loss and validation metrics when ``log``."""
    import mlflow

    from components.model.fit import fit

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        mlflow.log_metrics({f"epoch.{tracking.metric_name(k)}": v for k, v in row.items()}, step=epoch)

    return fit(
        data,
        cfg.model.metarec,
        cfg.mine.weighting,
        cfg.mine.damping,
        cfg.seed,
        on_epoch if log else None,
        config=cfg.model_dump(mode="json"),
        age_buckets=list(cfg.kg.age_buckets),
        eval_metric=cfg.eval.primary,
    )


def fit_configured(
    paths: Paths,
    cfg: Config,
    train: sp.csr_matrix | None = None,
    cold_items: np.ndarray | None = None,
    frozen: bool = False,
    log: bool = False,
) -> tuple[Recommender, dict[str, Any]]:
    """Fit the configured model: the fusion model on the workspace's inputs, else a baseline on ``train``.

    The one place that dispatches on ``model.name``. ``cold_items`` drops items from the fusion model's
    inputs (a baseline gets a ``train`` without them instead); ``log`` logs per-epoch metrics to the
    active MLflow run.
    """
    if cfg.model.name == "metarec":
        data = fit_data(paths, frozen)
        return fit_metarec(data if cold_items is None else data.without_items(cold_items), cfg, log=log)
    from components import baselines  # torch: imported only by the stages that need it

    params = model_params(cfg)
    if log and cfg.model.name == "bpr":
        import mlflow

        params["on_epoch"] = lambda epoch, loss: mlflow.log_metric("train.loss", loss, step=epoch)
    if train is None:
        train = load_parts(paths).data.train
    return baselines.build_model(cfg.model.name, params, cfg.seed).fit(train), {}


def cold_protocol(paths: Paths, cfg: Config, loaded: Loaded, frozen: bool = False) -> dict[str, Any]:
    """Refit the configured model with a seeded share of items made cold and evaluate it there.

    Returns the cold-items-only ranking metrics (``cold``) and the warm test metrics of the refitted
    model ranking the full catalogue, cold items included (``mixed``).
    """
    from components.evaluation import coldstart

    data = loaded.data
    cold = coldstart.cold_item_split(data.train, data.valid, data.test, cfg.eval.cold_fraction, cfg.seed)
    model, _ = fit_configured(paths, cfg, train=cold.train, cold_items=cold.cold_items, frozen=frozen)
    result = coldstart.evaluate_cold(
        lambda block: model.score(block, history=cold.train), cold, cfg.eval.ks, seed=cfg.seed
    )
    mixed = evaluate.evaluate(
        model,
        evaluate.EvalData(cold.train, cold.valid, data.test),
        "test",
        cfg.eval.ks,
        cfg.eval.activity_buckets,
        cfg.eval.block_size,
    )
    return {"cold": result, "mixed": mixed["overall"]}


def evaluate_variant(paths: Paths, cfg: Config, frozen: bool = False) -> dict[str, Any]:
    """Fit the configured model (in memory, nothing saved) and evaluate it warm and cold.

    Returns valid/test/cold/mixed overall metrics and the fit summary; the caller logs them.
    """
    loaded = load_parts(paths)
    start = time.perf_counter()
    model, summary = fit_configured(paths, cfg, train=loaded.data.train, frozen=frozen)
    out: dict[str, Any] = {"fit_seconds": time.perf_counter() - start}
    for part in ("valid", "test"):
        result = evaluate.evaluate(model, loaded.data, part, cfg.eval.ks, cfg.eval.activity_buckets)
        out[part] = result["overall"]
    if cfg.eval.cold_fraction > 0:
        cold = cold_protocol(paths, cfg, loaded, frozen)
        out["cold"] = cold["cold"]["overall"]
        out["cold_random"] = {k: v for k, v in cold["cold"].items() if k.startswith("random_recall@")}
        out["mixed"] = cold["mixed"]
    out["best_epoch"] = summary.get("best_epoch")
    return out
