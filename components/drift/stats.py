"""Drift statistics as pure numpy/scipy functions: PSI, Jensen–Shannon, chi-square, MMD, online quality.

Categorical statistics take two *aligned* count vectors (entry ``k`` of both counts the same
category) and are symmetric in what they mean by "category": popularity buckets, activity buckets
or genres. Nothing here knows about events, users or items; :mod:`components.drift.checks` turns
feedback into these vectors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from components.evaluation import metrics

# A zero share makes PSI infinite. Flooring shares at 1e-4 keeps one empty bucket's worth of PSI
# bounded (a category that jumps from 0% to 1% adds 0.01 * ln(100) = 0.046, half the "moderate"
# band) while staying well below any share a real bucket ever has.
DEFAULT_EPS = 1e-4


def _counts(values: Iterable[float] | np.ndarray, name: str) -> np.ndarray:
    """Return ``values`` as a 1-D float64 array of non-negative finite counts."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and (not np.all(np.isfinite(arr)) or arr.min() < 0):
        raise ValueError(f"{name} must hold finite non-negative counts")
    return arr


def _aligned(ref_counts: Any, cur_counts: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate two count vectors over the same categories, each with a positive total."""
    ref = _counts(ref_counts, "ref_counts")
    cur = _counts(cur_counts, "cur_counts")
    if ref.shape != cur.shape:
        raise ValueError(f"count vectors must be aligned, got lengths {ref.size} and {cur.size}")
    if ref.size == 0:
        raise ValueError("count vectors must have at least one category")
    if ref.sum() <= 0 or cur.sum() <= 0:
        raise ValueError("both count vectors need a positive total")
    return ref, cur


def proportions(counts: Any, eps: float = 0.0) -> np.ndarray:
    """Normalise counts to shares, flooring each share at ``eps`` and renormalising.

    Args:
        counts: Non-negative counts, one per category.
        eps: Smallest share a category may have; 0 keeps the raw shares.

    Returns:
        Shares summing to 1.
    """
    arr = _counts(counts, "counts")
    total = arr.sum()
    if total <= 0:
        raise ValueError("counts need a positive total")
    shares = arr / total
    if eps > 0:
        shares = np.maximum(shares, eps)
        shares = shares / shares.sum()
    return shares


def psi(ref_counts: Any, cur_counts: Any, eps: float = DEFAULT_EPS) -> float:
    """Population Stability Index of the current distribution against the reference.

    ``PSI = sum_k (q_k - p_k) * ln(q_k / p_k)`` with ``p`` the reference shares and ``q`` the current
    ones, i.e. the symmetrised KL divergence (in nats). Both share vectors are floored at ``eps`` and
    renormalised first, so a category empty on one side gives a large but finite contribution.

    Args:
        ref_counts: Reference counts per category.
        cur_counts: Current counts over the same categories.
        eps: Share floor (see :data:`DEFAULT_EPS`).

    Returns:
        PSI >= 0; 0 for identical shares. Rule of thumb: < 0.1 stable, 0.1–0.2 moderate, > 0.2 shifted.
    """
    ref, cur = _aligned(ref_counts, cur_counts)
    if eps <= 0:
        raise ValueError("eps must be positive: a zero share makes PSI infinite")
    p = proportions(ref, eps)
    q = proportions(cur, eps)
    return float(np.sum((q - p) * np.log(q / p)))


def js_divergence(p: Any, q: Any) -> float:
    """Jensen–Shannon divergence in bits between two distributions (counts or shares).

    ``JS = (KL(p||m) + KL(q||m)) / 2`` with ``m = (p + q) / 2``, base 2, so it lies in [0, 1]: 0 for
    identical distributions, 1 for disjoint supports. No smoothing is needed: ``m`` is positive
    wherever ``p`` or ``q`` is.

    Args:
        p: Reference counts or shares.
        q: Current counts or shares over the same categories.

    Returns:
        The divergence in [0, 1].
    """
    a, b = _aligned(p, q)
    a = a / a.sum()
    b = b / b.sum()
    m = (a + b) / 2

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    # Rounding can leave a tiny negative or a value a hair above 1.
    return float(min(max((kl(a) + kl(b)) / 2, 0.0), 1.0))


def merge_sparse_categories(
    ref_counts: Any, cur_counts: Any, min_expected: float = 5.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool categories whose expected count in the 2×K table is below ``min_expected`` into one.

    The chi-square approximation needs expected counts of about 5 or more; rare categories (a genre
    with two films) would otherwise dominate the statistic with noise.

    Args:
        ref_counts: Reference counts per category.
        cur_counts: Current counts per category.
        min_expected: Smallest expected cell count a category may keep on its own.

    Returns:
        ``(ref, cur, kept)``: the merged counts (the pooled category, if any, last) and the indices
        of the original categories kept on their own.
    """
    ref, cur = _aligned(ref_counts, cur_counts)
    col = ref + cur
    grand = col.sum()
    # The smaller row total decides: its expected cell is the smaller one in each column.
    expected = col * min(ref.sum(), cur.sum()) / grand
    keep = expected >= min_expected
    kept = np.flatnonzero(keep)
    if keep.all():
        return ref, cur, kept
    pooled_ref = ref[~keep].sum()
    pooled_cur = cur[~keep].sum()
    return np.append(ref[keep], pooled_ref), np.append(cur[keep], pooled_cur), kept


def chi_square(ref_counts: Any, cur_counts: Any, min_expected: float = 5.0) -> tuple[float, float]:
    """Chi-square test of homogeneity on the 2×K table of reference and current counts.

    Categories with expected counts below ``min_expected`` are pooled first
    (:func:`merge_sparse_categories`), and categories empty on both sides are dropped. Counts may be
    fractional (an event split across an item's genres).

    Args:
        ref_counts: Reference counts per category.
        cur_counts: Current counts per category.
        min_expected: See :func:`merge_sparse_categories`.

    Returns:
        ``(statistic, p_value)``; ``(0.0, 1.0)`` when fewer than two categories remain.
    """
    ref, cur, _ = merge_sparse_categories(ref_counts, cur_counts, min_expected)
    nonempty = (ref + cur) > 0
    ref, cur = ref[nonempty], cur[nonempty]
    if ref.size < 2:
        return 0.0, 1.0
    # Yates' correction is for 2×2 tables of integer counts; keep the plain statistic.
    res = sps.chi2_contingency(np.vstack([ref, cur]), correction=False)
    return float(res.statistic), float(res.pvalue)


def cramers_v(ref_counts: Any, cur_counts: Any, balanced: bool = True) -> float:
    """Cramér's V of the 2×K table, an effect size in [0, 1] for how different two mixes are.

    With ``balanced=True`` the reference row is rescaled to the current row's total first. A plain V
    shrinks as the reference grows (for a 2×K table, ``V**2 = chi2 / N`` and chi2 grows only with the
    smaller row), so the same shift would look smaller against a bigger training set; the balanced V
    depends on the two mixes alone and on nothing else.

    Args:
        ref_counts: Reference counts per category.
        cur_counts: Current counts per category.
        balanced: Rescale the reference row to the current row's total.

    Returns:
        V in [0, 1]; 0 for identical mixes.
    """
    ref, cur = _aligned(ref_counts, cur_counts)
    if balanced:
        ref = ref * (cur.sum() / ref.sum())
    nonempty = (ref + cur) > 0
    ref, cur = ref[nonempty], cur[nonempty]
    if ref.size < 2:
        return 0.0
    res = sps.chi2_contingency(np.vstack([ref, cur]), correction=False)
    n = ref.sum() + cur.sum()
    return float(np.sqrt(res.statistic / n))


def unseen_share(ids: Any, known: Any) -> float:
    """Share of ``ids`` (one per event, repeats count) that are not in ``known``.

    Args:
        ids: One id per event.
        known: The ids the reference knows.

    Returns:
        A share in [0, 1]; 0.0 for no events.
    """
    arr = np.asarray(ids)
    if arr.size == 0:
        return 0.0
    return float(1.0 - np.isin(arr, np.asarray(known)).mean())


@dataclass(frozen=True)
class MMDResult:
    """Unbiased MMD² between two samples and its permutation p-value."""

    mmd2: float
    p_value: float
    gamma: float
    n_x: int
    n_y: int


def median_gamma(z: np.ndarray) -> float:
    """RBF width by the median heuristic: ``1 / median`` of the pooled pairwise squared distances."""
    sq = _sq_dists(z, z)
    upper = sq[np.triu_indices(len(z), k=1)]
    med = float(np.median(upper)) if upper.size else 0.0
    # All points identical: any width gives MMD 0; pick 1 so the kernel is defined.
    return 1.0 / med if med > 0 else 1.0


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(sq, 0.0)


def _mmd2_from_kernel(kern: np.ndarray, member: np.ndarray) -> np.ndarray:
    """Unbiased MMD² for each column of ``member`` (a boolean N×P matrix: True = sample X)."""
    a = member.astype(np.float64)
    b = 1.0 - a
    n = a.sum(0)
    m = b.sum(0)
    ka = kern @ a
    kb = kern @ b
    diag = np.diag(kern)[:, None]
    # Unbiased: drop the i == i' terms from the within-sample sums.
    xx = ((a * ka).sum(0) - (a * diag).sum(0)) / (n * (n - 1))
    yy = ((b * kb).sum(0) - (b * diag).sum(0)) / (m * (m - 1))
    xy = (a * kb).sum(0) / (n * m)
    result: np.ndarray = xx + yy - 2.0 * xy
    return result


def mmd_rbf(
    x: Any,
    y: Any,
    gamma: float | None = None,
    n_perm: int = 200,
    seed: int = 0,
    max_samples: int | None = 500,
) -> MMDResult:
    """Maximum mean discrepancy with an RBF kernel and a permutation test.

    The statistic is the unbiased MMD² (it can be slightly negative when the samples agree). The
    p-value is ``(1 + #{permuted MMD² >= observed}) / (1 + n_perm)`` over random relabellings of the
    pooled sample.

    Args:
        x: Reference sample, shape (n, d).
        y: Current sample, shape (m, d).
        gamma: Kernel ``exp(-gamma * ||a - b||²)``; None picks it by the median heuristic on the
            pooled (subsampled) data.
        n_perm: Number of permutations.
        seed: Seed of the subsampling and the permutations.
        max_samples: Each side is subsampled to at most this many rows (the kernel matrix is
            quadratic); None keeps everything.

    Returns:
        The statistic, its p-value, the kernel width used and the sample sizes after subsampling.
    """
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    if xa.ndim != 2 or ya.ndim != 2 or xa.shape[1] != ya.shape[1]:
        raise ValueError(f"x and y must be 2-D with the same width, got {xa.shape} and {ya.shape}")
    if len(xa) < 2 or len(ya) < 2:
        raise ValueError("MMD needs at least two rows on each side")
    if n_perm < 1:
        raise ValueError("n_perm must be >= 1")
    rng = np.random.default_rng(seed)
    if max_samples is not None:
        if len(xa) > max_samples:
            xa = xa[rng.choice(len(xa), max_samples, replace=False)]
        if len(ya) > max_samples:
            ya = ya[rng.choice(len(ya), max_samples, replace=False)]
    z = np.vstack([xa, ya])
    g = median_gamma(z) if gamma is None else float(gamma)
    if g <= 0:
        raise ValueError("gamma must be positive")
    kern = np.exp(-g * _sq_dists(z, z))
    n_total = len(z)
    observed_member = np.zeros((n_total, 1), dtype=bool)
    observed_member[: len(xa), 0] = True
    observed = float(_mmd2_from_kernel(kern, observed_member)[0])
    # Permuting labels = a random set of len(xa) rows plays X; argsort of uniforms gives the sets.
    ranks = np.argsort(rng.random((n_perm, n_total)), axis=1)
    member = np.zeros((n_total, n_perm), dtype=bool)
    member[ranks[:, : len(xa)].T, np.arange(n_perm)[None, :]] = True
    permuted = _mmd2_from_kernel(kern, member)
    p_value = float((1 + np.sum(permuted >= observed)) / (1 + n_perm))
    return MMDResult(mmd2=observed, p_value=p_value, gamma=g, n_x=len(xa), n_y=len(ya))


def _list_scores(
    served_lists: Sequence[Sequence[Any]], positives: Sequence[Iterable[Any]], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-list hit@k and NDCG@k, plus the mask of lists whose user had any positive.

    Scored by the offline metrics' own functions (:mod:`components.evaluation.metrics`), so online and
    offline NDCG share one definition: binary gains, the ideal cut at ``min(positives, k)``.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    if len(served_lists) != len(positives):
        raise ValueError(
            f"served_lists has {len(served_lists)} lists but positives has {len(positives)}; they must "
            "match list for list"
        )
    pos_sets = [set(pos) for pos in positives]
    # Lists shorter than k are padded with misses.
    hits = np.zeros((len(served_lists), k), dtype=bool)
    for i, (served, pos_set) in enumerate(zip(served_lists, pos_sets, strict=True)):
        top = list(served)[:k]
        hits[i, : len(top)] = [item in pos_set for item in top]
    n_truth = np.asarray([len(p) for p in pos_sets], dtype=np.int64)
    return metrics.hit_from_hits(hits, k), metrics.ndcg_from_hits(hits, n_truth, k), n_truth > 0


def per_list_quality(
    served_lists: Sequence[Sequence[Any]], positives: Sequence[Iterable[Any]], k: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Per-list hit@k and NDCG@k for the lists whose user had a positive (for tests on the mean)."""
    hits, ndcg, has_pos = _list_scores(served_lists, positives, k)
    return hits[has_pos], ndcg[has_pos]


def bucket_map(ref_counts: Mapping[Any, float] | pd.Series, n_buckets: int = 10) -> pd.Series:
    """Assign each reference id to a popularity bucket holding about ``1/n_buckets`` of the events.

    Ids are sorted by reference count (ascending, ties by id) and cut at equal shares of the
    *cumulative events*, so every bucket carries about 10% of the reference traffic with deciles:
    bucket 0 is the long tail, the last bucket the head. An id heavier than one bucket's share takes
    a bucket alone, and the buckets it skips stay empty; :func:`bucket_counts` drops them.

    Args:
        ref_counts: Events per id in the reference.
        n_buckets: Number of buckets.

    Returns:
        id -> bucket index in ``[0, n_buckets)``.
    """
    if n_buckets < 1:
        raise ValueError("n_buckets must be >= 1")
    counts = pd.Series(ref_counts, dtype=np.float64)
    counts = counts[counts > 0]
    if counts.empty:
        raise ValueError("reference counts are empty")
    order = np.lexsort((counts.index.to_numpy(), counts.to_numpy()))
    counts = counts.iloc[order]
    cum = counts.cumsum().to_numpy()
    mid = (cum - counts.to_numpy() / 2) / cum[-1]
    buckets = np.minimum((mid * n_buckets).astype(np.int64), n_buckets - 1)
    return pd.Series(buckets, index=counts.index)


def bucket_counts(
    ref_counts: Mapping[Any, float] | pd.Series, cur_ids: Any, buckets: pd.Series, n_buckets: int
) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """Aligned event counts per popularity bucket for the reference and a window.

    Args:
        ref_counts: Events per id in the reference.
        cur_ids: One id per current event.
        buckets: id -> bucket, from :func:`bucket_map` on ``ref_counts``.
        n_buckets: The number of buckets :func:`bucket_map` used.

    Returns:
        ``(ref, cur, labels, unseen)``: counts over the buckets that hold reference events (empty
        ones dropped), their labels (``b0`` = tail ... ``b9`` = head with deciles), and the number
        of current events on ids absent from ``buckets``, which belong to no bucket.
    """
    ref_series = pd.Series(ref_counts, dtype=np.float64)
    ref_series = ref_series[ref_series > 0]
    ref_buckets = ref_series.index.map(buckets)
    if ref_buckets.isna().any():
        raise ValueError("every reference id must have a bucket; build buckets from the same counts")
    ref = np.bincount(
        ref_buckets.to_numpy(dtype=np.int64), weights=ref_series.to_numpy(), minlength=n_buckets
    )
    mapped = pd.Series(np.asarray(cur_ids)).map(buckets)
    known = mapped.notna()
    cur = np.bincount(mapped[known].to_numpy(dtype=np.int64), minlength=n_buckets).astype(np.float64)
    keep = ref[:n_buckets] > 0
    labels = [f"b{b}" for b in range(n_buckets) if keep[b]]
    return ref[:n_buckets][keep], cur[:n_buckets][keep], labels, float((~known).sum())
