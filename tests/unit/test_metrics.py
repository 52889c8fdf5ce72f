"""Ranking metrics checked against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from components.evaluation.metrics import (
    compute_metrics,
    hit_at_k,
    hits_matrix,
    mrr_at_k,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
)

LOG2_3 = math.log2(3)


def _csr(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    """Build a binary truth matrix from per-user item lists."""
    r = [u for u, items in enumerate(rows) for _ in items]
    c = [i for items in rows for i in items]
    return sp.csr_matrix((np.ones(len(c)), (r, c)), shape=(len(rows), n_items))


def test_worked_example_truth_1_3_topk_3_2_1() -> None:
    # truth {1, 3}, ranking [3, 2, 1] -> hits at positions 1 and 3.
    topk = np.array([[3, 2, 1]])
    truth = [np.array([1, 3])]
    assert hits_matrix(topk, truth).tolist() == [[True, False, True]]

    # k=3: both held-out items retrieved -> recall 2/2, precision 2/3, first hit at rank 1.
    assert recall_at_k(topk, truth, 3) == pytest.approx([1.0])
    assert precision_at_k(topk, truth, 3) == pytest.approx([2 / 3])
    assert hit_at_k(topk, truth, 3) == pytest.approx([1.0])
    assert mrr_at_k(topk, truth, 3) == pytest.approx([1.0])
    # DCG = 1/log2(2) + 1/log2(4) = 1.5; IDCG = 1/log2(2) + 1/log2(3) (|truth| = 2 < k).
    assert ndcg_at_k(topk, truth, 3) == pytest.approx([1.5 / (1 + 1 / LOG2_3)])

    # k=2: only item 3 counts -> recall 1/2, precision 1/2; DCG = 1, IDCG = 1 + 1/log2(3).
    assert recall_at_k(topk, truth, 2) == pytest.approx([0.5])
    assert precision_at_k(topk, truth, 2) == pytest.approx([0.5])
    assert ndcg_at_k(topk, truth, 2) == pytest.approx([1 / (1 + 1 / LOG2_3)])

    # k=1: a perfect top-1 -> precision 1, NDCG 1 (IDCG uses min(|truth|, k) = 1 position).
    assert recall_at_k(topk, truth, 1) == pytest.approx([0.5])
    assert precision_at_k(topk, truth, 1) == pytest.approx([1.0])
    assert ndcg_at_k(topk, truth, 1) == pytest.approx([1.0])


def test_first_hit_at_rank_three() -> None:
    # truth {5}, ranking [0, 1, 5]: the only hit is at rank 3.
    topk = np.array([[0, 1, 5]])
    truth = [np.array([5])]
    assert mrr_at_k(topk, truth, 3) == pytest.approx([1 / 3])
    assert mrr_at_k(topk, truth, 2) == pytest.approx([0.0])  # hit lies beyond the cut-off
    assert hit_at_k(topk, truth, 2) == pytest.approx([0.0])
    # DCG = 1/log2(3+1) = 0.5; IDCG = 1/log2(2) = 1.
    assert ndcg_at_k(topk, truth, 3) == pytest.approx([0.5])
    assert recall_at_k(topk, truth, 3) == pytest.approx([1.0])
    assert precision_at_k(topk, truth, 3) == pytest.approx([1 / 3])


def test_no_hits_gives_zero_everywhere() -> None:
    topk = np.array([[0, 1, 2]])
    truth = [np.array([9])]
    for fn in (recall_at_k, precision_at_k, ndcg_at_k, hit_at_k, mrr_at_k):
        assert fn(topk, truth, 3) == pytest.approx([0.0])


def test_all_hits_gives_one_everywhere() -> None:
    # Every ranked item is held out and |truth| == k -> every metric is 1.
    topk = np.array([[2, 0, 1]])
    truth = [np.array([0, 1, 2])]
    for fn in (recall_at_k, precision_at_k, ndcg_at_k, hit_at_k, mrr_at_k):
        assert fn(topk, truth, 3) == pytest.approx([1.0])


def test_more_truth_than_k() -> None:
    # truth {0..4} (|truth| = 5), ranking [0, 1, 9]: hits at positions 1 and 2.
    topk = np.array([[0, 1, 9]])
    truth = [np.arange(5)]
    # k=2: recall 2/5; both slots hit and IDCG covers min(5, 2) = 2 slots -> NDCG 1.
    assert recall_at_k(topk, truth, 2) == pytest.approx([0.4])
    assert precision_at_k(topk, truth, 2) == pytest.approx([1.0])
    assert ndcg_at_k(topk, truth, 2) == pytest.approx([1.0])
    # k=3: DCG = 1 + 1/log2(3); IDCG = 1 + 1/log2(3) + 1/log2(4).
    expected = (1 + 1 / LOG2_3) / (1 + 1 / LOG2_3 + 0.5)
    assert ndcg_at_k(topk, truth, 3) == pytest.approx([expected])
    assert recall_at_k(topk, truth, 3) == pytest.approx([0.4])


def test_csr_and_list_truth_agree() -> None:
    topk = np.array([[3, 2, 1], [0, 1, 5], [4, 0, 2]])
    as_list = [np.array([1, 3]), np.array([5]), np.array([], dtype=np.int64)]
    as_csr = _csr([[1, 3], [5], []], n_items=6)
    for fn in (recall_at_k, precision_at_k, ndcg_at_k, hit_at_k, mrr_at_k):
        np.testing.assert_array_equal(fn(topk, as_list, 3), fn(topk, as_csr, 3))
    assert compute_metrics(topk, as_list, ks=(1, 3)) == compute_metrics(topk, as_csr, ks=(1, 3))


def test_duplicate_truth_entries_count_once() -> None:
    topk = np.array([[1, 0]])
    assert recall_at_k(topk, [np.array([1, 1, 2])], 2) == pytest.approx([0.5])


def test_padding_never_hits() -> None:
    # -1 marks "no recommendable item left" and must not match anything.
    topk = np.array([[4, -1, -1]])
    truth = [np.array([4, 7])]
    assert hits_matrix(topk, truth).tolist() == [[True, False, False]]
    assert recall_at_k(topk, truth, 3) == pytest.approx([0.5])


def test_compute_metrics_skips_users_without_truth() -> None:
    topk = np.array([[3, 2, 1], [0, 1, 5], [4, 0, 2]])
    truth = _csr([[1, 3], [5], []], n_items=6)
    result = compute_metrics(topk, truth, ks=(1, 3))
    # Two evaluable users; the third is dropped, not averaged in as zero.
    assert result["n_users"] == 2
    # recall@3: user0 = 1, user1 = 1 -> 1 (would be 2/3 if the empty user counted).
    assert result["recall@3"] == pytest.approx(1.0)
    # ndcg@3: user0 = 1.5 / (1 + 1/log2 3), user1 = 0.5.
    assert result["ndcg@3"] == pytest.approx((1.5 / (1 + 1 / LOG2_3) + 0.5) / 2)
    # mrr@3: user0 = 1, user1 = 1/3.
    assert result["mrr@3"] == pytest.approx((1 + 1 / 3) / 2)
    # precision@3: user0 = 2/3, user1 = 1/3.
    assert result["precision@3"] == pytest.approx(0.5)
    assert result["hit@3"] == pytest.approx(1.0)
    # @1: user0's top item 3 is held out, user1's top item 0 is not.
    assert result["hit@1"] == pytest.approx(0.5)
    assert result["recall@1"] == pytest.approx((0.5 + 0.0) / 2)
    expected_keys = {f"{m}@{k}" for m in ("recall", "precision", "ndcg", "hit", "mrr") for k in (1, 3)}
    assert set(result) == expected_keys | {"n_users"}
    assert all(isinstance(v, float) for v in result.values())


def test_compute_metrics_with_no_evaluable_user_is_nan() -> None:
    result = compute_metrics(np.array([[0, 1]]), [np.array([], dtype=np.int64)], ks=(2,))
    assert result["n_users"] == 0
    assert math.isnan(result["recall@2"])


@pytest.mark.parametrize("k", [0, -1, 4])
def test_k_out_of_bounds_raises(k: int) -> None:
    topk = np.array([[3, 2, 1]])
    with pytest.raises(ValueError, match="k must satisfy"):
        recall_at_k(topk, [np.array([1])], k)
    with pytest.raises(ValueError, match="k must satisfy"):
        compute_metrics(topk, [np.array([1])], ks=(1, k))


def test_shape_mismatch_raises() -> None:
    topk = np.array([[3, 2, 1], [0, 1, 2]])
    with pytest.raises(ValueError, match="must match row for row"):
        recall_at_k(topk, [np.array([1])], 2)
    with pytest.raises(ValueError, match="must match row for row"):
        ndcg_at_k(topk, _csr([[1]], n_items=4), 2)
    with pytest.raises(ValueError, match="2-D"):
        hits_matrix(np.array([3, 2, 1]), [np.array([1])])


def test_invalid_topk_raises() -> None:
    with pytest.raises(ValueError, match="repeat"):
        recall_at_k(np.array([[1, 1, 2]]), [np.array([1])], 3)
    with pytest.raises(ValueError, match="integer"):
        recall_at_k(np.array([[1.0, 2.0]]), [np.array([1])], 2)
