"""Fusion model: feature bank vs the mining counter, holdout cut, training, persistence and cold start."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from components.baselines import ease_matrix
from components.core.config import Config, MetarecConfig
from components.core.parallel import Blocks
from components.data.kg import INTERACTED, HeteroGraph, Relation, binary_matrix, with_interactions
from components.evaluation import coldstart
from components.evaluation.metrics import compute_metrics
from components.evaluation.protocol import EvalData, evaluate
from components.evaluation.ranking import rank_all
from components.metapaths.counting import Counter
from components.metapaths.mining import normalise_rows
from components.metapaths.schema import Metapath, parse
from components.model import facade, features
from components.model.data import assemble, model_paths
from components.model.features import FeatureBank, build_bank
from components.model.fit import FitData, channel_sentences, fit
from components.model.loop import (
    FusionInputs,
    TrainConfig,
    feature_rows,
    temporal_holdout,
    train,
    validation_metrics,
    validation_users,
)
from components.model.net import FusionNet, NetConfig
from components.model.recommender import FIT_KEYS, MetarecRecommender

GENRES = ["action", "comedy", "drama", "horror", "romance"]
OCCUPATIONS = ["artist", "doctor", "engineer", "student", "writer"]

CF = "interacted|~interacted|interacted"  # user–item–user–item
GENRE = "interacted|item.genre|~item.genre"  # user–item–genre–item
OCCUPATION = "user.occupation|~user.occupation|interacted"  # user–occupation–user–item
PREQUEL_GENRE = "interacted|item.prequel|item.genre|~item.genre"  # length 4
OCCUPATION_PREQUEL = "user.occupation|~user.occupation|interacted|item.prequel"  # length 4, attribute source
PREQUEL = "interacted|~item.prequel"  # length 2

TEXT_DIM = 8
N_USERS, N_ITEMS = 60, 40
COLD_ITEM = 0  # never interacted with in the random dataset
SMALL = TrainConfig.from_section(
    # The text term is off by default (validation); on here so the tests exercise every part.
    MetarecConfig(epochs=6, patience=100, rank=8, batch_users=32, holdout=0.25, use_text=True),
    seed=0,
    eval_metric="ndcg@10",
)


# ---------------------------------------------------------------- builders


def make_graph(n_users: int, item_genre: sp.csr_matrix, rng: np.random.Generator) -> HeteroGraph:
    """A typed graph: items with genres and prequels, users with one occupation, no interactions yet."""
    n_items = item_genre.shape[0]
    occupation = rng.integers(0, len(OCCUPATIONS), size=n_users)
    heads = rng.integers(0, n_items, size=n_items // 2)
    tails = (heads + rng.integers(1, n_items, size=heads.size)) % n_items  # never a self-loop
    relations = {
        INTERACTED: Relation(INTERACTED, "user", "item", sp.csr_matrix((n_users, n_items), dtype=np.float32)),
        "item.genre": Relation("item.genre", "item", "genre", item_genre),
        "user.occupation": Relation(
            "user.occupation",
            "user",
            "occupation",
            binary_matrix(np.arange(n_users), occupation, (n_users, len(OCCUPATIONS))),
        ),
        "item.prequel": Relation(
            "item.prequel", "item", "item", binary_matrix(heads, tails, (n_items, n_items))
        ),
    }
    node_ids = {
        "user": [f"u{k}" for k in range(n_users)],
        "item": [f"i{k}" for k in range(n_items)],
        "genre": list(GENRES),
        "occupation": list(OCCUPATIONS),
    }
    return HeteroGraph(node_ids, relations)


def random_genres(n_items: int, rng: np.random.Generator) -> sp.csr_matrix:
    """Each item gets one or two genres."""
    rows, cols = [], []
    for item in range(n_items):
        for genre in rng.choice(len(GENRES), size=rng.integers(1, 3), replace=False):
            rows.append(item)
            cols.append(int(genre))
    return binary_matrix(np.asarray(rows), np.asarray(cols), (n_items, len(GENRES)))


def interactions(pools: list[np.ndarray], per_user: int, rng: np.random.Generator) -> pd.DataFrame:
    """``per_user`` distinct items per user drawn from that user's pool, with distinct timestamps."""
    frames = []
    for user, pool in enumerate(pools):
        items = rng.choice(pool, size=per_user, replace=False)
        stamps = 1_000 + rng.permutation(per_user) * 10
        frames.append(pd.DataFrame({"user": user, "item": items, "timestamp": stamps}))
    return pd.concat(frames, ignore_index=True)


