"""Full-catalogue top-K ranking with exclusions and deterministic tie-breaking.

Ranking order is descending score, ties broken by the lower item index, so a ranking depends
only on the scores and never on partition internals or block sizes. Items whose final score is
``-inf`` (excluded, or scored ``-inf`` by the model) are never recommended; when fewer than ``k``
recommendable items remain, the row is padded with ``-1``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

from components.core.parallel import Blocks

PAD = -1

ScoreFn = Callable[[np.ndarray], np.ndarray]


def sample_users(users: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """``users``, or a sorted seeded sample of ``cap`` of them when there are more (``cap`` 0: all of them).

    How every ranking at scale bounds its cost: each user ranked costs a score of the whole catalogue.
    """
    if cap <= 0 or len(users) <= cap:
        return users
    return np.sort(np.random.default_rng(seed).choice(users, size=cap, replace=False))


def topk_items(scores: np.ndarray, k: int, exclude: sp.csr_matrix | sp.sparray | None = None) -> np.ndarray:
    """Return the ``k`` best items per row, best first, ties broken by lower item index.

    Args:
        scores: Float array ``(n_rows, n_items)``; it is not modified.
        k: Number of items to return, ``1 <= k <= n_items``.
        exclude: Optional sparse matrix of shape ``(n_rows, n_items)``; stored non-zero entries mark
            (row, item) pairs that must not be returned (e.g. training interactions).

    Returns:
        Int64 array ``(n_rows, k)`` of item indices; positions with no recommendable item left
        hold ``-1``.

    Raises:
        ValueError: If ``scores`` is not 2-D, contains NaN, ``k`` is out of range, or ``exclude``
            has a different shape.
    """
    raw = np.asarray(scores)
    if raw.ndim != 2:
        raise ValueError(f"scores must be a 2-D array (n_rows, n_items), got shape {raw.shape}")
    n_rows, n_items = raw.shape
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise ValueError(f"k must be an integer, got {k!r}")
    if k < 1 or k > n_items:
        raise ValueError(f"k must satisfy 1 <= k <= n_items={n_items}, got k={k}")
    k = int(k)
    # Private copy so exclusions never leak into the caller's array; float inputs keep their dtype
    # (no precision is gained by widening, and float32 halves the block's memory).
    dtype = raw.dtype if np.issubdtype(raw.dtype, np.floating) else np.float64
    work = np.array(raw, dtype=dtype, copy=True)
    if np.isnan(work).any():
        raise ValueError("scores contain NaN; a NaN has no place in a ranking")
    if exclude is not None:
        if exclude.shape != (n_rows, n_items):
            raise ValueError(
                f"exclude has shape {exclude.shape}, expected {(n_rows, n_items)} to match scores"
            )
        ex_rows, ex_cols = sp.csr_matrix(exclude).nonzero()
        work[ex_rows, ex_cols] = -np.inf
    if n_rows == 0:
        return np.empty((0, k), dtype=np.int64)

    neg = -work
    # argpartition picks an arbitrary subset among items tied with the k-th score, so use it only
    # to find that threshold, then admit tied items in index order to make the cut deterministic.
    kth_idx = np.argpartition(neg, k - 1, axis=1)[:, k - 1]
    threshold = work[np.arange(n_rows), kth_idx][:, None]
    above = work > threshold
    tied = work == threshold
    n_tied_needed = k - above.sum(axis=1, keepdims=True)
    selected = above | (tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= n_tied_needed))

    # nonzero walks row-major, so each row's k picks come out in ascending item order; a stable
    # sort on -score then leaves ties in that order, i.e. lower index first.
    _, cols = np.nonzero(selected)
    cand = cols.reshape(n_rows, k)
    cand_neg = np.take_along_axis(neg, cand, axis=1)
    order = np.argsort(cand_neg, axis=1, kind="stable")
    top = np.take_along_axis(cand, order, axis=1).astype(np.int64, copy=False)
    top_scores = np.take_along_axis(work, top, axis=1)
    top[np.isneginf(top_scores)] = PAD
    return top


def rank_all(
    score_fn: ScoreFn,
    user_indices: np.ndarray,
    k: int,
    exclude_csr: sp.csr_matrix | sp.sparray | None,
    block_size: int = 1024,
    blocks: Blocks | None = None,
) -> np.ndarray:
    """Rank the full catalogue for many users, scoring one block of users at a time.

    Only one ``(block_size, n_items)`` score block per worker lives in memory at once.

    Args:
        score_fn: Maps a 1-D int array of global user indices to a ``(len(block), n_items)``
            score array.
        user_indices: 1-D int array of global user indices to rank for.
        k: Number of items per user, ``1 <= k <= n_items``.
        exclude_csr: Optional sparse matrix whose rows are indexed by global user index and whose
            stored non-zero entries are items never to recommend to that user.
        block_size: Users scored per call of ``score_fn``.
        blocks: Where the blocks run (:class:`~components.core.parallel.Blocks`); default in order.
            The result is the same wherever they run.

    Returns:
        Int64 array ``(len(user_indices), k)``, rows in the order of ``user_indices``; ``-1`` pads
        rows with fewer than ``k`` recommendable items.

    Raises:
        ValueError: On a non-positive ``block_size``, a non 1-D ``user_indices``, a ``score_fn`` result
            of the wrong shape, user indices outside ``exclude_csr``, or any error of :func:`topk_items`.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    users = np.asarray(user_indices)
    if users.ndim != 1:
        raise ValueError(f"user_indices must be 1-D, got shape {users.shape}")
    if users.size and not np.issubdtype(users.dtype, np.integer):
        raise ValueError(f"user_indices must be integers, got dtype {users.dtype}")
    users = users.astype(np.int64, copy=False)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if users.size == 0:
        return np.empty((0, int(k)), dtype=np.int64)

    exclude = None
    if exclude_csr is not None:
        exclude = sp.csr_matrix(exclude_csr)
        if users.min() < 0 or users.max() >= exclude.shape[0]:
            raise ValueError(f"user_indices must lie in [0, {exclude.shape[0]}) to index exclude_csr rows")

    parts = [users[start : start + int(block_size)] for start in range(0, users.size, int(block_size))]
    ranked = (blocks or Blocks()).map(_rank_block, (score_fn, exclude, int(k)), parts)
    return np.vstack(ranked)


def _rank_block(shared: tuple[ScoreFn, sp.csr_matrix | None, int], block: np.ndarray) -> Any:
    score_fn, exclude, k = shared
    scores = np.asarray(score_fn(block))
    if scores.ndim != 2 or scores.shape[0] != block.size:
        raise ValueError(
            f"score_fn returned shape {scores.shape} for {block.size} users; expected (n_users, n_items)"
        )
    block_exclude = None
    if exclude is not None:
        if exclude.shape[1] != scores.shape[1]:
            raise ValueError(
                f"exclude_csr has {exclude.shape[1]} item columns but score_fn returned {scores.shape[1]}"
            )
        block_exclude = exclude[block]
    return topk_items(scores, k, block_exclude)
