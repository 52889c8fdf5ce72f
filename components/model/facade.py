"""The model facade the stages, ablations, retraining and export use: load, fit and refit any model."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
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
    from components.evaluation.coldstart import ColdSplit
    from components.model.fit import FitData
    from components.model.recommender import MetarecRecommender
    from components.text.retune import Retuned


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


def fit_data(paths: Paths, cfg: Config, frozen: bool = False) -> FitData:
    """The fusion model's inputs from this workspace's stage outputs."""
    from components.model.fit import load_fit_data

    data = load_fit_data(paths.processed, paths.graph, paths.split, paths.metapaths, paths.text, frozen)
    adapter = paths.text / "finetune" / "adapter"
    data.encode = text_encoder(paths, cfg, None if frozen or not adapter.is_dir() else adapter)
    return data


def text_encoder(paths: Paths, cfg: Config, adapter: Path | None) -> Callable[[list[str]], np.ndarray]:
    """Embed texts with the workspace's encoder (``adapter``: fine-tuned), loaded on first use, cached."""
    from components.text.encoder import EmbeddingCache, Encoder, encode_cached

    text = cfg.text
    loaded: list[Encoder] = []

    def encode(texts: list[str]) -> np.ndarray:
        if not loaded:
            loaded.append(Encoder.configured(text, adapter_dir=adapter))
        return encode_cached(loaded[0], texts, EmbeddingCache.for_workspace(paths.root, text.cache_dir))[0]

    return encode


def retuned_text(paths: Paths, cfg: Config, train: pd.DataFrame, stage_output: bool = True) -> Retuned:
    """Embeddings from the encoder fine-tuned on ``train`` alone (see :mod:`components.text.retune`).

    The ``retune`` stage's output when it was made for the same request (``stage_output``), else
    fine-tuned here (its adapter and embeddings cached in the workspace). Either way the result
    carries the request's key.
    """
    from components.data import ingest, kg
    from components.text import retune
    from components.text.encoder import EmbeddingCache, resolve_model

    _, users, items, _ = ingest.read_processed(paths.processed)
    ref = resolve_model(cfg.text.model)
    key = retune.request_key(ref, cfg.text, cfg.seed, train)
    if stage_output:
        saved = retune.load(
            paths.retune, key, list(items.item_id.astype(str)), list(users.user_id.astype(str))
        )
        if saved is not None:
            return saved
    made = retune.retuned_embeddings(
        ref,
        train,
        users,
        items,
        kg.load_graph(paths.graph),
        cfg.text,
        cfg.seed,
        paths.root / ".cache" / "retuned-adapters",
        EmbeddingCache.for_workspace(paths.root, cfg.text.cache_dir),
    )
    return replace(made, key=key)


def fit_metarec(
    data: FitData, cfg: Config, log: bool = True, epochs: int | None = None
) -> tuple[MetarecRecommender, dict[str, Any]]:
    """Train the fusion model, logging each epoch's loss and validation metrics when ``log``.

    ``epochs``: exactly that many, without validation (the cold refit's main-fit epoch count).
    """
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
        blocks=cfg.eval.blocks(),
        epochs=epochs,
    )


def fit_configured(
    paths: Paths,
    cfg: Config,
    train: sp.csr_matrix | None = None,
    cold_items: np.ndarray | None = None,
    frozen: bool = False,
    log: bool = False,
    epochs: int | None = None,
) -> tuple[Recommender, dict[str, Any]]:
    """Fit the configured model: the fusion model on the workspace's inputs, else a baseline on ``train``.

    The one place that dispatches on ``model.name``. ``cold_items`` drops items from the fusion model's
    inputs (a baseline gets a ``train`` without them instead); ``log`` logs per-epoch metrics to the
    active MLflow run; ``epochs`` fixes the fusion model's epoch count (no early stopping).
    """
    if cfg.model.name == "metarec":
        data = fit_data(paths, cfg, frozen)
        source = ""
        if cold_items is not None:
            data = data.without_items(cold_items)
            if cold_retunes(cfg, frozen):
                retuned = retuned_text(paths, cfg, data.train)
                source = retuned.source
                data = replace(
                    data,
                    item_text=retuned.item_vectors,
                    profile=retuned.profile_vectors,
                    encode=text_encoder(paths, cfg, retuned.adapter_dir),
                )
        model, summary = fit_metarec(data, cfg, log=log, epochs=epochs)
        if source:
            summary["encoder_source"] = source
        return model, summary
    from components import baselines  # torch: imported only by the stages that need it

    params = model_params(cfg)
    if log and cfg.model.name == "bpr":
        import mlflow

        params["on_epoch"] = lambda epoch, loss: mlflow.log_metric("train.loss", loss, step=epoch)
    if train is None:
        train = load_parts(paths).data.train
    return baselines.build_model(cfg.model.name, params, cfg.seed).fit(train), {}


def evaluate_warm(model: evaluate.Scorer, loaded: Loaded, cfg: Config) -> dict[str, dict[str, Any]]:
    """The evaluate protocol on valid and on test, ranked where ``eval.workers``/``dask_address`` say."""
    ev = cfg.eval
    return {
        part: evaluate.evaluate(
            model,
            loaded.data,
            part,
            ev.ks,
            ev.activity_buckets,
            ev.block_size,
            ev.blocks(),
            ev.max_users,
            cfg.seed,
        )
        for part in ("valid", "test")
    }