def split_last(frame: pd.DataFrame, n_valid: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each user's latest ``n_valid`` interactions become validation, the rest training."""
    ordered = frame.sort_values(["user", "timestamp", "item"]).reset_index(drop=True)
    from_end = ordered.groupby("user").cumcount(ascending=False).to_numpy()
    train_part, valid_part = ordered[from_end >= n_valid], ordered[from_end < n_valid]
    return train_part.reset_index(drop=True), valid_part.reset_index(drop=True)


def unit_rows(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """Random unit-norm float32 rows."""
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fusion_inputs(
    graph: HeteroGraph,
    frame: pd.DataFrame,
    paths: list[str],
    item_text: np.ndarray,
    profile: np.ndarray,
    holdout: float,
    ease_l2: float | None = 10.0,
) -> FusionInputs:
    """Split the last two interactions per user off as validation and assemble the model's inputs."""
    n_users, n_items = len(graph.node_ids["user"]), len(graph.node_ids["item"])
    train_df, valid_df = split_last(frame, 2)
    shape = (n_users, n_items)
    train_matrix = binary_matrix(train_df.user.to_numpy(), train_df.item.to_numpy(), shape)
    valid_matrix = binary_matrix(valid_df.user.to_numpy(), valid_df.item.to_numpy(), shape)
    metapaths = [parse(p, graph.schema) for p in paths]
    return assemble(
        graph,
        train_df,
        train_matrix,
        valid_matrix,
        item_text,
        profile,
        metapaths,
        "pathsim",
        0.5,
        ease_l2,
        holdout,
    )


def random_inputs(seed: int = 0, zero_profiles: bool = False) -> tuple[HeteroGraph, FusionInputs]:
    """60 users × 40 items, Zipf-ish popularity, item 0 never interacted with (cold)."""
    rng = np.random.default_rng(seed)
    graph = make_graph(N_USERS, random_genres(N_ITEMS, rng), rng)
    pool = np.arange(1, N_ITEMS)
    weights = 1.0 / np.arange(1, pool.size + 1) ** 0.7
    picks = [rng.choice(pool, size=14, replace=False, p=weights / weights.sum()) for _ in range(N_USERS)]
    frame = interactions(picks, 8, rng)
    profile = (
        np.zeros((N_USERS, TEXT_DIM), np.float32) if zero_profiles else unit_rows(N_USERS, TEXT_DIM, rng)
    )
    paths = [CF, GENRE, OCCUPATION, PREQUEL_GENRE]
    return graph, fusion_inputs(
        graph, frame, paths, unit_rows(N_ITEMS, TEXT_DIM, rng), profile, SMALL.holdout
    )


@pytest.fixture(scope="module")
def fitted() -> tuple[HeteroGraph, FusionInputs, MetarecRecommender]:
    """A small trained model on the random dataset (text, IDs and paths all on)."""
    graph, inputs = random_inputs()
    net, _ = train(inputs, SMALL)
    model = MetarecRecommender(net, inputs.eval_bank, inputs.profile, inputs.eval_history, {"seed": 0})
    return graph, inputs, model


# ---------------------------------------------------------------- feature bank


@pytest.mark.parametrize("weighting", ["pathsim", "dwpc", "count"])
def test_bank_channels_equal_mining_counter(weighting: str) -> None:
    """Every channel equals the mining counter's normalised block, for any user order."""
    rng = np.random.default_rng(7)
    n_users, n_items = 30, 25
    graph = make_graph(n_users, random_genres(n_items, rng), rng)
    dense = (rng.random((n_users, n_items)) < 0.2).astype(np.float32)
    dense[0] = 0  # a user with no history: only the attribute-sourced channels reach items
    dense[:, 3] = 0  # an item nobody interacted with
    train_matrix = sp.csr_matrix(dense)
    ids = [CF, GENRE, OCCUPATION, PREQUEL_GENRE, OCCUPATION_PREQUEL, PREQUEL]
    paths = [parse(p, graph.schema) for p in ids]
    assert [p.length for p in paths] == [3, 3, 3, 4, 4, 2]
    bank = build_bank(graph, train_matrix, paths, weighting, 0.5, None)
    counter = Counter(with_interactions(graph, train_matrix), weighting, 0.5)  # type: ignore[arg-type]
    for users in (np.arange(n_users), np.array([5, 0, 17, 2])):
        rows = bank.rows(train_matrix[users], users)
        assert rows.shape == (len(users), len(paths) + 1, n_items)
        for c, path in enumerate(paths):
            expected = normalise_rows(counter.block(path, users))
            assert expected.any(), path.id
            np.testing.assert_allclose(rows[:, c, :], expected, atol=1e-5, err_msg=f"{weighting} {path.id}")
    assert bank.names[-1] == "popularity"
    assert bank.collaborative.tolist() == [True, False, True, False, False, False, True]


@pytest.mark.parametrize("weighting", ["pathsim", "dwpc", "count"])
def test_factored_channels_equal_dense_ones_and_survive_save_load(
    weighting: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over the dense budget a channel is kept as its sparse chain: same features, linear memory."""
    rng = np.random.default_rng(11)
    n_users, n_items = 40, 30
    graph = make_graph(n_users, random_genres(n_items, rng), rng)
    train_matrix = sp.csr_matrix((rng.random((n_users, n_items)) < 0.2).astype(np.float32))
    paths = [parse(p, graph.schema) for p in (CF, GENRE, OCCUPATION, PREQUEL_GENRE, OCCUPATION_PREQUEL)]
    dense = build_bank(graph, train_matrix, paths, weighting, 0.5, 50.0)
    factored = build_bank(graph, train_matrix, paths, weighting, 0.5, 50.0, dense_budget_bytes=0)
    kinds = [type(c.suffix).__name__ for c in factored.channels]
    assert kinds == ["Factors"] * len(paths) + ["ndarray", "ndarray"]  # popularity and EASE stay dense
    assert all(isinstance(c.suffix, np.ndarray) for c in dense.channels)
    factored.save(tmp_path)
    loaded = FeatureBank.load(tmp_path)
    assert [type(c.suffix).__name__ for c in loaded.channels] == kinds
    users = np.array([3, 0, 21, 39])
    expected = dense.rows(train_matrix[users], users)
    for bank in (factored, loaded):
        np.testing.assert_allclose(bank.rows(train_matrix[users], users), expected, rtol=1e-5, atol=1e-6)
    chain = loaded.channels[0].suffix
    assert not isinstance(chain, np.ndarray)
    np.testing.assert_array_equal(chain.apply(train_matrix, block=7), chain.apply(train_matrix))
    # Filled intermediates go dense (features.DENSE_FILL); all-sparse products give the same features.
    sourced = [c for c in range(len(paths)) if loaded.channels[c].source == "history"]
    assert len(sourced) >= 3
    for c in sourced:
        suffix = loaded.channels[c].suffix
        assert not isinstance(suffix, np.ndarray)
        densified = suffix.apply(train_matrix)
        monkeypatch.setattr(features, "DENSE_FILL", 1.0)
        np.testing.assert_allclose(suffix.apply(train_matrix), densified, rtol=1e-6, atol=1e-7)
        monkeypatch.undo()
    for c, path in enumerate(paths):
        suffix = loaded.channels[c].suffix
        assert not isinstance(suffix, np.ndarray)
        np.testing.assert_allclose(suffix.dense(), dense.channels[c].suffix, rtol=1e-5, atol=1e-7)
        assert suffix.nbytes > 0, path.id


def test_ease_channel_over_its_item_cap_is_the_top_items_ease_and_survives_save_load(tmp_path: Path) -> None:
    """Beyond ``ease_max_items`` EASE is the most-interacted items' own EASE; other items score zero."""
    rng = np.random.default_rng(4)
    n_users, n_items, cap = 50, 30, 12
    graph = make_graph(n_users, random_genres(n_items, rng), rng)
    popularity = np.linspace(0.5, 0.05, n_items)[rng.permutation(n_items)]
    train_matrix = sp.csr_matrix((rng.random((n_users, n_items)) < popularity[None, :]).astype(np.float32))
    counts = np.asarray(train_matrix.sum(axis=0)).ravel()
    assert len(set(counts.tolist())) > cap  # no tie decides which items are in
    top = np.sort(np.argsort(-counts, kind="stable")[:cap])
    whole = build_bank(graph, train_matrix, [], "pathsim", 0.5, 50.0, ease_max_items=n_items)
    np.testing.assert_array_equal(whole.channels[-1].suffix, ease_matrix(train_matrix, 50.0))
    capped = build_bank(graph, train_matrix, [], "pathsim", 0.5, 50.0, ease_max_items=cap)
    capped.save(tmp_path)
    for bank in (capped, FeatureBank.load(tmp_path)):
        suffix = bank.channels[-1].suffix
        assert not isinstance(suffix, np.ndarray) and suffix.nbytes < 4 * n_items * n_items
        expected = np.zeros((n_items, n_items), dtype=np.float32)
        expected[np.ix_(top, top)] = ease_matrix(sp.csr_matrix(train_matrix[:, top]), 50.0)
        np.testing.assert_allclose(suffix.dense(), expected, rtol=1e-6, atol=1e-7)
        scores = bank.rows(train_matrix, np.arange(n_users))[:, -1, :]
        assert not scores[:, np.setdiff1d(np.arange(n_items), top)].any() and np.abs(scores).max() == 1.0


def test_profile_attributes_map_known_and_unknown_values() -> None:
    """A known profile value gives a one-hot row; an unknown or missing value an empty row."""
    rng = np.random.default_rng(1)
    graph = make_graph(10, random_genres(8, rng), rng)
    train_matrix = sp.csr_matrix((rng.random((10, 8)) < 0.4).astype(np.float32))
    bank = build_bank(graph, train_matrix, [parse(OCCUPATION, graph.schema)], "pathsim", 0.5, None)
    known = bank.profile_attributes({"occupation": "writer", "gender": "F"})
    assert list(known) == ["user.occupation"]
    row = known["user.occupation"]
    assert row.shape == (1, len(OCCUPATIONS))
    assert row.toarray().tolist() == [[0, 0, 0, 0, 1]]
    for profile in ({"occupation": "astronaut"}, {}):
        empty = bank.profile_attributes(profile)["user.occupation"]
        assert empty.shape == (1, len(OCCUPATIONS)) and empty.nnz == 0
    # The cold user's attribute channel equals a known writer's (same source row, empty history).
    writer = int(np.flatnonzero(graph.matrix("user.occupation").toarray()[:, 4])[0])
    empty_history = sp.csr_matrix((1, 8), dtype=np.float32)
    cold = bank.rows(empty_history, attributes=known)
    warm = bank.rows(empty_history, np.array([writer]))
    np.testing.assert_array_equal(cold, warm)
    assert bank.rows(empty_history)[0, 0].sum() == 0  # no users, no attributes: the channel stays zero


# ---------------------------------------------------------------- holdout


def test_temporal_holdout_takes_latest_share_per_user() -> None:
    """Latest share per user is held out (at least one), ties by item, single interactions kept."""
    rows = [
        # user 0: five interactions, shuffled; 20% -> the latest one (item 4 at t=50)
        (0, 2, 30), (0, 4, 50), (0, 0, 10), (0, 3, 40), (0, 1, 20),
        # user 1: ten interactions -> the latest two
        *[(1, k, 100 + k) for k in range(10)],
        # user 2: one interaction -> stays in the history
        (2, 5, 7),
        # user 3: three interactions -> floor(0.6) = 0, but at least one is held
        (3, 6, 3), (3, 7, 1), (3, 8, 2),
        # user 4: two interactions at the same time -> the higher item id counts as later
        (4, 9, 5), (4, 1, 5),
    ]  # fmt: skip
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    history, held = temporal_holdout(frame, 6, 10, 0.2)
    assert history.shape == held.shape == (6, 10)

    def items(matrix: sp.csr_matrix, user: int) -> list[int]:
        return sorted(matrix[user].indices.tolist())

    expected_held = {0: [4], 1: [8, 9], 2: [], 3: [6], 4: [9], 5: []}
    expected_history = {0: [0, 1, 2, 3], 1: list(range(8)), 2: [5], 3: [7, 8], 4: [1], 5: []}
    assert {u: items(held, u) for u in range(6)} == expected_held
    assert {u: items(history, u) for u in range(6)} == expected_history
    assert history.multiply(held).nnz == 0
    assert history.nnz + held.nnz == len(frame)
    with pytest.raises(ValueError, match="holdout"):
        temporal_holdout(frame, 6, 10, 1.0)


# ---------------------------------------------------------------- training


def test_loss_decreases_on_random_data() -> None:
    """The training loss of the last epoch is below the first epoch's."""
    _, inputs = random_inputs(seed=3, zero_profiles=True)
    _, summary = train(inputs, replace(SMALL, epochs=15))
    curve = summary["curve"]
    assert len(curve) == summary["epochs_run"] == 15
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert all(np.isfinite(row["loss"]) for row in curve)
    assert 1 <= summary["best_epoch"] <= 15


def test_planted_genre_path_beats_chance() -> None:
    """Users who stay inside one genre are ranked well from metapaths alone; the genre path wins the gates."""
    rng = np.random.default_rng(11)
    n_users, per_genre = 100, 12
    n_items = per_genre * len(GENRES)
    genre_of_item = np.arange(n_items) % len(GENRES)
    item_genre = binary_matrix(np.arange(n_items), genre_of_item, (n_items, len(GENRES)))
    graph = make_graph(n_users, item_genre, rng)
    pools = [np.flatnonzero(genre_of_item == u % len(GENRES)) for u in range(n_users)]
    frame = interactions(pools, 8, rng)  # 6 for training (2 of them fit targets), the last 2 validate
    # The random prequel links are distractors: at initialisation they weigh as much as the genre path.
    paths = [PREQUEL, GENRE, "interacted|item.prequel"]
    profile = np.zeros((n_users, TEXT_DIM), np.float32)
    inputs = fusion_inputs(
        graph, frame, paths, unit_rows(n_items, TEXT_DIM, rng), profile, holdout=0.34, ease_l2=None
    )
    assert inputs.targets.nnz == 2 * n_users and inputs.valid.nnz == 2 * n_users
    cfg = replace(SMALL, epochs=10, lr=0.05, use_text=False, use_ids=False, holdout=0.34)
    net, summary = train(inputs, cfg)
    model = validation_metrics(net, inputs, 10)

    users = np.flatnonzero(np.diff(inputs.valid.indptr) > 0)
    noise = np.random.default_rng(0)
    chance = np.mean(
        [
            compute_metrics(
                rank_all(lambda b: noise.random((len(b), n_items)), users, 10, inputs.eval_history),
                inputs.valid[users],
                [10],
            )["ndcg@10"]
            for _ in range(20)
        ]
    )
    assert 0 < chance < 0.2
    assert model["ndcg@10"] > 2 * chance
    assert model["recall@10"] > 0.9  # the 6 unseen items of the user's genre fill the top of the list
    assert summary[f"best_valid_{cfg.eval_metric}"] == pytest.approx(model["ndcg@10"])
    curve = summary["curve"]
    assert curve[-1]["loss"] < 0.9 * curve[0]["loss"]
    with torch.no_grad():
        history = torch.from_numpy(inputs.eval_history.toarray())
        user = net.user_vector(history, torch.from_numpy(profile))
        gates = torch.nn.functional.softplus(net.path_bias + user @ net.path_user).mean(dim=0)
    genre = paths.index(GENRE)
    assert all(gates[genre] > gates[c] for c in range(len(gates)) if c != genre), gates


def test_training_is_deterministic() -> None:
    """Two runs with the same seed give identical weights."""
    _, inputs = random_inputs(seed=5)
    cfg = replace(SMALL, epochs=3)
    first, _ = train(inputs, cfg)
    second, _ = train(inputs, cfg)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    third, _ = train(inputs, replace(cfg, seed=1))
    assert not torch.equal(third.state_dict()["text_item"], a["text_item"])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_features_per_batch_train_the_same_model(threads: int) -> None:
    """Above ``feature_cache_mb`` the fit features are made per batch, split over ``threads``: the same
    values, the same fit."""
    _, inputs = random_inputs(seed=5)
    cfg = replace(SMALL, epochs=3, threads=threads)
    cached, cached_summary = train(inputs, cfg)
    streamed, streamed_summary = train(inputs, replace(cfg, feature_cache_mb=0))
    assert streamed_summary["features_cached"] is False and cached_summary["features_cached"] is True
    a, b = cached.state_dict(), streamed.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["loss"] for r in streamed_summary["curve"]] == [r["loss"] for r in cached_summary["curve"]]
    batch = np.array([7, 3, 11, 0, 5])  # unsorted, as an epoch's permutation gives them
    whole = inputs.fit_bank.rows(inputs.history[batch], batch)
    split = feature_rows(inputs.fit_bank, inputs.history, batch, Blocks(threads))
    np.testing.assert_array_equal(split, whole)


def test_patience_in_users_ends_a_stalled_fit_first_and_changes_nothing_before() -> None:
    """With no learning (lr 0) every epoch after the first is stale: ``patience_users`` stops the fit once
    that many users were trained on since the best epoch, ``patience`` when it comes first; the kept
    weights are the best epoch's either way."""
    _, inputs = random_inputs(seed=5)
    n_fit = int((np.diff(inputs.targets.indptr) > 0).sum())
    still = replace(SMALL, epochs=20, lr=0.0, patience=100)
    _, by_users = train(inputs, replace(still, patience_users=2 * n_fit))
    assert by_users["best_epoch"] == 1 and by_users["epochs_run"] == 3
    _, by_epochs = train(inputs, replace(still, patience=4, patience_users=100 * n_fit))
    assert by_epochs["epochs_run"] == 5
    _, off = train(inputs, replace(still, patience=4, patience_users=0))
    assert off["epochs_run"] == 5
    # A learning fit runs as without the check up to its first stale epoch, and stops there.
    _, cut = train(inputs, replace(SMALL, epochs=12, patience_users=n_fit))
    _, unchecked = train(inputs, replace(SMALL, epochs=12, patience_users=0))
    key = f"valid.{SMALL.eval_metric}"
    values = [row[key] for row in unchecked["curve"]]
    stale = [e for e in range(1, len(values)) if values[e] <= max(values[:e])]
    assert stale, "the check needs a fit with a stale epoch"
    assert cut["epochs_run"] == stale[0] + 1
    assert cut["curve"] == unchecked["curve"][: stale[0] + 1]


def test_a_fit_of_fixed_length_is_the_early_stopped_fit_at_that_epoch_without_validation() -> None:
    """``epochs=n`` trains the same n epochs as an early-stopped fit (validation draws from its own
    generator), keeps the last weights and validates nothing: the cold refit's main-fit epoch count."""
    _, inputs = random_inputs(seed=2)  # a fit whose best epoch is neither the first nor the last
    cfg = replace(SMALL, epochs=12, patience=3)
    net, summary = train(inputs, cfg)
    best = summary["best_epoch"]
    assert summary["early_stopping"] is True and summary["epochs_run"] > best > 1
    fixed, fixed_summary = train(inputs, cfg, epochs=best)
    for key, value in net.state_dict().items():
        assert torch.equal(value, fixed.state_dict()[key]), key
    assert fixed_summary["epochs_run"] == fixed_summary["best_epoch"] == best
    assert fixed_summary["early_stopping"] is False and fixed_summary["valid_users"] == 0
    assert [row["loss"] for row in fixed_summary["curve"]] == [row["loss"] for row in summary["curve"][:best]]
    assert all(set(row) == {"loss"} for row in fixed_summary["curve"])
    # A shorter fixed fit is a different model: the count is honoured, not rounded to the best.
    shorter, _ = train(inputs, cfg, epochs=best - 1)
    assert not torch.equal(shorter.state_dict()["id_item"], net.state_dict()["id_item"])
    for bad in (0, cfg.epochs + 1):
        with pytest.raises(ValueError, match="epochs must be between 1 and"):
            train(inputs, cfg, epochs=bad)


def test_the_cold_refit_repeats_the_main_fits_best_epoch_count_when_configured() -> None:
    """``eval.cold_epochs: main`` takes the main fit's best epoch; otherwise, for a baseline and for a
    model saved without its fit, the refit stops early on its own."""
    main = {"best_epoch": 4, "epochs_run": 8, "early_stopping": True}
    cfg = Config()
    assert cfg.eval.cold_epochs == "main" and facade.cold_refit_epochs(cfg, main) == 4
    assert facade.cold_refit_epochs(cfg, {}) is None
    own = Config.model_validate({"eval": {"cold_epochs": "early_stopping"}})
    assert facade.cold_refit_epochs(own, main) is None
    assert facade.cold_refit_epochs(Config.model_validate({"model": {"name": "pop"}}), main) is None


def test_epoch_and_validation_caps_sample_users_and_leave_small_data_alone() -> None:
    """Caps at or above the user counts change nothing; below them, each epoch sees a sample and
    early stopping judges one fixed seeded sample of validation users."""
    _, inputs = random_inputs(seed=5)
    cfg = replace(SMALL, epochs=3)
    n_fit = int((np.diff(inputs.targets.indptr) > 0).sum())
    valid_users = np.flatnonzero(np.diff(inputs.valid.indptr) > 0)
    full, full_summary = train(inputs, cfg)
    exact, _ = train(inputs, replace(cfg, epoch_users=n_fit, valid_users=len(valid_users)))
    for key, value in full.state_dict().items():
        assert torch.equal(value, exact.state_dict()[key]), key
    assert full_summary["epoch_users"] == n_fit and full_summary["valid_users"] == len(valid_users)

    half = replace(cfg, epoch_users=n_fit // 2, valid_users=len(valid_users) // 2)
    capped, summary = train(inputs, half)
    assert summary["epoch_users"] == n_fit // 2 and summary["valid_users"] == len(valid_users) // 2
    assert not torch.equal(capped.state_dict()["id_item"], full.state_dict()["id_item"])
    judged = validation_users(inputs.valid, half.valid_users, half.seed + 1)
    assert len(np.unique(judged)) == half.valid_users and np.isin(judged, valid_users).all()
    assert np.array_equal(judged, validation_users(inputs.valid, half.valid_users, half.seed + 1))
    # The best epoch's figure is the sample's metric of the kept weights, not the whole set's.
    key = f"best_valid_{half.eval_metric}"
    assert summary[key] == pytest.approx(validation_metrics(capped, inputs, 10, judged)["ndcg@10"])
    assert summary[key] != pytest.approx(validation_metrics(capped, inputs, 10)["ndcg@10"])


# ---------------------------------------------------------------- recommender


def cold_user(model: MetarecRecommender, occupation: str) -> tuple[sp.csr_matrix, np.ndarray, dict]:
    """Empty history, a profile vector and the attribute rows of a user not in the training graph."""
    n_items = model.bank.n_items
    profile = unit_rows(1, TEXT_DIM, np.random.default_rng(42))
    return (
        sp.csr_matrix((1, n_items), dtype=np.float32),
        profile,
        model.bank.profile_attributes({"occupation": occupation}),
    )


def test_save_load_round_trip(
    fitted: tuple[HeteroGraph, FusionInputs, MetarecRecommender], tmp_path: Path
) -> None:
    """A loaded model scores known and cold users exactly as the saved one."""
    _, inputs, model = fitted
    model.save(tmp_path / "model")
    loaded = MetarecRecommender.load(tmp_path / "model")
    users = np.arange(N_USERS)
    np.testing.assert_array_equal(loaded.score(users), model.score(users))
    np.testing.assert_array_equal(loaded.score(users, inputs.history), model.score(users, inputs.history))
    history, profile, attributes = cold_user(model, "writer")
    np.testing.assert_array_equal(
        loaded.score_rows(history, profile, attributes=attributes),
        model.score_rows(history, profile, attributes=attributes),
    )
    assert loaded.bank.names == model.bank.names
    assert loaded.config == {"seed": 0}
    assert loaded.net.cfg == model.net.cfg
    assert (loaded.train != model.train).nnz == 0


def test_rankings_are_the_same_in_order_on_dask_threads_and_on_a_dask_cluster(
    fitted: tuple[HeteroGraph, FusionInputs, MetarecRecommender],
) -> None:
    """User blocks ranked on Dask threads, or on a real Dask cluster of worker processes, give exactly
    the serial path's rankings: warm, cold (seeded tie-breaking included) and training validation."""
    from distributed import LocalCluster

    _, inputs, model = fitted
    users = np.arange(N_USERS)
    # Cold protocol on the fit cut: features part as train, fit targets as valid, validation as test.
    cold = coldstart.cold_item_split(inputs.history, inputs.targets, inputs.valid, 0.25, seed=3)
    data = EvalData(inputs.eval_history, inputs.valid, inputs.valid)

    def everything(blocks: Blocks) -> dict:
        return {
            "topk": rank_all(model.score, users, 10, inputs.eval_history, block_size=7, blocks=blocks),
            "warm": evaluate(model, data, "valid", [5, 10], [5], block_size=7, blocks=blocks),
            "cold": coldstart.evaluate_cold(
                lambda b: model.score(b, history=cold.train), cold, [5, 10], 7, seed=3, blocks=blocks
            ),
            "validation": validation_metrics(model.net, inputs, 10, blocks=blocks),
        }

    serial = everything(Blocks())
    assert serial["warm"]["overall"]["n_users"] == N_USERS and serial["cold"]["n_users"] > 7
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        runs = {
            "threads": everything(Blocks(workers=2)),
            "cluster": everything(Blocks(address=cluster.scheduler_address)),
        }
    for where, run in runs.items():
        np.testing.assert_array_equal(run.pop("topk"), serial["topk"], err_msg=where)
        assert run == {k: v for k, v in serial.items() if k != "topk"}, where


def test_blocks_name_an_unreachable_scheduler() -> None:
    """A Dask address nobody answers is a clear ConnectionError naming it, not a traceback from Dask."""
    from components.core.processes import free_port

    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match=f"cannot reach the Dask scheduler at {address}"):
        Blocks(address=address, timeout_s=2).map(lambda shared, item: item, None, [1, 2])
    with pytest.raises(ValueError, match="workers must be at least 1"):
        Blocks(workers=0)


def test_save_load_bank_directly(
    fitted: tuple[HeteroGraph, FusionInputs, MetarecRecommender], tmp_path: Path
) -> None:
    """The feature bank alone survives a save/load round trip."""
    _, inputs, model = fitted
    model.bank.save(tmp_path)
    bank = FeatureBank.load(tmp_path)
    users = np.arange(N_USERS)
    np.testing.assert_array_equal(
        bank.rows(inputs.eval_history, users), model.bank.rows(inputs.eval_history, users)
    )
    assert bank.attribute_values == model.bank.attribute_values
    assert bank.collaborative.tolist() == model.bank.collaborative.tolist()


def test_cold_user_scores_are_finite_and_stable(
    fitted: tuple[HeteroGraph, FusionInputs, MetarecRecommender],
) -> None:
    """A user with no history but a profile gets finite, repeatable scores that use the profile."""
    _, _, model = fitted
    history, profile, attributes = cold_user(model, "writer")
    first = model.score_rows(history, profile, attributes=attributes)
    second = model.score_rows(history, profile, attributes=attributes)
    assert first.shape == (1, N_ITEMS)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)
    # The occupation channel reaches items for a writer; an unknown occupation leaves it at zero.
    occupation = [c.metapath_id for c in model.bank.channels].index(OCCUPATION)
    assert model.bank.rows(history, attributes=attributes)[0, occupation].any()
    _, _, unknown = cold_user(model, "astronaut")
    assert not model.bank.rows(history, attributes=unknown)[0, occupation].any()
    assert np.isfinite(model.score_rows(history, np.zeros_like(profile), attributes=unknown)).all()


def test_cold_item_ignores_id_parameters(
    fitted: tuple[HeteroGraph, FusionInputs, MetarecRecommender],
) -> None:
    """A cold item is scored without its ID factors or collaborative channels; a warm item uses them."""
    _, inputs, model = fitted
    assert not inputs.warm[COLD_ITEM]
    warm_item = int(np.flatnonzero(inputs.warm)[0])
    users = np.arange(N_USERS)
    feats = model.bank.rows(model.train[users], users)
    assert not feats[:, model.bank.collaborative, COLD_ITEM].any()
    before = model.score(users)
    assert np.isfinite(before).all()
    net: FusionNet = model.net
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    try:
        with torch.no_grad():
            net.id_item[COLD_ITEM] += 5.0
            net.id_bias[COLD_ITEM] += 5.0
            net.id_user[COLD_ITEM] += 5.0
        after = model.score(users)
        np.testing.assert_array_equal(after[:, COLD_ITEM], before[:, COLD_ITEM])
        with torch.no_grad():
            net.id_bias[warm_item] += 5.0  # a warm item's bias does move its score
        np.testing.assert_allclose(model.score(users)[:, warm_item], before[:, warm_item] + 5.0, atol=1e-4)
    finally:
        net.load_state_dict(saved)
    np.testing.assert_array_equal(model.score(users), before)


# ---------------------------------------------------------------- model paths


def test_model_paths_adds_best_content_paths() -> None:
    """Selected paths of length ≥ 2 come first, then the best content paths not through interactions."""
    rng = np.random.default_rng(0)
    schema = make_graph(4, random_genres(5, rng), rng).schema

    def candidate(path_id: str, ndcg: float, coverage: float = 0.5) -> dict:
        return {"id": path_id, "length": len(path_id.split("|")), "ndcg@10": ndcg, "pair_coverage": coverage}

    report = {
        "selected": [{"id": "interacted"}, {"id": CF}, {"id": PREQUEL}],
        "candidates": [
            candidate("interacted", 0.5),
            candidate(CF, 0.4),
            candidate(PREQUEL, 0.3),
            candidate(OCCUPATION, 0.35),  # tail goes through interacted
            candidate("interacted|~interacted|user.occupation|~user.occupation|interacted", 0.9),  # length 5
            candidate("interacted|item.prequel|item.prequel", 0.1),
            candidate("interacted|~item.prequel|~item.prequel", 0.1),  # tie with the one above: id decides
            candidate(GENRE, 0.2),
            candidate("interacted|item.prequel|~item.prequel", 0.6, coverage=0.0),  # reaches no truth pair
        ],
    }
    chosen = model_paths(report, schema, content_paths=2)
    assert all(isinstance(p, Metapath) for p in chosen)
    assert [p.id for p in chosen] == [CF, PREQUEL, GENRE, "interacted|item.prequel|item.prequel"]
    assert [p.id for p in model_paths(report, schema, 0)] == [CF, PREQUEL]
    assert len(model_paths(report, schema, 10)) == 5
    # Without the mined selection the same content paths stay (not ones the selection held).
    without = model_paths(report, schema, content_paths=2, mined=False)
    assert [p.id for p in without] == [GENRE, "interacted|item.prequel|item.prequel"]
    assert model_paths(report, schema, 0, mined=False) == []


# ---------------------------------------------------------------- ablation switches


def _fit_data(seed: int = 0) -> FitData:
    """The random dataset as the stage outputs ``fit`` reads, with CF and OCCUPATION mined, GENRE content."""
    rng = np.random.default_rng(seed)
    graph = make_graph(N_USERS, random_genres(N_ITEMS, rng), rng)
    pool = np.arange(1, N_ITEMS)
    frame = interactions([rng.choice(pool, size=14, replace=False) for _ in range(N_USERS)], 8, rng)
    train_df, valid_df = split_last(frame, 2)
    shape = (N_USERS, N_ITEMS)

    def candidate(path_id: str, ndcg: float) -> dict:
        return {"id": path_id, "length": len(path_id.split("|")), "ndcg@10": ndcg, "pair_coverage": 0.5}

    report = {
        "selected": [{"id": CF}, {"id": OCCUPATION}],
        "candidates": [candidate(CF, 0.3), candidate(OCCUPATION, 0.2), candidate(GENRE, 0.1)],
    }
    return FitData(
        graph=graph,
        train=train_df,
        train_matrix=binary_matrix(train_df.user.to_numpy(), train_df.item.to_numpy(), shape),
        valid_matrix=binary_matrix(valid_df.user.to_numpy(), valid_df.item.to_numpy(), shape),
        report=report,
        item_text=unit_rows(N_ITEMS, TEXT_DIM, rng),
        profile=unit_rows(N_USERS, TEXT_DIM, rng),
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, [CF, OCCUPATION, GENRE, "popularity", "ease"]),
        ({"use_mined_paths": False}, [GENRE, "popularity", "ease"]),
        ({"content_paths": 0}, [CF, OCCUPATION, "popularity", "ease"]),
        ({"use_popularity": False}, [CF, OCCUPATION, GENRE, "ease"]),
        ({"ease_l2": None}, [CF, OCCUPATION, GENRE, "popularity"]),
        # Every channel removed one by one: an empty bank, the scorer has text and ID terms only.
        ({"use_mined_paths": False, "content_paths": 0, "use_popularity": False, "ease_l2": None}, []),
    ],
)
def test_ablation_switches_remove_one_kind_of_channel(changes: dict, expected: list[str]) -> None:
    """Each switch of ``model.metarec`` removes its channels alone; the model still fits and scores."""
    data = _fit_data()
    small = {"epochs": 2, "patience": 100, "rank": 8, "batch_users": 32, "holdout": 0.25, "content_paths": 1}
    mcfg = MetarecConfig(**{**small, **changes})
    model, summary = fit(data, mcfg, "pathsim", 0.5, 0, eval_metric="ndcg@10")
    assert [c.metapath_id or c.kind for c in model.bank.channels] == expected
    assert model.net.cfg.n_channels == len(expected) == len(summary["channels"])
    scores = model.score(np.arange(N_USERS))
    assert scores.shape == (N_USERS, N_ITEMS) and np.isfinite(scores).all()
    # A cold refit (the ablation's cold protocol) works with the same switches.
    cold, _ = fit(data.without_items(np.array([1, 2, 3])), mcfg, "pathsim", 0.5, 0, eval_metric="ndcg@10")
    assert np.isfinite(cold.score(np.arange(N_USERS))).all()


