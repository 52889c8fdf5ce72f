"""Baseline recommenders: hand-checked scores, persistence round trips and BPR learning."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from components.baselines import (
    BPRRecommender,
    EASERecommender,
    ItemKNNRecommender,
    PopRecommender,
    Recommender,
    build_model,
    load_model,
)
from components.evaluation.metrics import compute_metrics
from components.evaluation.ranking import rank_all

R = 1 / math.sqrt(2)  # cosine of two items sharing one user, with 2 and 1 users respectively

# 3 users x 4 items:
#   u0: items 0, 1     item user-counts: i0=2, i1=2, i2=2, i3=1
#   u1: items 0, 2     co-occurrences: (0,1)=1 (0,2)=1 (1,2)=1 (1,3)=1 (2,3)=1 (0,3)=0
#   u2: items 1, 2, 3
TINY = sp.csr_matrix(
    np.array(
        [
            [1, 1, 0, 0],
            [1, 0, 1, 0],
            [0, 1, 1, 1],
        ],
        dtype=np.float32,
    )
)
# cos(i, j) = co(i, j) / sqrt(count_i * count_j): pairs among items 0-2 -> 1/sqrt(4) = 0.5,
# pairs with item 3 -> 1/sqrt(2 * 1) = R, (0, 3) -> 0; diagonal zeroed.
TINY_SIM = np.array(
    [
        [0.0, 0.5, 0.5, 0.0],
        [0.5, 0.0, 0.5, R],
        [0.5, 0.5, 0.0, R],
        [0.0, R, R, 0.0],
    ]
)


def _planted(seed: int = 0) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Return (train, test) for 4 user clusters that each like their own block of 15 items."""
    rng = np.random.default_rng(seed)
    n_clusters, users_per, items_per = 4, 30, 15
    n_users, n_items = n_clusters * users_per, n_clusters * items_per
    dense = np.zeros((n_users, n_items), dtype=np.float32)
    test = np.zeros_like(dense)
    for u in range(n_users):
        c = u // users_per
        block = np.arange(c * items_per, (c + 1) * items_per)
        liked = block[rng.random(items_per) < 0.6]
        held = rng.choice(liked, size=2, replace=False)
        dense[u, liked] = 1.0
        dense[u, held] = 0.0
        test[u, held] = 1.0
        # A little off-cluster noise so the structure is not trivially block-diagonal.
        dense[u, rng.integers(0, n_items, size=1)] = 1.0
    test[dense > 0] = 0.0
    return sp.csr_matrix(dense), sp.csr_matrix(test)


def _recall_at_5(
    scores_fn: Callable[[np.ndarray], np.ndarray], train: sp.csr_matrix, test: sp.csr_matrix
) -> float:
    users = np.arange(train.shape[0])
    top = rank_all(scores_fn, users, 5, train)
    return compute_metrics(top, test, ks=(5,))["recall@5"]


# --- popularity -------------------------------------------------------------------------------


def test_pop_scores_are_item_counts() -> None:
    model = PopRecommender().fit(TINY)
    scores = model.score(np.array([0, 2]))
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores, [[2, 2, 2, 1], [2, 2, 2, 1]])


