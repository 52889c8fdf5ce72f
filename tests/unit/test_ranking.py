"""Full ranking: exclusions, deterministic tie-breaking and blockwise equivalence."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from components.evaluation.ranking import rank_all, sample_users, topk_items


def _reference_topk(scores: np.ndarray, k: int, exclude: sp.csr_matrix | None = None) -> np.ndarray:
    """Rank by full sort on (-score, item index); the obvious but slow definition."""
    work = scores.astype(np.float64)
    if exclude is not None:
        work[exclude.toarray() != 0] = -np.inf
    out = np.empty((work.shape[0], k), dtype=np.int64)
    items = np.arange(work.shape[1])
    for r, row in enumerate(work):
        order = np.lexsort((items, -row))[:k]
        out[r] = np.where(np.isneginf(row[order]), -1, order)
    return out


def _random_exclude(rng: np.random.Generator, shape: tuple[int, int], density: float) -> sp.csr_matrix:
    """Mark each (row, item) pair as excluded with probability ``density``."""
    mask = rng.random(shape) < density
    return sp.csr_matrix(mask.astype(np.float32))


def test_ties_broken_by_lower_item_index() -> None:
    scores = np.array([[1.0, 3.0, 3.0, 2.0, 3.0]])
    # Three items tie at 3.0; the k=2 cut must take the two lowest indices among them.
    assert topk_items(scores, 2, None).tolist() == [[1, 2]]
    assert topk_items(scores, 3, None).tolist() == [[1, 2, 4]]
    assert topk_items(scores, 5, None).tolist() == [[1, 2, 4, 3, 0]]
    assert topk_items(np.zeros((2, 6)), 4, None).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


@pytest.mark.parametrize("k", [1, 5, 17, 40])
def test_matches_full_sort_reference_with_many_ties(k: int) -> None:
    rng = np.random.default_rng(0)
    # Few distinct values -> plenty of ties straddling the k-th position.
    scores = rng.integers(0, 4, size=(50, 40)).astype(np.float32)
    exclude = _random_exclude(rng, scores.shape, 0.2)
    np.testing.assert_array_equal(topk_items(scores, k, None), _reference_topk(scores, k))
    np.testing.assert_array_equal(topk_items(scores, k, exclude), _reference_topk(scores, k, exclude))


def test_excluded_items_never_returned() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(30, 25))
    exclude = _random_exclude(rng, scores.shape, 0.5)
    top = topk_items(scores, 10, exclude)
    dense_ex = exclude.toarray() != 0
    for row, items in enumerate(top):
        kept = items[items >= 0]
        assert not dense_ex[row, kept].any()
        # Padding appears only when the row ran out of allowed items.
        assert (items < 0).sum() == max(0, 10 - int((~dense_ex[row]).sum()))


def test_pads_with_minus_one_when_too_few_items_remain() -> None:
    scores = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]])
    exclude = sp.csr_matrix(np.array([[1, 0, 1, 1, 0]], dtype=np.float32))
    assert topk_items(scores, 4, exclude).tolist() == [[1, 4, -1, -1]]


def test_scores_are_not_modified() -> None:
    scores = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    before = scores.copy()
    topk_items(scores, 2, sp.csr_matrix(np.array([[0, 0, 1]], dtype=np.float32)))
    np.testing.assert_array_equal(scores, before)


def test_invalid_arguments_raise() -> None:
    scores = np.zeros((2, 3))
    with pytest.raises(ValueError, match="k must satisfy"):
        topk_items(scores, 0, None)
    with pytest.raises(ValueError, match="k must satisfy"):
        topk_items(scores, 4, None)
    with pytest.raises(ValueError, match="NaN"):
        topk_items(np.array([[0.0, np.nan]]), 1, None)
    with pytest.raises(ValueError, match="exclude has shape"):
        topk_items(scores, 1, sp.csr_matrix((3, 3)))
    with pytest.raises(ValueError, match="2-D"):
        topk_items(np.zeros(3), 1, None)


@pytest.mark.parametrize("block_size", [1, 3, 7, 1024])
def test_blockwise_equals_one_shot(block_size: int) -> None:
    rng = np.random.default_rng(2)
    n_users, n_items = 23, 31
    all_scores = rng.integers(0, 5, size=(n_users, n_items)).astype(np.float32)
    exclude = _random_exclude(rng, all_scores.shape, 0.3)
    users = rng.permutation(n_users)[:17]
    calls: list[int] = []

    def score_fn(block: np.ndarray) -> np.ndarray:
        calls.append(block.size)
        return all_scores[block]

    blockwise = rank_all(score_fn, users, 6, exclude, block_size=block_size)
    one_shot = topk_items(all_scores[users], 6, exclude[users])
    np.testing.assert_array_equal(blockwise, one_shot)
    assert max(calls) <= block_size
    assert sum(calls) == users.size


def test_rank_all_without_exclusions_and_empty_users() -> None:
    scores = np.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.7]])
    top = rank_all(lambda b: scores[b], np.array([1, 0]), 2, None, block_size=1)
    assert top.tolist() == [[0, 2], [1, 2]]
    assert rank_all(lambda b: scores[b], np.array([], dtype=np.int64), 2, None).shape == (0, 2)


def test_rank_all_validates() -> None:
    scores = np.zeros((4, 3))
    with pytest.raises(ValueError, match="score_fn returned shape"):
        rank_all(lambda b: scores[: b.size + 1], np.arange(2), 1, None)
    with pytest.raises(ValueError, match="block_size"):
        rank_all(lambda b: scores[b], np.arange(2), 1, None, block_size=0)
    with pytest.raises(ValueError, match="exclude_csr"):
        rank_all(lambda b: scores[b], np.array([5]), 1, sp.csr_matrix((4, 3)))


def test_sample_users_caps_with_a_fixed_seeded_sorted_subset() -> None:
    users = np.arange(3, 403, 2)
    assert sample_users(users, 0, 1) is users and sample_users(users, 200, 1) is users
    picked = sample_users(users, 50, 1)
    assert len(picked) == 50 and len(np.unique(picked)) == 50 and np.isin(picked, users).all()
    assert (np.diff(picked) > 0).all() and np.array_equal(picked, sample_users(users, 50, 1))
    assert not np.array_equal(picked, sample_users(users, 50, 2))


class _Scores:
    def __init__(self, scores: np.ndarray) -> None:
        self.scores = scores

    def score(self, users: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        return self.scores[users]


def test_evaluate_with_a_user_cap_scores_the_sample_as_the_full_run_does() -> None:
    """A cap at or above the users with truth changes nothing; below it the figure is that of the
    sampled users' rows of the full run (each user's ranking is their own)."""
    from components.evaluation.metrics import compute_metrics
    from components.evaluation.protocol import EvalData, evaluate

    rng = np.random.default_rng(4)
    parts = [sp.csr_matrix((rng.random((300, 40)) < p).astype(np.float32)) for p in (0.2, 0.03, 0.03)]
    data, model = EvalData(*parts), _Scores(rng.random((300, 40)))
    full = evaluate(model, data, "test", [5, 10], [5, 10])
    n = full["users"]["with_truth"]
    assert full["users"]["ranked"] == n and n > 100
    assert evaluate(model, data, "test", [5, 10], [5, 10], max_users=n, seed=3) == full
    capped = evaluate(model, data, "test", [5, 10], [5, 10], max_users=100, seed=3)
    assert capped["users"] == {"ranked": 100, "with_truth": n}
    users = sample_users(np.flatnonzero(np.diff(parts[2].indptr) > 0), 100, 3)
    topk = rank_all(lambda b: model.scores[b], users, 10, data.exclusions("test"))
    assert capped["overall"] == compute_metrics(topk, parts[2][users], [5, 10])
    assert capped["overall"] != full["overall"]
