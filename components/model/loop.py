"""Training loop of the fusion scorer, readable top to bottom.

Why a holdout inside the training part: metapath channels count paths through the user's own
interactions, so a training positive always reaches itself (``user–item–user–item`` passes through
the very edge being predicted). Fitting the fusion on such pairs teaches it to trust leaked evidence.
Instead each user's training interactions are cut in time: the features and the history come from the
earlier part, and the model learns to predict the later part (``holdout``), which is exactly the task
it faces at validation and test time. Validation then uses features from the whole training part.

Loss: softmax over the full catalogue (1.7k items on ml-100k, cheap) with the user's feature history
masked, averaged over each user's held-out items — the listwise form of sampled softmax with every
item a negative. AdamW, early stopping on validation NDCG@10, the best epoch's weights kept.

At scale an epoch is a seeded sample of at most ``epoch_users`` users and validation a fixed seeded
sample of ``valid_users``: both cost users × items, and neither cap touches ml-100k (943 users). Early
stopping counts both stale epochs (``patience``) and the users trained on since the best epoch
(``patience_users``), whichever runs out first: at 10k users an epoch, 8 stale epochs are 80k users.
A refit of known length (the cold-item protocol's: the main fit's best epoch count) skips validation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from components.core.config import MetarecConfig
from components.core.parallel import Blocks
from components.evaluation.metrics import compute_metrics
from components.evaluation.ranking import rank_all, sample_users
from components.model.features import FeatureBank
from components.model.net import FusionNet, NetConfig


@dataclass(frozen=True)
class TrainConfig:
    """What a fit is: the ``model.metarec`` section's loop hyperparameters plus seed, metric and threads.

    No defaults here: ``MetarecConfig`` holds them (with the validation results that picked them), and
    :meth:`from_section` is how a config is made, so they cannot drift from ``params.yaml``.
    """

    epochs: int
    patience: int
    lr: float
    weight_decay: float
    id_reg: float
    item_dropout: float
    batch_users: int
    epoch_users: int
    valid_users: int
    patience_users: int
    holdout: float
    rank: int
    use_paths: bool
    use_text: bool
    use_ids: bool
    text_to_id: bool
    text_warm: bool
    gates: str
    feature_cache_mb: float
    eval_metric: str  # early-stopping metric (the pipeline's eval.primary), computed on validation each epoch
    seed: int
    threads: int

    @classmethod
    def from_section(cls, mcfg: MetarecConfig, seed: int, eval_metric: str, threads: int = 2) -> TrainConfig:
        """The loop's config from a validated ``model.metarec`` section."""
        names = {f.name for f in fields(cls)} - {"eval_metric", "seed", "threads"}
        return cls(eval_metric=eval_metric, seed=seed, threads=threads, **mcfg.model_dump(include=names))


@dataclass
class FusionInputs:
    """Everything the loop needs, index-aligned with the processed users/items tables."""

    item_text: np.ndarray  # (n_items, d) unit rows
    profile: np.ndarray  # (n_users, d) profile-only text embeddings
    history: sp.csr_matrix  # (n_users, n_items) binary: features and history for fitting
    targets: sp.csr_matrix  # (n_users, n_items) binary: what the fit learns to predict
    fit_bank: FeatureBank  # channels computed from ``history``
    eval_history: sp.csr_matrix  # the whole training part, for validation scoring
    eval_bank: FeatureBank  # channels computed from ``eval_history``
    valid: sp.csr_matrix  # (n_users, n_items) validation truth
    warm: np.ndarray  # (n_items,) bool: items with training interactions
    channel_text: np.ndarray | None = None  # (n_channels, d) verbalised channels, for language gates
    item_attributes: np.ndarray | None = None  # (n_items, n_attributes) metadata one-hots, for their bias


EpochLog = Callable[[int, dict[str, float]], None]