def test_pop_ranks_by_count() -> None:
    train = sp.csr_matrix(
        np.array([[1, 1, 0, 1], [0, 1, 0, 1], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=np.float32)
    )
    # Counts: i0=1, i1=3, i2=1, i3=3 -> ties broken by lower index.
    model = PopRecommender().fit(train)
    top = rank_all(model.score, np.array([3]), 4, None)
    assert top.tolist() == [[1, 3, 0, 2]]


# --- item kNN ---------------------------------------------------------------------------------


def test_itemknn_similarity_matches_hand_computation() -> None:
    model = ItemKNNRecommender().fit(TINY)
    np.testing.assert_allclose(np.asarray(model.similarity), TINY_SIM, atol=1e-6)


def test_itemknn_scores_match_hand_computation() -> None:
    model = ItemKNNRecommender().fit(TINY)
    scores = model.score(np.array([0, 1, 2]))
    assert scores.dtype == np.float32
    expected = np.array(
        [
            # u0 history {0, 1}: sim(i, 0) + sim(i, 1)
            [0.5, 0.5, 1.0, R],
            # u1 history {0, 2}: sim(i, 0) + sim(i, 2)
            [0.5, 1.0, 0.5, R],
            # u2 history {1, 2, 3}: sim(i, 1) + sim(i, 2) + sim(i, 3)
            [1.0, 0.5 + R, 0.5 + R, 2 * R],
        ]
    )
    np.testing.assert_allclose(scores, expected, atol=1e-6)


def test_itemknn_uses_given_history() -> None:
    model = ItemKNNRecommender().fit(TINY)
    history = TINY.tolil()
    history[0] = [0, 0, 0, 2]  # u0 now has only item 3 (non-binary value is binarised)
    scores = model.score(np.array([0]), history=history.tocsr())
    # sim(i, 3) for every item i.
    np.testing.assert_allclose(scores, [[0.0, R, R, 0.0]], atol=1e-6)


def test_itemknn_neighbour_truncation() -> None:
    model = ItemKNNRecommender(neighbours=1).fit(TINY)
    # Each item keeps its single most similar item, ties to the lower index:
    # i0 -> i1 (0.5, tie with i2), i1 -> i3 (R), i2 -> i3 (R), i3 -> i1 (R, tie with i2).
    expected_sim = np.zeros((4, 4))
    expected_sim[0, 1], expected_sim[1, 3], expected_sim[2, 3], expected_sim[3, 1] = 0.5, R, R, R
    np.testing.assert_allclose(np.asarray(model.similarity), expected_sim, atol=1e-6)
    # u0 history {0, 1}: score(i) = sim(i, 0) + sim(i, 1) = [0.5, 0, 0, R].
    np.testing.assert_allclose(model.score(np.array([0])), [[0.5, 0.0, 0.0, R]], atol=1e-6)


@pytest.mark.parametrize("neighbours", [None, 1, 3])
def test_itemknn_sparse_path_matches_dense(neighbours: int | None) -> None:
    rng = np.random.default_rng(3)
    train = sp.csr_matrix((rng.random((40, 25)) < 0.2).astype(np.float32))
    dense = ItemKNNRecommender(neighbours=neighbours).fit(train)
    sparse = ItemKNNRecommender(neighbours=neighbours, dense_max_items=0).fit(train)
    assert isinstance(dense.similarity, np.ndarray)
    assert sp.issparse(sparse.similarity)
    users = np.arange(40)
    np.testing.assert_allclose(dense.score(users), sparse.score(users), atol=1e-5)


# --- BPR --------------------------------------------------------------------------------------


def _small_bpr(seed: int = 0, **overrides: object) -> BPRRecommender:
    params: dict[str, object] = {"dim": 16, "lr": 0.02, "epochs": 25, "batch_size": 256, "seed": seed}
    params.update(overrides)
    return BPRRecommender(**params)  # type: ignore[arg-type]


def test_bpr_loss_decreases_and_beats_random() -> None:
    train, test = _planted()
    seen: list[tuple[int, float]] = []
    model = _small_bpr(on_epoch=lambda e, loss: seen.append((e, loss))).fit(train)
    assert [e for e, _ in seen] == list(range(25))
    assert [loss for _, loss in seen] == model.loss_history
    assert model.loss_history[-1] < 0.7 * model.loss_history[0]

    rng = np.random.default_rng(123)
    random_recall = _recall_at_5(lambda b: rng.random((b.size, train.shape[1])), train, test)
    bpr_recall = _recall_at_5(model.score, train, test)
    # Random picks 5 of ~50 unseen items (recall ~0.1); in-cluster structure should be found.
    assert bpr_recall > max(0.3, 2 * random_recall)


def test_bpr_is_deterministic_under_seed() -> None:
    train, _ = _planted()
    users = np.arange(train.shape[0])
    a = _small_bpr(seed=7, epochs=3).fit(train)
    b = _small_bpr(seed=7, epochs=3).fit(train)
    c = _small_bpr(seed=8, epochs=3).fit(train)
    np.testing.assert_array_equal(a.score(users), b.score(users))
    assert a.loss_history == b.loss_history
    assert not np.array_equal(a.score(users), c.score(users))


def test_bpr_history_argument_is_ignored() -> None:
    train, test = _planted()
    model = _small_bpr(epochs=1).fit(train)
    users = np.arange(5)
    np.testing.assert_array_equal(model.score(users), model.score(users, history=train + test))


# --- EASE -------------------------------------------------------------------------------------

# 3 users x 3 items: u0 {0, 1}, u1 {1, 2}, u2 {0}. With l2 = 1, G = XᵀX + I = [[3,1,0],[1,3,1],[0,1,2]],
# det 13, P = G⁻¹ = [[5,-2,1],[-2,6,-3],[1,-3,8]] / 13, and B_ij = -P_ij / P_jj off the diagonal.
EASE_X = sp.csr_matrix(np.array([[1, 1, 0], [0, 1, 1], [1, 0, 0]], dtype=np.float32))
EASE_B = np.array(
    [
        [0.0, 2 / 6, -1 / 8],
        [2 / 5, 0.0, 3 / 8],
        [-1 / 5, 3 / 6, 0.0],
    ]
)


def test_ease_weights_match_hand_computation() -> None:
    model = EASERecommender(l2=1.0).fit(EASE_X)
    assert model.weights.dtype == np.float32
    np.testing.assert_allclose(model.weights, EASE_B, atol=1e-6)
    # u0 history {0, 1}: B[0] + B[1]; u2 history {0}: B[0].
    scores = model.score(np.array([0, 2]))
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, [[2 / 5, 1 / 3, 1 / 4], [0.0, 1 / 3, -1 / 8]], atol=1e-6)


