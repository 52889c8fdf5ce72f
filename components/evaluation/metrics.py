"""Top-K ranking metrics (recall, precision, NDCG, hit rate, MRR) as pure numpy functions.

Every function takes ``topk``, an integer array of shape ``(n_users, K_max)`` holding each user's
ranked item indices (best first), and ``truth``, the held-out items of the same users either as a
list of integer arrays or as a scipy sparse matrix with one row per row of ``topk``. Negative
entries in ``topk`` are padding (fewer than ``K_max`` recommendable items) and never count as hits.

Per-user functions return float64 arrays with 0.0 for users without held-out items;
:func:`compute_metrics` is the place that drops those users from the averages.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias

import numpy as np
import scipy.sparse as sp

# scipy ships no type information, so sparse inputs are typed as Any.
Truth: TypeAlias = Sequence[np.ndarray] | Any

METRIC_NAMES: tuple[str, ...] = ("recall", "precision", "ndcg", "hit", "mrr")


def _check_topk(topk: np.ndarray) -> np.ndarray:
    """Return ``topk`` as a 2-D int64 array, rejecting shapes and dtypes that cannot be rankings."""
    arr = np.asarray(topk)
    if arr.ndim != 2:
        raise ValueError(f"topk must be a 2-D array (n_users, K_max), got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError("topk must have at least one column (K_max >= 1)")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"topk must hold integer item indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    # A repeated item would be counted as several hits and push recall above 1.
    masked = np.where(arr >= 0, arr, -np.arange(1, arr.shape[1] + 1, dtype=np.int64))
    ordered = np.sort(masked, axis=1)
    if np.any(ordered[:, 1:] == ordered[:, :-1]):
        raise ValueError("topk rows must not repeat an item index")
    return arr


def _truth_to_csr(truth: Truth, n_users: int, topk: np.ndarray) -> sp.csr_matrix:
    """Convert ``truth`` to a binary CSR matrix with one row per user and no duplicate entries."""
    if sp.issparse(truth):
        csr = sp.csr_matrix(truth, copy=True)
        if csr.shape[0] != n_users:
            raise ValueError(
                f"truth has {csr.shape[0]} rows but topk has {n_users} users; they must match row for row"
            )
        csr.sum_duplicates()
        csr.eliminate_zeros()
    else:
        rows: list[np.ndarray] = list(truth)
        if len(rows) != n_users:
            raise ValueError(
                f"truth has {len(rows)} entries but topk has {n_users} users; they must match row for row"
            )
        cleaned = [_clean_truth_row(row, u) for u, row in enumerate(rows)]
        lengths = np.fromiter((len(r) for r in cleaned), dtype=np.int64, count=n_users)
        indptr = np.concatenate(([0], np.cumsum(lengths)))
        indices = np.concatenate(cleaned) if cleaned else np.zeros(0, dtype=np.int64)
        max_truth = int(indices.max()) + 1 if indices.size else 0
        max_topk = int(topk.max()) + 1 if topk.size else 0
        n_cols = max(max_truth, max_topk, 1)
        csr = sp.csr_matrix(
            (np.ones(indices.size, dtype=np.float64), indices, indptr), shape=(n_users, n_cols)
        )
    csr.data = np.ones_like(csr.data, dtype=np.float64)
    return csr


def _clean_truth_row(row: Iterable[int] | np.ndarray, user: int) -> np.ndarray:
    """Return one user's held-out items as sorted unique non-negative int64 indices."""
    arr = np.asarray(row)
    if arr.ndim != 1:
        raise ValueError(f"truth entry {user} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"truth entry {user} must hold integer item indices, got dtype {arr.dtype}")
    arr = np.unique(arr.astype(np.int64, copy=False))
    if arr.size and arr[0] < 0:
        raise ValueError(f"truth entry {user} holds a negative item index")
    return arr


def _prepare(topk: np.ndarray, truth: Truth) -> tuple[np.ndarray, sp.csr_matrix]:
    """Validate inputs once so every metric shares the same checks."""
    arr = _check_topk(topk)
    return arr, _truth_to_csr(truth, arr.shape[0], arr)


def _hits(topk: np.ndarray, truth_csr: sp.csr_matrix) -> np.ndarray:
    """Mark which ranked items are held-out items, using already-validated inputs."""
    n_users, k_max = topk.shape
    if topk.size == 0:
        return np.zeros((n_users, k_max), dtype=bool)
    # Encode (user, item) pairs as single integers so one vectorised isin covers all users.
    width = max(int(truth_csr.shape[1]), int(topk.max()) + 1, 1)
    coo = truth_csr.tocoo()
    truth_keys = coo.row.astype(np.int64) * width + coo.col.astype(np.int64)
    rows = np.arange(n_users, dtype=np.int64)[:, None]
    ranked_keys = rows * width + topk
    hits = np.isin(ranked_keys, truth_keys)
    hits &= topk >= 0
    return hits


def _n_truth(truth_csr: sp.csr_matrix) -> np.ndarray:
    """Count held-out items per user."""
    return np.diff(truth_csr.indptr).astype(np.int64)


def _check_k(k: int, k_max: int) -> int:
    """Reject cut-offs outside ``1..K_max``; a larger k would silently truncate to K_max."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise ValueError(f"k must be an integer, got {k!r}")
    if k < 1 or k > k_max:
        raise ValueError(f"k must satisfy 1 <= k <= K_max={k_max}, got k={k}")
    return int(k)


def _discounts(k: int) -> np.ndarray:
    """Return the DCG position discounts 1/log2(p+1) for 1-based positions p=1..k."""
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def recall_from_hits(hits: np.ndarray, n_truth: np.ndarray, k: int) -> np.ndarray:
    """Per-user recall@k from a hits matrix; 0 where there is no truth."""
    n_hits = hits[:, :k].sum(axis=1).astype(np.float64)
    return np.divide(n_hits, n_truth, out=np.zeros_like(n_hits), where=n_truth > 0)


def _precision(hits: np.ndarray, k: int) -> np.ndarray:
    """Per-user precision@k from a hits matrix."""
    return hits[:, :k].sum(axis=1).astype(np.float64) / k


def hit_from_hits(hits: np.ndarray, k: int) -> np.ndarray:
    """Per-user hit@k from a hits matrix."""
    return np.asarray(hits[:, :k].any(axis=1), dtype=np.float64)


def _mrr(hits: np.ndarray, k: int) -> np.ndarray:
    """Per-user MRR@k from a hits matrix."""
    window = hits[:, :k]
    first = window.argmax(axis=1)
    return np.where(window.any(axis=1), 1.0 / (first + 1.0), 0.0).astype(np.float64)


def ndcg_from_hits(hits: np.ndarray, n_truth: np.ndarray, k: int) -> np.ndarray:
    """Per-user binary NDCG@k from a hits matrix; 0 where there is no truth."""
    disc = _discounts(k)
    dcg = hits[:, :k].astype(np.float64) @ disc
    # ideal[m] is the DCG of m relevant items placed at the top; index 0 stays 0 for empty truth.
    ideal = np.concatenate(([0.0], np.cumsum(disc)))
    idcg = ideal[np.minimum(n_truth, k)]
    return np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)


def hits_matrix(topk: np.ndarray, truth_csr: Truth) -> np.ndarray:
    """Mark which recommended items are among each user's held-out items.

    Args:
        topk: Int array ``(n_users, K_max)`` of ranked item indices, best first; negative entries are
            padding and never hit.
        truth_csr: Held-out items per user, a sparse matrix or a list of int arrays, one row per
            row of ``topk``.

    Returns:
        Bool array ``(n_users, K_max)``; ``True`` where ``topk[u, p]`` is a held-out item of user ``u``.

    Raises:
        ValueError: If ``topk`` is not a 2-D integer array without repeated items per row, or the
            number of truth rows differs from the number of ``topk`` rows.
    """
    arr, csr = _prepare(topk, truth_csr)
    return _hits(arr, csr)


def recall_at_k(topk: np.ndarray, truth: Truth, k: int) -> np.ndarray:
    """Compute per-user recall@k: hits in the top k divided by the number of held-out items.

    Args:
        topk: Int array ``(n_users, K_max)`` of ranked item indices, best first.
        truth: Held-out items per user (sparse matrix or list of int arrays).
        k: Cut-off, ``1 <= k <= K_max``.

    Returns:
        Float64 array ``(n_users,)``; 0.0 for users without held-out items.

    Raises:
        ValueError: On invalid ``k`` or mismatched inputs.
    """
    arr, csr = _prepare(topk, truth)
    k = _check_k(k, arr.shape[1])
    return recall_from_hits(_hits(arr, csr), _n_truth(csr), k)


def precision_at_k(topk: np.ndarray, truth: Truth, k: int) -> np.ndarray:
    """Compute per-user precision@k: hits in the top k divided by k.

    Args:
        topk: Int array ``(n_users, K_max)`` of ranked item indices, best first.
        truth: Held-out items per user (sparse matrix or list of int arrays).
        k: Cut-off, ``1 <= k <= K_max``.

    Returns:
        Float64 array ``(n_users,)``.

    Raises:
        ValueError: On invalid ``k`` or mismatched inputs.
    """
    arr, csr = _prepare(topk, truth)
    k = _check_k(k, arr.shape[1])
    return _precision(_hits(arr, csr), k)


def ndcg_at_k(topk: np.ndarray, truth: Truth, k: int) -> np.ndarray:
    """Compute per-user binary NDCG@k.

    DCG sums ``1/log2(p+1)`` over 1-based hit positions ``p <= k``; IDCG is the same sum over
    ``p = 1..min(|truth|, k)``.

    Args:
        topk: Int array ``(n_users, K_max)`` of ranked item indices, best first.
        truth: Held-out items per user (sparse matrix or list of int arrays).
        k: Cut-off, ``1 <= k <= K_max``.

    Returns:
        Float64 array ``(n_users,)`` in ``[0, 1]``; 0.0 for users without held-out items.

    Raises:
        ValueError: On invalid ``k`` or mismatched inputs.
    """
    arr, csr = _prepare(topk, truth)
    k = _check_k(k, arr.shape[1])
    return ndcg_from_hits(_hits(arr, csr), _n_truth(csr), k)


def hit_at_k(topk: np.ndarray, truth: Truth, k: int) -> np.ndarray:
    """Compute per-user hit@k: 1.0 if any of the top k items is held out, else 0.0.

    Args:
        topk: Int array ``(n_users, K_max)`` of ranked item indices, best first.
        truth: Held-out items per user (sparse matrix or list of int arrays).
        k: Cut-off, ``1 <= k <= K_max``.

    Returns:
        Float64 array ``(n_users,)`` of 0.0/1.0.

    Raises:
        ValueError: On invalid ``k`` or mismatched inputs.
    """
    arr, csr = _prepare(topk, truth)
    k = _check_k(k, arr.shape[1])
    return hit_from_hits(_hits(arr, csr), k)


def mrr_at_k(topk: np.ndarray, truth: Truth, k: int) -> np.ndarray:
    """Compute per-user MRR@k: reciprocal 1-based rank of the first hit within the top k, else 0.

    Args:
        topk: Int array ``(n_users, K_max)`` of ranked item indices, best first.
        truth: Held-out items per user (sparse matrix or list of int arrays).
        k: Cut-off, ``1 <= k <= K_max``.

    Returns:
        Float64 array ``(n_users,)``.

    Raises:
        ValueError: On invalid ``k`` or mismatched inputs.
    """
    arr, csr = _prepare(topk, truth)
    k = _check_k(k, arr.shape[1])
    return _mrr(_hits(arr, csr), k)


def compute_metrics(topk: np.ndarray, truth_csr: Truth, ks: Iterable[int] = (10, 20)) -> dict[str, float]:
    """Average every metric at every cut-off over users that have at least one held-out item.

    Users without held-out items are dropped from the averages rather than counted as 0, since
    no ranking could score on them.

    Args:
        topk: Int array ``(n_users, K_max)`` of ranked item indices, best first.
        truth_csr: Held-out items per user (sparse matrix or list of int arrays).
        ks: Cut-offs, each ``1 <= k <= K_max``.

    Returns:
        Mapping with keys ``"{metric}@{k}"`` for metric in recall, precision, ndcg, hit, mrr, plus
        ``"n_users"`` (the number of users averaged over). With no evaluable user every metric
        is ``nan``.

    Raises:
        ValueError: On an empty or invalid ``ks`` or mismatched inputs.
    """
    arr, csr = _prepare(topk, truth_csr)
    k_list = [_check_k(k, arr.shape[1]) for k in ks]
    if not k_list:
        raise ValueError("ks must contain at least one cut-off")
    n_truth = _n_truth(csr)
    keep = n_truth > 0
    hits = _hits(arr[keep], csr[keep])
    n_truth = n_truth[keep]
    n_eval = int(keep.sum())

    result: dict[str, float] = {}
    for k in dict.fromkeys(k_list):
        per_user = {
            "recall": recall_from_hits(hits, n_truth, k),
            "precision": _precision(hits, k),
            "ndcg": ndcg_from_hits(hits, n_truth, k),
            "hit": hit_from_hits(hits, k),
            "mrr": _mrr(hits, k),
        }
        for name in METRIC_NAMES:
            values = per_user[name]
            # nan rather than 0 so an empty evaluation set is never mistaken for a bad model.
            result[f"{name}@{k}"] = float(values.mean()) if n_eval else float("nan")
    result["n_users"] = float(n_eval)
    return result