def temporal_holdout(
    train: pd.DataFrame, n_users: int, n_items: int, share: float
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Cut each user's training interactions by time: (earlier part, latest ``share``).

    Users with a single interaction keep it in the earlier part (nothing to learn from them).
    """
    from components.data.kg import binary_matrix

    if not 0 < share < 1:
        raise ValueError(f"holdout must be in (0, 1), got {share}")
    ordered = train.sort_values(["user", "timestamp", "item"], kind="stable")
    position = ordered.groupby("user").cumcount().to_numpy()
    sizes = ordered.groupby("user")["item"].transform("size").to_numpy()
    n_held = np.where(sizes >= 2, np.maximum(1, np.floor(sizes * share)).astype(int), 0)
    held = position >= sizes - n_held
    users, items = ordered.user.to_numpy(), ordered.item.to_numpy()
    shape = (n_users, n_items)
    return binary_matrix(users[~held], items[~held], shape), binary_matrix(users[held], items[held], shape)


def _dense(rows: sp.csr_matrix) -> torch.Tensor:
    return torch.from_numpy(np.asarray(rows.toarray(), dtype=np.float32))


def feature_rows(bank: FeatureBank, history: sp.csr_matrix, users: np.ndarray, threads: Blocks) -> np.ndarray:
    """``bank.rows`` of ``users`` under ``history``, the users split over ``threads`` (same rows, in order).

    Rows are independent per user and their sparse products release the GIL: on the large synthetic
    graph a batch of 128 users took 1.0 s in one call and 0.5 s as two halves on 2 threads, which is
    most of an epoch when the features are not cached.
    """
    parts = [part for part in np.array_split(users, threads.workers) if len(part)]
    return np.concatenate(threads.map(_rows_of, (bank, history), parts), axis=0)


def _rows_of(shared: tuple[FeatureBank, sp.csr_matrix], users: np.ndarray) -> np.ndarray:
    bank, history = shared
    return bank.rows(history[users], users)


def score_users(
    net: FusionNet, bank: FeatureBank, history: sp.csr_matrix, profile: np.ndarray, users: np.ndarray
) -> np.ndarray:
    """Scores ``(len(users), n_items)`` for known users under ``history``."""
    with torch.no_grad():
        feats = torch.from_numpy(bank.rows(history[users], users))
        out = net(_dense(history[users]), torch.from_numpy(profile[users]), feats)
    return np.asarray(out.numpy(), dtype=np.float32)


def validation_users(valid: sp.csr_matrix, cap: int, seed: int) -> np.ndarray:
    """Users with validation interactions, or a seeded sample of ``cap`` of them (sorted) when more."""
    return sample_users(np.flatnonzero(np.diff(valid.indptr) > 0), cap, seed)


def validation_metrics(
    net: FusionNet,
    inputs: FusionInputs,
    k: int,
    users: np.ndarray | None = None,
    blocks: Blocks | None = None,
) -> dict[str, float]:
    """Validation metrics at ``k`` under the evaluation protocol (train history, train excluded).

    ``users``: the validation users to rank (default: every user with a validation interaction);
    ``blocks``: where their blocks are ranked (in order by default).
    """
    if users is None:
        users = np.flatnonzero(np.diff(inputs.valid.indptr) > 0)
    topk = rank_all(
        lambda block: score_users(net, inputs.eval_bank, inputs.eval_history, inputs.profile, block),
        users,
        k,
        inputs.eval_history,
        blocks=blocks,
    )
    metrics = compute_metrics(topk, inputs.valid[users], [k])
    return {name: float(v) for name, v in metrics.items() if name != "n_users"}


def train(
    inputs: FusionInputs,
    cfg: TrainConfig,
    on_epoch: EpochLog | None = None,
    blocks: Blocks | None = None,
    epochs: int | None = None,
) -> tuple[FusionNet, dict]:
    """Fit the scorer; return the best-epoch network and a summary (best epoch, curve, seconds).

    ``blocks``: where each epoch's validation ranks its user blocks (in order by default).
    ``epochs``: train exactly this many epochs and keep the last weights, validating none of them (the
    cold refit repeats the main fit's best epoch count); the epochs see the same users as they would
    with validation, which draws from its own generator.
    """
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    net_cfg = NetConfig(
        n_items=inputs.item_text.shape[0],
        text_dim=inputs.item_text.shape[1],
        n_channels=len(inputs.fit_bank.channels),
        rank=cfg.rank,
        use_paths=cfg.use_paths,
        use_text=cfg.use_text,
        use_ids=cfg.use_ids,
        text_to_id=cfg.text_to_id,
        text_warm=cfg.text_warm,
        gates=cfg.gates,
        n_attributes=0 if inputs.item_attributes is None else int(inputs.item_attributes.shape[1]),
    )
    channel_text = None if inputs.channel_text is None else torch.from_numpy(inputs.channel_text)
    attributes = None if inputs.item_attributes is None else torch.from_numpy(inputs.item_attributes)
    net = FusionNet(
        net_cfg,
        torch.from_numpy(inputs.item_text),
        torch.from_numpy(inputs.warm),
        cfg.seed,
        channel_text,
        attributes,
    )
    optimiser = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    users = np.flatnonzero(np.diff(inputs.targets.indptr) > 0)
    if len(users) == 0:
        raise ValueError("no user has held-out training interactions; nothing to fit")
    # Its own generator: the training stream stays the same whether or not validation is sampled.
    judged = validation_users(inputs.valid, cfg.valid_users, cfg.seed + 1)
    # Features of the fit part do not change during training: computed once if they fit the budget,
    # else per batch (row by row the same values, so the same fit; tested).
    n_fit_users = inputs.history.shape[0]
    cache_bytes = n_fit_users * len(inputs.fit_bank.channels) * net_cfg.n_items * 4
    cached = cache_bytes <= cfg.feature_cache_mb * 2**20
    fit_feats = inputs.fit_bank.rows(inputs.history, np.arange(n_fit_users)) if cached else None
    feature_threads = Blocks(cfg.threads)  # local threads: a batch's features are not worth shipping
    collaborative = torch.from_numpy(inputs.fit_bank.collaborative)
    warm = torch.from_numpy(inputs.warm.astype(np.float32))
    metric_name, _, k_text = cfg.eval_metric.partition("@")
    eval_k = min(int(k_text), net_cfg.n_items)  # a catalogue smaller than k ranks everything
    key = f"{metric_name}@{eval_k}"
    best, best_epoch, best_state, stale, stale_users = -1.0, 0, None, 0, 0
    curve: list[dict[str, float]] = []
    start = time.perf_counter()
    from tqdm import tqdm

    # disable=None: a bar on a terminal, silence in logs and CI.
    fixed = epochs is not None
    if epochs is not None and not 0 < epochs <= cfg.epochs:
        raise ValueError(f"epochs must be between 1 and model.metarec.epochs ({cfg.epochs}), got {epochs}")
    n_epochs = cfg.epochs if epochs is None else epochs
    bar = tqdm(range(1, n_epochs + 1), desc="metarec train", unit="epoch", leave=False, disable=None)
    for epoch in bar:
        net.train()
        order = rng.permutation(users)[: cfg.epoch_users]
        total, batches = 0.0, 0
        for lo in range(0, len(order), cfg.batch_users):
            batch = order[lo : lo + cfg.batch_users]
            history = _dense(inputs.history[batch])
            rows = (
                fit_feats[batch]
                if fit_feats is not None
                else feature_rows(inputs.fit_bank, inputs.history, batch, feature_threads)
            )
            feats = torch.from_numpy(rows)
            batch_warm = warm
            if cfg.item_dropout > 0:
                dropped = torch.from_numpy(rng.random(len(warm)) < cfg.item_dropout)
                batch_warm = warm * ~dropped
                hide = collaborative[:, None] & dropped[None, :]
                feats = feats.masked_fill(hide[None, :, :], 0.0)
            logits = net(history, torch.from_numpy(inputs.profile[batch]), feats, batch_warm)
            logits = logits.masked_fill(history > 0, -1e9)  # seen items are never the answer
            target = _dense(inputs.targets[batch])
            log_p = torch.log_softmax(logits, dim=1)
            loss = -((log_p * target).sum(dim=1) / target.sum(dim=1)).mean()
            if cfg.use_ids and cfg.id_reg:
                penalty = net.id_item.pow(2).sum() + net.id_user.pow(2).sum()
                if cfg.text_to_id:
                    penalty = penalty + net.id_from_text.pow(2).sum()
                loss = loss + cfg.id_reg * penalty / len(batch)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item()
            batches += 1
        net.eval()
        if fixed:
            curve.append({"loss": total / batches})
            if on_epoch is not None:
                on_epoch(epoch, curve[-1])
            best_epoch = epoch  # the last weights are the ones kept
            continue
        metrics = validation_metrics(net, inputs, eval_k, judged, blocks)
        row = {"loss": total / batches, **{f"valid.{k}": v for k, v in metrics.items()}}
        curve.append(row)
        if on_epoch is not None:
            on_epoch(epoch, row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", ndcg=f"{metrics[key]:.4f}")
        if metrics[key] > best:
            best, best_epoch, stale, stale_users = metrics[key], epoch, 0, 0
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            stale, stale_users = stale + 1, stale_users + len(order)
            if stale >= cfg.patience or 0 < cfg.patience_users <= stale_users:
                break
    bar.close()
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    summary = {
        "best_epoch": best_epoch,
        f"best_valid_{key}": None if fixed else best,
        "epochs_run": len(curve),
        "early_stopping": not fixed,
        "seconds": time.perf_counter() - start,
        "curve": curve,
        "fit_users": int(len(users)),
        "epoch_users": int(min(len(users), cfg.epoch_users)),
        "valid_users": 0 if fixed else int(len(judged)),
        "fit_targets": int(inputs.targets.nnz),
        "features_cached": cached,
    }
    return net, summary
