"""Cold-item protocol: hand-checked removal and metrics, seeded selection, chance level."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from components.evaluation.coldstart import (
    ColdSplit,
    cold_item_split,
    evaluate_cold,
    random_recall,
    remove_items,
)

# 4 users x 5 items.
TRAIN = np.array(
    [
        [1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [1, 0, 0, 1, 0],
        [0, 0, 1, 0, 1],
    ],
    dtype=np.float32,
)
VALID = np.array(
    [
        [0, 0, 1, 0, 0],
        [0, 0, 0, 0, 1],
        [0, 1, 0, 0, 0],
        [1, 0, 0, 0, 0],
    ],
    dtype=np.float32,
)
TEST = np.array(
    [
        [0, 0, 0, 1, 1],
        [1, 0, 0, 1, 0],
        [0, 0, 1, 0, 1],
        [0, 1, 0, 0, 0],
    ],
    dtype=np.float32,
)
COLD = np.array([1, 4])


def _parts() -> tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix]:
    return sp.csr_matrix(TRAIN), sp.csr_matrix(VALID), sp.csr_matrix(TEST)


def _hand_split() -> ColdSplit:
    return remove_items(*_parts(), COLD)


def _random_parts(
    n_users: int, n_items: int, seed: int
) -> tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix]:
    """Disjoint random train/valid/test parts (each cell lands in at most one part)."""
    rng = np.random.default_rng(seed)
    part = rng.choice(4, size=(n_users, n_items), p=[0.55, 0.2, 0.1, 0.15])
    return tuple(sp.csr_matrix((part == p).astype(np.float32)) for p in (1, 2, 3))


# --- the split ----------------------------------------------------------------------------------


def test_remove_items_drops_train_and_valid_of_cold_items_only() -> None:
    split = _hand_split()
    # Columns 1 and 4 are zeroed in train and valid; every other entry survives.
    expected_train = [[1, 0, 0, 0, 0], [0, 0, 1, 0, 0], [1, 0, 0, 1, 0], [0, 0, 1, 0, 0]]
    expected_valid = [[0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]]
    np.testing.assert_array_equal(split.train.toarray(), expected_train)
    np.testing.assert_array_equal(split.valid.toarray(), expected_valid)
    np.testing.assert_array_equal(split.test.toarray(), TEST)
    np.testing.assert_array_equal(split.cold_items, [1, 4])
    # Removed entries are gone, not stored zeros.
    assert split.train.nnz == 5 and split.valid.nnz == 2
    assert all(sp.isspmatrix_csr(m) for m in (split.train, split.valid, split.test))


def test_remove_items_leaves_inputs_untouched() -> None:
    train, valid, test = _parts()
    split = remove_items(train, valid, test, np.array([4, 1, 4]))
    np.testing.assert_array_equal(train.toarray(), TRAIN)
    np.testing.assert_array_equal(valid.toarray(), VALID)
    assert split.test is not test
    np.testing.assert_array_equal(split.cold_items, [1, 4])  # sorted, duplicates dropped


def test_cold_item_split_is_seeded_and_uniform_over_all_items() -> None:
    train, valid, test = _parts()
    split = cold_item_split(train, valid, test, fraction=0.4, seed=3)
    # The contract: round(fraction * n_items) items drawn from the whole catalogue by default_rng(seed).
    expected = np.sort(np.random.default_rng(3).choice(5, size=2, replace=False))
    np.testing.assert_array_equal(split.cold_items, expected)
    same = remove_items(train, valid, test, expected)
    for got, want in ((split.train, same.train), (split.valid, same.valid), (split.test, same.test)):
        np.testing.assert_array_equal(got.toarray(), want.toarray())


def test_cold_item_split_determinism_and_size() -> None:
    train, valid, test = _random_parts(40, 200, seed=0)
    a = cold_item_split(train, valid, test, fraction=0.1, seed=7)
    b = cold_item_split(train, valid, test, fraction=0.1, seed=7)
    c = cold_item_split(train, valid, test, fraction=0.1, seed=8)
    np.testing.assert_array_equal(a.cold_items, b.cold_items)
    assert not np.array_equal(a.cold_items, c.cold_items)
    assert a.cold_items.size == 20
    assert np.all(np.diff(a.cold_items) > 0)
    assert a.train[:, a.cold_items].nnz == 0 and a.valid[:, a.cold_items].nnz == 0
    np.testing.assert_array_equal(a.test.toarray(), test.toarray())


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan"), 0.01])
def test_cold_item_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        cold_item_split(*_parts(), fraction=fraction, seed=0)


def test_split_rejects_bad_inputs() -> None:
    train, valid, test = _parts()
    with pytest.raises(ValueError, match="sparse"):
        cold_item_split(TRAIN, valid, test)
    with pytest.raises(ValueError, match="shape"):
        cold_item_split(train, valid[:, :4], test)
    with pytest.raises(ValueError, match="cold_items"):
        remove_items(train, valid, test, np.array([5]))
    with pytest.raises(ValueError, match="cold_items"):
        remove_items(train, valid, test, np.array([0.5]))


# --- evaluation ---------------------------------------------------------------------------------


def test_evaluate_cold_matches_hand_computation() -> None:
    split = _hand_split()
    # Cold truth: u0 {4}, u1 none (skipped), u2 {4}, u3 {1}. Warm items get high scores that must
    # not matter, since only cold items are ranked.
    scores = np.array(
        [
            [9.0, 0.1, 9.0, 9.0, 0.2],  # ranks [4, 1]: hit at 1
            [9.0, 0.0, 9.0, 9.0, 0.0],
            [9.0, 0.6, 9.0, 9.0, 0.5],  # ranks [1, 4]: hit at 2
            [9.0, 0.3, 9.0, 9.0, 0.7],  # ranks [4, 1]: hit at 2
        ]
    )
    seen: list[list[int]] = []

    def scores_fn(block: np.ndarray) -> np.ndarray:
        seen.append(block.tolist())
        return scores[block]

    result = evaluate_cold(scores_fn, split, ks=[1, 2, 5])
    assert seen == [[0, 2, 3]]
    assert result["n_users"] == 3 and result["n_cold_items"] == 2
    m = result["overall"]
    assert m["n_users"] == 3.0
    disc2 = 1 / math.log2(3)
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@2"] == pytest.approx(1.0)
    assert m["precision@2"] == pytest.approx(0.5)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["ndcg@2"] == pytest.approx((1 + 2 * disc2) / 3)
    assert m["mrr@2"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    # k=5 exceeds the 2 cold items: the ranking is padded, so recall stays 1 and precision is 1/5.
    assert m["recall@5"] == pytest.approx(1.0)
    assert m["precision@5"] == pytest.approx(0.2)
    assert result["random_recall@1"] == 0.5
    assert result["random_recall@2"] == 1.0
    assert result["random_recall@5"] == 1.0


def test_perfect_scorer_gets_full_marks() -> None:
    train, valid, test = _random_parts(50, 60, seed=1)
    split = cold_item_split(train, valid, test, fraction=0.25, seed=2)
    dense_test = test.toarray()
    result = evaluate_cold(lambda b: dense_test[b], split, ks=[1, 5, 15], block_size=7)
    m = result["overall"]
    assert result["n_cold_items"] == 15
    for k in (1, 5, 15):
        assert m[f"ndcg@{k}"] == pytest.approx(1.0)
    assert m["recall@15"] == pytest.approx(1.0)
    assert m["hit@1"] == pytest.approx(1.0) and m["mrr@1"] == pytest.approx(1.0)
    # Users without a cold test item are not evaluated.
    expected_users = int((test[:, split.cold_items].getnnz(axis=1) > 0).sum())
    assert result["n_users"] == expected_users


def test_evaluate_cold_user_cap_keeps_the_full_run_when_nothing_is_cut() -> None:
    train, valid, test = _random_parts(80, 60, seed=3)
    split = cold_item_split(train, valid, test, fraction=0.25, seed=2)
    scores = np.random.default_rng(9).random((80, 60))
    full = evaluate_cold(lambda b: scores[b], split, ks=[1, 5], block_size=7, seed=5)
    n = full["n_users"]
    assert full["n_users_with_truth"] == n > 20
    assert evaluate_cold(lambda b: scores[b], split, ks=[1, 5], block_size=7, seed=5, max_users=n) == full
    capped = evaluate_cold(lambda b: scores[b], split, ks=[1, 5], block_size=7, seed=5, max_users=20)
    assert capped["n_users"] == 20 and capped["n_users_with_truth"] == n
    assert capped["overall"]["n_users"] == 20


def test_random_recall_formula_matches_monte_carlo() -> None:
    train, valid, test = _random_parts(30, 20, seed=4)
    split = cold_item_split(train, valid, test, fraction=0.5, seed=0)
    n_cold = split.cold_items.size
    ks = [1, 3, 7, 10, 12]
    rng = np.random.default_rng(0)
    runs = [evaluate_cold(lambda b: rng.random((b.size, 20)), split, ks=ks)["overall"] for _ in range(400)]
    result = evaluate_cold(lambda b: rng.random((b.size, 20)), split, ks=ks)
    for k in ks:
        simulated = float(np.mean([r[f"recall@{k}"] for r in runs]))
        assert result[f"random_recall@{k}"] == pytest.approx(min(k, n_cold) / n_cold)
        assert simulated == pytest.approx(result[f"random_recall@{k}"], abs=0.02)


def test_random_recall_rejects_bad_arguments() -> None:
    assert random_recall(168, 20) == pytest.approx(20 / 168)
    with pytest.raises(ValueError):
        random_recall(0, 10)
    with pytest.raises(ValueError):
        random_recall(10, 0)


def test_evaluate_cold_rejects_bad_inputs() -> None:
    split = _hand_split()
    with pytest.raises(ValueError, match="shape"):
        evaluate_cold(lambda b: np.zeros((b.size, 2)), split, ks=[1])
    with pytest.raises(ValueError, match="ks"):
        evaluate_cold(lambda b: np.zeros((b.size, 5)), split, ks=[])
    # Only u2 tests on item 2; without that interaction the cold item has no test user at all.
    test_without_2 = sp.csr_matrix(TEST * (np.arange(5) != 2))
    no_test = remove_items(sp.csr_matrix(TRAIN), sp.csr_matrix(VALID), test_without_2, np.array([2]))
    with pytest.raises(ValueError, match="no user"):
        evaluate_cold(lambda b: np.zeros((b.size, 5)), no_test, ks=[1])


def test_constant_scorer_ranks_at_chance() -> None:
    """Ties break randomly per user: a scorer that knows nothing gets the analytic random recall."""
    rng = np.random.default_rng(3)
    n_users, n_items = 400, 60
    test = sp.csr_matrix((rng.random((n_users, n_items)) < 0.05).astype(np.float32))
    empty = sp.csr_matrix((n_users, n_items), dtype=np.float32)
    cold = cold_item_split(empty, empty, test, fraction=0.5, seed=1)
    result = evaluate_cold(lambda block: np.zeros((len(block), n_items)), cold, [5], seed=0)
    assert result["overall"]["recall@5"] == pytest.approx(result["random_recall@5"], abs=0.03)