def cold_refit_epochs(cfg: Config, main_fit: dict[str, Any]) -> int | None:
    """The cold refit's epoch count: the main fit's best (``eval.cold_epochs: main``), else None.

    None (early stopping on its own validation) also when the main fit's summary lacks it: a baseline,
    or a model saved before model.json kept its fit.
    """
    best = main_fit.get("best_epoch")
    if cfg.eval.cold_epochs != "main" or cfg.model.name != "metarec" or not best:
        return None
    return int(best)


def cold_protocol(
    paths: Paths, cfg: Config, loaded: Loaded, frozen: bool = False, epochs: int | None = None
) -> dict[str, Any]:
    """Refit the configured model with a seeded share of items made cold and evaluate it there.

    ``epochs``: the fusion model's refit trains exactly that many (see :func:`cold_refit_epochs`);
    None: it stops early on its own validation.

    Returns the cold-items-only ranking metrics on test (``cold``) and on validation (``cold_valid``,
    empty when no validation user has a cold item), and the warm test metrics of the refitted model
    ranking the full catalogue, cold items included (``mixed``).
    """
    from components.evaluation import coldstart

    data = loaded.data
    cold = cold_split(cfg, loaded)
    clock = time.perf_counter()
    model, fitted = fit_configured(
        paths, cfg, train=cold.train, cold_items=cold.cold_items, frozen=frozen, epochs=epochs
    )
    # Where the protocol's time goes (the refit includes the encoder's re-tuning and re-encoding).
    seconds = {"refit": time.perf_counter() - clock, "refit_train": float(fitted.get("seconds", 0.0))}
    clock = time.perf_counter()

    def scores(block: np.ndarray) -> np.ndarray:
        return model.score(block, history=cold.train)

    blocks = cfg.eval.blocks()
    cap = cfg.eval.max_users
    result = coldstart.evaluate_cold(scores, cold, cfg.eval.ks, seed=cfg.seed, blocks=blocks, max_users=cap)
    # The same ranking task with the cold items' validation interactions as truth: what settings
    # aimed at cold items are chosen on (test is read once per final configuration).
    on_valid: dict[str, Any] = {}
    if data.valid[:, cold.cold_items].nnz:  # tiny datasets may have no validation user on a cold item
        on_valid = coldstart.evaluate_cold(
            scores,
            coldstart.ColdSplit(cold.train, cold.valid, data.valid, cold.cold_items),
            cfg.eval.ks,
            seed=cfg.seed,
            blocks=blocks,
            max_users=cap,
        )["overall"]
    seconds["rank_cold"], clock = time.perf_counter() - clock, time.perf_counter()
    mixed = evaluate.evaluate(
        model,
        evaluate.EvalData(cold.train, cold.valid, data.test),
        "test",
        cfg.eval.ks,
        cfg.eval.activity_buckets,
        cfg.eval.block_size,
        blocks,
        cap,
        cfg.seed,
    )
    seconds["rank_mixed"] = time.perf_counter() - clock
    retuned = cfg.model.name == "metarec" and cold_retunes(cfg, frozen)
    return {
        "cold": result,
        "cold_valid": on_valid,
        "mixed": mixed["overall"],
        "encoder_retuned": retuned,
        # Where the retuned encoder came from: the retune stage, the adapter cache, or fine-tuned here.
        "encoder_source": fitted.get("encoder_source", ""),
        # How long the refit trained and why: a fixed count (the main fit's best) or early stopping.
        "refit": {k: fitted[k] for k in ("epochs_run", "early_stopping") if k in fitted},
        "seconds": seconds,
    }


def cold_split(cfg: Config, loaded: Loaded) -> ColdSplit:
    """The cold-item protocol's seeded split of the workspace's data (``eval.cold_fraction``, ``seed``)."""
    from components.evaluation import coldstart

    data = loaded.data
    return coldstart.cold_item_split(data.train, data.valid, data.test, cfg.eval.cold_fraction, cfg.seed)


def cold_retunes(cfg: Config, frozen: bool = False) -> bool:
    """Whether the fusion model's cold refit fine-tunes the encoder again without the cold items."""
    return cfg.eval.cold_finetune and cfg.text.finetune.enabled and not frozen


def evaluate_variant(paths: Paths, cfg: Config, frozen: bool = False) -> dict[str, Any]:
    """Fit the configured model (in memory, nothing saved) and evaluate it warm and cold.

    Returns valid/test/cold/mixed overall metrics and the fit summary; the caller logs them.
    """
    loaded = load_parts(paths)
    start = time.perf_counter()
    model, summary = fit_configured(paths, cfg, train=loaded.data.train, frozen=frozen)
    out: dict[str, Any] = {"fit_seconds": time.perf_counter() - start}
    for part, result in evaluate_warm(model, loaded, cfg).items():
        out[part] = result["overall"]
    if cfg.eval.cold_fraction > 0:
        cold = cold_protocol(paths, cfg, loaded, frozen, cold_refit_epochs(cfg, summary))
        out["cold"] = cold["cold"]["overall"]
        out["cold_random"] = {k: v for k, v in cold["cold"].items() if k.startswith("random_recall@")}
        out["mixed"] = cold["mixed"]
        out["cold_valid"] = cold["cold_valid"]
    out["best_epoch"] = summary.get("best_epoch")
    return out
