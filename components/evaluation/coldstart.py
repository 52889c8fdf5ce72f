"""Cold-item evaluation protocol as pure functions on binary users x items CSR matrices.

A seeded fraction of the catalogue becomes *cold*: those items lose every training and validation
interaction, so a model fitted on the reduced training part has never seen them, while their test
interactions stay. :func:`evaluate_cold` then asks each user with a cold test item to rank only the
cold items, which measures whether side information (metadata, text, the knowledge graph) lets a
model order items it has no interaction signal for. Models that rely on interactions alone score
every cold item the same and fall to the deterministic lower-index tie-break of
:func:`components.evaluation.ranking.topk_items`, so :func:`evaluate_cold` also reports the recall a uniformly
random ranking would get as the chance level to compare against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from components.core.parallel import Blocks
from components.evaluation.metrics import compute_metrics
from components.evaluation.ranking import PAD, sample_users

ScoresFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ColdSplit:
    """A train/valid/test split in which ``cold_items`` have no train or valid interactions.

    Attributes:
        train: Training part without any interaction on a cold item.
        valid: Validation part without any interaction on a cold item.
        test: Test part, unchanged (it still holds the cold items' interactions).
        cold_items: Sorted int64 indices of the cold items.
    """

    train: sp.csr_matrix
    valid: sp.csr_matrix
    test: sp.csr_matrix
    cold_items: np.ndarray


def _check_parts(train: Any, valid: Any, test: Any) -> tuple[int, int]:
    """Insist on three sparse matrices of one shape and return that shape."""
    for what, matrix in (("train", train), ("valid", valid), ("test", test)):
        if not sp.issparse(matrix):
            raise ValueError(f"{what} must be a scipy sparse matrix, got {type(matrix).__name__}")
    if not train.shape == valid.shape == test.shape:
        raise ValueError(
            f"train, valid and test must share one users x items shape, got "
            f"{train.shape}, {valid.shape}, {test.shape}"
        )
    n_users, n_items = train.shape
    return int(n_users), int(n_items)


def _drop_items(matrix: Any, is_cold: np.ndarray) -> sp.csr_matrix:
    """Return a CSR copy of ``matrix`` without the stored entries in cold columns."""
    csr = sp.csr_matrix(matrix, copy=True)
    csr.data[is_cold[csr.indices]] = 0
    csr.eliminate_zeros()
    return csr


def remove_items(train: Any, valid: Any, test: Any, cold_items: np.ndarray) -> ColdSplit:
    """Make the given items cold: drop their train and valid interactions, keep test as is.

    Args:
        train: Users x items sparse training matrix.
        valid: Validation matrix of the same shape.
        test: Test matrix of the same shape.
        cold_items: 1-D int array of item indices to make cold (duplicates are ignored).

    Returns:
        The :class:`ColdSplit`; all three matrices are CSR copies, so the inputs are never modified.

    Raises:
        ValueError: On non-sparse or differently shaped inputs, or item indices out of range.
    """
    _, n_items = _check_parts(train, valid, test)
    items = np.asarray(cold_items)
    if items.ndim != 1 or (items.size and not np.issubdtype(items.dtype, np.integer)):
        raise ValueError(f"cold_items must be a 1-D integer array, got {items.dtype} {items.shape}")
    items = np.unique(items.astype(np.int64, copy=False))
    if items.size and (items[0] < 0 or items[-1] >= n_items):
        raise ValueError(f"cold_items must lie in [0, {n_items}), got [{items[0]}, {items[-1]}]")
    is_cold = np.zeros(n_items, dtype=bool)
    is_cold[items] = True
    return ColdSplit(
        train=_drop_items(train, is_cold),
        valid=_drop_items(valid, is_cold),
        test=sp.csr_matrix(test, copy=True),
        cold_items=items,
    )


def cold_item_split(train: Any, valid: Any, test: Any, fraction: float = 0.1, seed: int = 0) -> ColdSplit:
    """Pick a seeded random ``fraction`` of all items and make them cold.

    The items are drawn uniformly without replacement from the whole catalogue (not only from items
    with test interactions), ``round(fraction * n_items)`` of them, with
    ``np.random.default_rng(seed)``; the same inputs and seed always give the same cold set.

    Args:
        train: Users x items sparse training matrix.
        valid: Validation matrix of the same shape.
        test: Test matrix of the same shape.
        fraction: Share of items to make cold, ``0 < fraction < 1``.
        seed: Seed of the item draw.

    Returns:
        The :class:`ColdSplit`.

    Raises:
        ValueError: On invalid matrices, a ``fraction`` outside ``(0, 1)``, or one that selects no item.
    """
    _, n_items = _check_parts(train, valid, test)
    if isinstance(fraction, bool) or not 0 < fraction < 1:
        raise ValueError(f"fraction must satisfy 0 < fraction < 1, got {fraction!r}")
    n_cold = int(round(fraction * n_items))
    if n_cold < 1:
        raise ValueError(f"fraction={fraction} of {n_items} items selects no cold item")
    rng = np.random.default_rng(seed)
    cold = rng.choice(n_items, size=n_cold, replace=False)
    return remove_items(train, valid, test, np.sort(cold))


def random_recall(n_cold: int, k: int) -> float:
    """Expected recall@k of a uniformly random ranking of ``n_cold`` candidate items.

    Each relevant item lands in the top ``k`` with probability ``min(k, n_cold) / n_cold``, so by
    linearity of expectation a user's expected recall is that number whatever their truth size.

    Args:
        n_cold: Number of ranked candidates, at least 1.
        k: Cut-off, at least 1.

    Returns:
        The expected recall in ``(0, 1]``.

    Raises:
        ValueError: If ``n_cold`` or ``k`` is below 1.
    """
    if n_cold < 1 or k < 1:
        raise ValueError(f"n_cold and k must be >= 1, got n_cold={n_cold}, k={k}")
    return min(k, n_cold) / n_cold


def evaluate_cold(
    scores_fn: ScoresFn,
    cold: ColdSplit,
    ks: Iterable[int],
    block_size: int = 1024,
    seed: int = 0,
    blocks: Blocks | None = None,
    max_users: int = 0,
) -> dict[str, Any]:
    """Rank only the cold items for every user with a cold test item and score the rankings.

    Nothing is excluded from the ranking: by construction no user has a train or valid interaction
    on a cold item. Ties are broken in a seeded random order per user, not by item index: on
    ml-100k the index tracks popularity, so index order alone would give a model that scores every
    cold item alike about twice the chance recall.

    Args:
        scores_fn: Maps a 1-D int array of user indices to ``(len(block), n_items)`` scores over
            the full catalogue, e.g. ``lambda b: model.score(b, history=cold.train)``; only the cold
            columns are used.
        cold: The split from :func:`cold_item_split` (or :func:`remove_items`).
        ks: Cut-offs; cut-offs above the number of cold items rank all of them.
        block_size: Users scored per call of ``scores_fn``.
        seed: Seed of the tie-breaking order.
        blocks: Where the user blocks are scored (in order by default). The tie-breaking draws stay
            in block order, so the result is the same anywhere.
        max_users: Rank a seeded sample of that many of the users with a cold test item when there
            are more (0: all of them); the sample has its own generator, so the tie-breaking draws
            are those of the full run whenever nothing is cut.

    Returns:
        ``{"overall": compute_metrics(...), "n_users": int, "n_users_with_truth": int,
        "n_cold_items": int, "random_recall@{k}": float for each k}``; the metrics use the test
        interactions on cold items only as truth, and ``random_recall@{k}`` is the chance level of
        :func:`random_recall`.

    Raises:
        ValueError: On empty ``ks``, no cold item, no user with a cold test interaction, or a
            ``scores_fn`` result of the wrong shape.
    """
    k_list = [int(k) for k in ks]
    if not k_list or min(k_list) < 1:
        raise ValueError(f"ks must be a non-empty list of positive integers, got {k_list}")
    cold_items = np.asarray(cold.cold_items, dtype=np.int64)
    rng = np.random.default_rng(seed)
    n_cold = int(cold_items.size)
    if n_cold == 0:
        raise ValueError("the split has no cold item to evaluate")
    n_items = int(cold.test.shape[1])
    is_cold = np.zeros(n_items, dtype=bool)
    is_cold[cold_items] = True
    # Warm test items are dropped from the truth: the ranking only offers cold items.
    truth = _drop_items(cold.test, ~is_cold)
    with_truth = np.flatnonzero(np.diff(truth.indptr) > 0)
    if with_truth.size == 0:
        raise ValueError("no user has a test interaction on a cold item; cannot evaluate")
    users = sample_users(with_truth, max_users, seed + 1)

    k_max = max(k_list)
    depth = min(k_max, n_cold)
    runner = blocks or Blocks()
    parts = [users[start : start + block_size] for start in range(0, users.size, block_size)]
    wave = runner.workers if not runner.address else 8  # score blocks of one wave at once
    ranked = []
    for first in range(0, len(parts), wave):
        for scores in runner.map(_cold_scores, (scores_fn, cold_items, n_items), parts[first : first + wave]):
            # Ties fall in an independent random order per user: one shared order would make every
            # user's ranking of a constant scorer the same draw, far from chance on average.
            keys = rng.random(scores.shape)
            ranked.append(np.lexsort((keys, -scores), axis=1)[:, :depth])
    local = np.vstack(ranked)
    # Back to catalogue indices so the truth needs no re-indexing; PAD stays PAD.
    topk = np.where(local >= 0, cold_items[np.maximum(local, 0)], PAD)
    if k_max > n_cold:
        topk = np.hstack([topk, np.full((users.size, k_max - n_cold), PAD, dtype=topk.dtype)])
    result: dict[str, Any] = {
        "overall": compute_metrics(topk, truth[users], k_list),
        "n_users": int(users.size),
        "n_users_with_truth": int(with_truth.size),
        "n_cold_items": n_cold,
    }
    for k in dict.fromkeys(k_list):
        result[f"random_recall@{k}"] = random_recall(n_cold, k)
    return result


def _cold_scores(shared: tuple[ScoresFn, np.ndarray, int], block: np.ndarray) -> np.ndarray:
    """One block's scores of the cold items (module level: a Dask cluster ships it by name)."""
    scores_fn, cold_items, n_items = shared
    scores = np.asarray(scores_fn(block))
    if scores.ndim != 2 or scores.shape != (block.size, n_items):
        raise ValueError(
            f"scores_fn returned shape {scores.shape} for {block.size} users; "
            f"expected ({block.size}, {n_items})"
        )
    return scores[:, cold_items]