# ---------------------------------------------------------------- options: language gates, text→ID

C = 3


def _unit(rows: int, seed: int) -> torch.Tensor:
    x = torch.randn(rows, TEXT_DIM, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def _inputs(batch: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    history = (torch.rand(batch, N_ITEMS, generator=gen) < 0.2).float()
    return history, _unit(batch, 8), torch.rand(batch, C, N_ITEMS, generator=gen)


def test_language_gates_are_scaled_cosines_with_the_channel_phrases() -> None:
    cfg = NetConfig(N_ITEMS, TEXT_DIM, C, rank=4, gates="language")
    channel_text = _unit(C, 3)
    net = FusionNet(cfg, _unit(N_ITEMS, 1), torch.ones(N_ITEMS), 0, channel_text)
    assert not hasattr(net, "path_user")  # no free per-user map: the language model alone decides
    with torch.no_grad():
        net.path_bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        net.gate_history.copy_(torch.tensor([2.0, 0.0, -1.0]))
        net.gate_profile.copy_(torch.tensor([0.0, 3.0, 1.0]))
    history, profile, feats = _inputs()
    user = net.user_vector(history, profile)
    mean = user[:, :TEXT_DIM]
    want = (
        net.path_bias
        + (mean @ channel_text.T) * net.gate_history
        + (profile @ channel_text.T) * net.gate_profile
    )
    torch.testing.assert_close(net.gate_logits(user), want)
    # The scales learn: a loss on the scores reaches them.
    net(history, profile, feats).sum().backward()
    assert net.gate_history.grad is not None and net.gate_history.grad.abs().sum() > 0


def test_language_gates_need_the_channel_phrases() -> None:
    cfg = NetConfig(N_ITEMS, TEXT_DIM, C, gates="language")
    with pytest.raises(ValueError, match=r"needs channel_text of shape \(3, 8\), got None"):
        FusionNet(cfg, _unit(N_ITEMS, 1), torch.ones(N_ITEMS))
    with pytest.raises(ValueError, match="gates must be learned, language or both"):
        FusionNet(NetConfig(N_ITEMS, TEXT_DIM, C, gates="lm"), _unit(N_ITEMS, 1), torch.ones(N_ITEMS))


def test_default_net_keeps_its_tensors() -> None:
    """Models saved before the options load unchanged: the defaults add no tensor to the state."""
    net = FusionNet(NetConfig(N_ITEMS, TEXT_DIM, C), _unit(N_ITEMS, 1), torch.ones(N_ITEMS))
    assert sorted(net.state_dict()) == sorted(
        ["item_text", "warm", "path_bias", "path_user", "text_item", "text_user", "text_user_bias"]
        + ["text_bias", "id_item", "id_user", "id_bias"]
    )


def test_text_to_id_gives_cold_items_an_id_term_from_text_alone() -> None:
    warm = torch.ones(N_ITEMS)
    warm[:5] = 0.0
    cfg = NetConfig(N_ITEMS, TEXT_DIM, C, rank=4, use_paths=False, use_text=False, text_to_id=True)
    net = FusionNet(cfg, _unit(N_ITEMS, 1), warm)
    history, profile, feats = _inputs()
    before = net(history, profile, feats)
    with torch.no_grad():
        net.id_from_text.mul_(100.0)
    after = net(history, profile, feats)
    assert not torch.allclose(before[:, :5], after[:, :5])  # cold items: scored through the map
    torch.testing.assert_close(before[:, 5:], after[:, 5:])  # warm items: their own factors only
    plain = FusionNet(
        NetConfig(N_ITEMS, TEXT_DIM, C, rank=4, use_paths=False, use_text=False), _unit(N_ITEMS, 1), warm
    )
    assert torch.count_nonzero(plain(history, profile, feats)[:, :5]) == 0  # off: cold items get nothing


def test_fit_with_every_option_saves_and_loads(tmp_path: Path) -> None:
    """Language gates embed one phrase per channel; with text→ID and metadata bias, save/load is exact."""
    data = _fit_data()
    seen: list[list[str]] = []

    def encode(texts: list[str]) -> np.ndarray:
        seen.append(list(texts))
        return _unit(len(texts), 11).numpy()

    data.encode = encode
    small = {"epochs": 2, "patience": 100, "rank": 8, "batch_users": 32, "holdout": 0.25, "content_paths": 1}
    options = MetarecConfig(**small, gates="both", text_to_id=True, attribute_bias=True)
    model, _ = fit(data, options, "pathsim", 0.5, 0, eval_metric="ndcg@10")
    assert model.net.cfg.n_attributes == len(GENRES)
    assert seen == [channel_sentences(model.bank, data.graph)]
    assert seen[0][-2:] == ["items that many people liked", "items often liked together with items you liked"]
    model.save(tmp_path)
    again = MetarecRecommender.load(tmp_path)
    users = np.arange(N_USERS)
    np.testing.assert_allclose(again.score(users), model.score(users), rtol=1e-5, atol=1e-5)
    # The saved model says how its fit went: the cold refit reads the best epoch back.
    assert again.fit_summary == model.fit_summary and set(again.fit_summary) == set(FIT_KEYS)
    assert again.fit_summary["early_stopping"] is True and 1 <= again.fit_summary["best_epoch"] <= 2
    data.encode = None
    with pytest.raises(ValueError, match="needs the text encoder"):
        fit(data, MetarecConfig(**small, gates="language"), "pathsim", 0.5, 0, eval_metric="ndcg@10")


def test_item_attributes_are_metadata_one_hots_only() -> None:
    """Genre (metadata) becomes one-hot columns; prequel (item→item) and interactions do not."""
    from components.model.fit import item_attributes

    data = _fit_data()
    attrs = item_attributes(data.graph)
    assert attrs is not None and attrs.dtype == np.float32
    np.testing.assert_array_equal(attrs, data.graph.matrix("item.genre").toarray())
    assert attrs.shape == (N_ITEMS, len(GENRES))


def test_attribute_bias_shifts_every_users_scores_by_the_items_metadata() -> None:
    rng = np.random.default_rng(3)
    attrs = torch.from_numpy(random_genres(N_ITEMS, rng).toarray().astype(np.float32))
    cfg = NetConfig(N_ITEMS, TEXT_DIM, C, rank=4, n_attributes=len(GENRES))
    net = FusionNet(cfg, _unit(N_ITEMS, 1), torch.ones(N_ITEMS), 0, item_attributes=attrs)
    history, profile, feats = _inputs()
    before = net(history, profile, feats)
    with torch.no_grad():
        net.attribute_bias.copy_(torch.arange(len(GENRES), dtype=torch.float32))
    shift = attrs @ torch.arange(len(GENRES), dtype=torch.float32)
    torch.testing.assert_close(net(history, profile, feats), before + shift[None, :])
    with pytest.raises(ValueError, match="needs item_attributes of shape"):
        FusionNet(cfg, _unit(N_ITEMS, 1), torch.ones(N_ITEMS))


@pytest.mark.parametrize(
    ("overrides", "frozen", "retunes"),
    [({}, False, True), ({"eval": {"cold_finetune": False}}, False, False), ({}, True, False)],
)
def test_cold_refit_retunes_the_encoder_on_the_reduced_training_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: dict, frozen: bool, retunes: bool
) -> None:
    """The cold refit hands the retune a training part without the cold items and fits on its vectors."""
    from components.core.workspace import Paths
    from components.text.retune import Retuned

    data = _fit_data()
    cold_items = np.array([1, 2, 3])
    retuned_with: list[pd.DataFrame] = []
    fitted: list[FitData] = []
    new_text = unit_rows(N_ITEMS, TEXT_DIM, np.random.default_rng(9))

    def retune(paths: Paths, cfg: Config, train: pd.DataFrame) -> Retuned:
        retuned_with.append(train)
        return Retuned(new_text, data.profile, tmp_path / "adapter", len(train), "fine-tuned")

    monkeypatch.setattr(facade, "fit_data", lambda paths, cfg, frozen=False: data)
    monkeypatch.setattr(facade, "retuned_text", retune)
    monkeypatch.setattr(facade, "fit_metarec", lambda d, cfg, log=True, epochs=None: (fitted.append(d), {}))
    cfg = Config.model_validate(overrides)
    facade.fit_configured(Paths(tmp_path), cfg, cold_items=cold_items, frozen=frozen)
    assert len(retuned_with) == int(retunes)
    if retunes:
        assert not retuned_with[0].item.isin(cold_items).any() and len(retuned_with[0]) > 0
        np.testing.assert_array_equal(fitted[0].item_text, new_text)
    else:
        np.testing.assert_array_equal(fitted[0].item_text, data.item_text)
    assert fitted[0].train_matrix[:, cold_items].nnz == 0
    # A warm fit never retunes.
    facade.fit_configured(Paths(tmp_path), cfg)
    assert len(retuned_with) == int(retunes)