def test_ease_matches_constrained_ridge_per_column() -> None:
    # The closed form equals, column by column, ridge regression of item j on the other items.
    rng = np.random.default_rng(5)
    x = (rng.random((30, 6)) < 0.4).astype(np.float64)
    l2 = 3.0
    model = EASERecommender(l2=l2).fit(sp.csr_matrix(x))
    expected = np.zeros((6, 6))
    for j in range(6):
        others = np.delete(np.arange(6), j)
        xo = x[:, others]
        expected[others, j] = np.linalg.solve(xo.T @ xo + l2 * np.eye(5), xo.T @ x[:, j])
    np.testing.assert_allclose(model.weights, expected, atol=1e-5)
    np.testing.assert_array_equal(np.diag(model.weights), np.zeros(6))


def test_ease_diagonal_is_zero_on_planted_data() -> None:
    train, _ = _planted()
    model = EASERecommender().fit(train)
    assert model.l2 == EASERecommender.DEFAULT_L2
    np.testing.assert_array_equal(np.diag(model.weights), np.zeros(train.shape[1]))


def test_ease_uses_given_history_and_beats_random() -> None:
    train, test = _planted()
    model = EASERecommender(l2=10.0).fit(train)
    history = EASE_X.tolil()
    history[0] = [0, 0, 3]  # u0 now has only item 2 (non-binary value is binarised)
    small = EASERecommender(l2=1.0).fit(EASE_X)
    np.testing.assert_allclose(small.score(np.array([0]), history=history.tocsr()), [EASE_B[2]], atol=1e-6)
    with pytest.raises(ValueError, match="item columns"):
        small.score(np.array([0]), history=train)
    assert _recall_at_5(model.score, train, test) > 0.3


@pytest.mark.parametrize("l2", [0, -1.0, float("nan"), float("inf"), True, "5", None])
def test_ease_rejects_bad_l2(l2: object) -> None:
    with pytest.raises(ValueError, match="l2"):
        EASERecommender(l2=l2)  # type: ignore[arg-type]


# --- persistence and factory ------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        PopRecommender(),
        ItemKNNRecommender(),
        ItemKNNRecommender(neighbours=2),
        ItemKNNRecommender(neighbours=2, dense_max_items=0),
        BPRRecommender(dim=8, epochs=2, seed=3),
        EASERecommender(l2=20.0),
    ],
    ids=["pop", "itemknn", "itemknn-top2", "itemknn-sparse", "bpr", "ease"],
)
def test_save_load_round_trip(model: Recommender, tmp_path: Path) -> None:
    train, test = _planted()
    model.fit(train)
    model.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["name"] == model.name
    # Only JSON and npz: nothing that needs pickle to read back.
    assert {p.suffix for p in (tmp_path / "m").iterdir()} <= {".json", ".npz"}

    loaded = load_model(tmp_path / "m")
    assert type(loaded) is type(model)
    assert isinstance(loaded, Recommender)
    users = np.arange(train.shape[0])
    np.testing.assert_array_equal(loaded.score(users), model.score(users))
    history = train + test
    np.testing.assert_array_equal(loaded.score(users, history), model.score(users, history))
    # The class's own loader works too.
    np.testing.assert_array_equal(type(model).load(tmp_path / "m").score(users), model.score(users))


def test_load_model_rejects_unknown_name(tmp_path: Path) -> None:
    (tmp_path / "model.json").write_text(json.dumps({"name": "nope", "format_version": 1}))
    with pytest.raises(ValueError, match="unknown model"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing")


def test_build_model() -> None:
    assert isinstance(build_model("pop", {}, seed=0), PopRecommender)
    knn = build_model("itemknn", {"neighbours": 5}, seed=0)
    assert isinstance(knn, ItemKNNRecommender) and knn.neighbours == 5
    bpr = build_model("bpr", {"dim": 8, "epochs": 1}, seed=11)
    assert isinstance(bpr, BPRRecommender) and bpr.seed == 11 and bpr.dim == 8
    ease = build_model("ease", {"l2": 50}, seed=0)
    assert isinstance(ease, EASERecommender) and ease.l2 == 50.0
    default_ease = build_model("ease", None, seed=0)
    assert isinstance(default_ease, EASERecommender) and default_ease.l2 == EASERecommender.DEFAULT_L2
    with pytest.raises(ValueError, match="unknown parameters"):
        build_model("ease", {"lambda": 50}, seed=0)
    with pytest.raises(ValueError, match="l2"):
        build_model("ease", {"l2": -1}, seed=0)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("als", {}, seed=0)
    with pytest.raises(ValueError, match="unknown parameters"):
        build_model("bpr", {"dimension": 8}, seed=0)
    with pytest.raises(ValueError, match="seed"):
        build_model("bpr", {"seed": 1}, seed=2)


def test_unfitted_model_raises() -> None:
    for model in (PopRecommender(), ItemKNNRecommender(), BPRRecommender(), EASERecommender()):
        with pytest.raises(RuntimeError, match="not fitted"):
            model.score(np.array([0]))


def test_out_of_range_users_raise() -> None:
    model = PopRecommender().fit(TINY)
    with pytest.raises(ValueError, match="user indices"):
        model.score(np.array([3]))
