"""Evaluate stage: full ranking over all items with per-slice metrics.

Protocol (the one the calibration numbers in the docs were measured with): models are fit on the
training part and score with the training history; when ranking for valid, training items are
excluded; when ranking for test, training and validation items are excluded. Metrics average over
users with at least one held-out item.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp

from components.core.parallel import Blocks
from components.evaluation.metrics import compute_metrics
from components.evaluation.ranking import PAD, rank_all, sample_users


class Scorer(Protocol):
    """What the protocol needs of a model: every recommender, and a serving bundle's ONNX scorer."""

    def score(self, users: np.ndarray, history: sp.csr_matrix | None = None) -> np.ndarray: ...


@dataclass
class EvalData:
    """Binary user×item matrices of each part."""

    train: sp.csr_matrix
    valid: sp.csr_matrix
    test: sp.csr_matrix

    def exclusions(self, part: str) -> sp.csr_matrix:
        """Items never to rank for a user when evaluating ``part``: everything seen before it."""
        if part == "valid":
            return self.train
        if part == "test":
            return (self.train + self.valid).tocsr()
        raise ValueError(f"part must be 'valid' or 'test', got {part!r}")


def _restrict(truth: sp.csr_matrix, item_mask: np.ndarray) -> sp.csr_matrix:
    return (truth @ sp.diags(item_mask.astype(np.float32))).tocsr()


def activity_labels(train: sp.csr_matrix, edges: list[int]) -> np.ndarray:
    """Label each user by training-interaction count, e.g. ``21-50`` for edges [20, 50, 100]."""
    counts = np.diff(train.indptr)
    labels = np.empty(len(counts), dtype=object)
    lower = 0
    remaining = np.ones(len(counts), dtype=bool)
    for upper in edges:
        mask = remaining & (counts <= upper)
        labels[mask] = f"{lower}-{upper}"
        remaining &= ~mask
        lower = upper + 1
    labels[remaining] = f"{lower}+"
    return labels


def evaluate(
    model: Scorer,
    data: EvalData,
    part: str,
    ks: list[int],
    activity_buckets: list[int],
    block_size: int = 1024,
    blocks: Blocks | None = None,
    max_users: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Rank all items for every user with held-out items in ``part``; return overall and slice metrics.

    ``blocks``: where the user blocks are scored (in order by default; the same result anywhere).
    ``max_users``: rank a seeded sample (``seed``) of that many of those users when there are more
    (0: all); ``users`` in the result says how many were ranked of how many.

    Slices: ``cold_items``/``warm_items`` restrict the held-out set to items without/with training
    interactions (the ranking is unchanged); ``activity=<bucket>`` averages over the users of one
    training-activity bucket.
    """
    truth = data.test if part == "test" else data.valid
    with_truth = np.flatnonzero(np.diff(truth.indptr) > 0)
    k_max = max(ks)
    if len(with_truth) == 0:
        raise ValueError(f"no user has {part} interactions; cannot evaluate")
    users = sample_users(with_truth, max_users, seed)

    def score(block: np.ndarray) -> np.ndarray:
        return model.score(block, history=data.train)

    # Cut-offs beyond the catalogue size rank everything and pad with PAD (-1), which metrics ignore.
    n_items = truth.shape[1]
    topk = rank_all(
        score, users, min(k_max, n_items), data.exclusions(part), block_size=block_size, blocks=blocks
    )
    if k_max > n_items:
        topk = np.hstack([topk, np.full((len(users), k_max - n_items), PAD, dtype=topk.dtype)])
    truth_rows = truth[users]
    result: dict[str, Any] = {
        "overall": compute_metrics(topk, truth_rows, ks),
        "users": {"ranked": int(len(users)), "with_truth": int(len(with_truth))},
    }

    warm = np.asarray(data.train.sum(axis=0)).ravel() > 0
    slices: dict[str, dict[str, float]] = {}
    for name, mask in (("warm_items", warm), ("cold_items", ~warm)):
        sub = _restrict(truth_rows, mask)
        if sub.nnz:
            slices[name] = compute_metrics(topk, sub, ks)
    labels = activity_labels(data.train, activity_buckets)[users]
    for label in sorted(set(labels), key=lambda s: int(s.split("-")[0].rstrip("+"))):
        rows = labels == label
        slices[f"activity={label}"] = compute_metrics(topk[rows], truth_rows[rows], ks)
    result["slices"] = slices
    return result


def flat_metrics(result: dict[str, Any], part: str) -> dict[str, float]:
    """Flatten an evaluation result into MLflow metric names such as ``test.ndcg@10``."""
    out = {f"{part}.{k}": float(v) for k, v in result["overall"].items()}
    for slice_name, metrics in result["slices"].items():
        safe = slice_name.replace("=", "_").replace("+", "plus")
        out.update({f"{part}.{safe}.{k}": float(v) for k, v in metrics.items()})
    return out
