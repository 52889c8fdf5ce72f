"""Drift statistics against known distributions, the monitor on a synthetic world, and the report."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from components.drift import checks as monitor
from components.drift import report, stats
from components.drift.checks import DriftConfig, Reference, Window

# ---------------------------------------------------------------------------------------------------
# Statistics against hand-computed values


def test_psi_and_js_are_zero_for_identical_distributions() -> None:
    # Counts differ in scale only: the shares are identical.
    assert stats.psi([10, 20, 30, 40], [1, 2, 3, 4]) == pytest.approx(0.0, abs=1e-12)
    assert stats.js_divergence([10, 20, 30, 40], [1, 2, 3, 4]) == pytest.approx(0.0, abs=1e-12)


def test_psi_known_shift_matches_the_formula() -> None:
    # p = [0.5, 0.5], q = [0.9, 0.1]:
    # PSI = (0.9 - 0.5) ln(0.9 / 0.5) + (0.1 - 0.5) ln(0.1 / 0.5) = 0.4 ln 1.8 + 0.4 ln 5 = 0.4 ln 9.
    expected = 0.4 * math.log(9.0)
    assert expected == pytest.approx(0.878890, abs=1e-6)
    assert stats.psi([50, 50], [90, 10]) == pytest.approx(expected, rel=1e-9)
    # Symmetric: swapping reference and current gives the same value.
    assert stats.psi([90, 10], [50, 50]) == pytest.approx(expected, rel=1e-9)


def test_js_known_shift_matches_the_formula() -> None:
    # m = (p + q) / 2 = [0.7, 0.3]; JS = (KL(p||m) + KL(q||m)) / 2 in bits.
    kl_p = 0.5 * math.log2(0.5 / 0.7) + 0.5 * math.log2(0.5 / 0.3)
    kl_q = 0.9 * math.log2(0.9 / 0.7) + 0.1 * math.log2(0.1 / 0.3)
    expected = (kl_p + kl_q) / 2
    assert expected == pytest.approx(0.1468, abs=1e-4)
    assert stats.js_divergence([0.5, 0.5], [0.9, 0.1]) == pytest.approx(expected, rel=1e-9)
    # Disjoint supports are the maximum, 1 bit.
    assert stats.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)


def test_psi_smoothing_keeps_empty_buckets_finite() -> None:
    value = stats.psi([100, 0], [0, 100], eps=1e-4)
    assert math.isfinite(value) and value > 10
    with pytest.raises(ValueError, match="aligned"):
        stats.psi([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="positive total"):
        stats.psi([0, 0], [1, 1])


def test_chi_square_identical_and_known_shift() -> None:
    chi2, p = stats.chi_square([100, 200, 300], [10, 20, 30])
    assert chi2 == pytest.approx(0.0, abs=1e-9)
    assert p == pytest.approx(1.0)
    # [[50, 50], [90, 10]]: expected cells 70, 30 in both rows, so
    # chi2 = 2 * (20² / 70 + 20² / 30) = 38.095...
    chi2, p = stats.chi_square([50, 50], [90, 10])
    assert chi2 == pytest.approx(2 * (400 / 70 + 400 / 30), rel=1e-9)
    assert p < 1e-8


def test_sparse_categories_are_pooled() -> None:
    ref, cur, kept = stats.merge_sparse_categories([1000, 1000, 2, 1], [100, 100, 0, 1])
    assert kept.tolist() == [0, 1]
    assert ref.tolist() == [1000, 1000, 3]
    assert cur.tolist() == [100, 100, 1]


def test_cramers_v_is_balanced_and_bounded() -> None:
    assert stats.cramers_v([300, 700], [30, 70]) == pytest.approx(0.0, abs=1e-12)
    assert stats.cramers_v([100, 0], [0, 100]) == pytest.approx(1.0)
    # The same shift against a 100x larger reference keeps the same balanced V.
    small = stats.cramers_v([50, 50], [90, 10])
    large = stats.cramers_v([5000, 5000], [90, 10])
    assert small == pytest.approx(large)
    assert stats.cramers_v([5000, 5000], [90, 10], balanced=False) < small


def test_unseen_share_counts_events() -> None:
    assert stats.unseen_share([1, 1, 2, 3], known=[1, 2]) == pytest.approx(0.25)
    assert stats.unseen_share([], known=[1]) == 0.0


def test_mmd_same_distribution_is_not_significant() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16))
    y = rng.normal(size=(150, 16))
    res = stats.mmd_rbf(x, y, n_perm=200, seed=1)
    assert res.p_value > 0.05
    assert abs(res.mmd2) < 0.01


def test_mmd_detects_a_mean_shift_in_16d_gaussians() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16))
    y = rng.normal(loc=0.5, size=(150, 16))
    res = stats.mmd_rbf(x, y, n_perm=200, seed=1)
    assert res.p_value < 0.01
    assert res.mmd2 > 0.05
    # Seeded: the same call gives the same answer.
    assert stats.mmd_rbf(x, y, n_perm=200, seed=1) == res


def test_list_quality_by_hand() -> None:
    served = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [2]]
    positives: list[set[int]] = [{2}, {9, 4}, set(), {2, 9}]
    # List 3 has no positive and is left out; lists 1, 2 and 4 hit within k = 3.
    hits, ndcg = stats.per_list_quality(served, positives, k=3)
    np.testing.assert_array_equal(hits, [1.0, 1.0, 1.0])
    assert stats.per_list_quality(served, positives, k=1)[0].tolist() == [0.0, 1.0, 1.0]
    # NDCG@3: list 1 hits at rank 2 of one positive -> (1/log2 3) / 1; list 2 hits at rank 1 and
    # item 9 was never served, so of two positives -> 1 / (1 + 1/log2 3). List 4 is shorter than k:
    # the ideal still places min(2 positives, k) items, as the offline metric does.
    ndcg2 = 1 / (1 + 1 / math.log2(3))
    np.testing.assert_allclose(ndcg, [1 / math.log2(3), ndcg2, ndcg2])


def test_popularity_buckets_hold_equal_traffic() -> None:
    counts = pd.Series(np.arange(1, 201, dtype=float), index=np.arange(200))
    buckets = stats.bucket_map(counts, 10)
    ref, cur, labels, unseen = stats.bucket_counts(counts, [0, 199, 199, 500], buckets, 10)
    assert labels == [f"b{b}" for b in range(10)]
    shares = ref / ref.sum()
    assert np.all(np.abs(shares - 0.1) < 0.02)
    # The rarest item sits in the tail bucket, the most popular in the head bucket.
    assert cur[0] == 1 and cur[-1] == 2 and unseen == 1


# ---------------------------------------------------------------------------------------------------
# The monitor on a synthetic world

N_ITEMS, N_USERS, N_GENRES, N_NEW, DIM = 800, 400, 18, 400, 16


@dataclass
class World:
    """Item popularity, user activity, genres and text embeddings of a synthetic catalogue."""

    item_p: np.ndarray
    user_p: np.ndarray
    genres: pd.DataFrame
    emb: np.ndarray
    has_genre: dict[str, np.ndarray]

    def interactions(self, n: int, rng: np.random.Generator) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "user": rng.choice(N_USERS, n, p=self.user_p),
                "item": rng.choice(N_ITEMS, n, p=self.item_p),
                "timestamp": np.arange(n, dtype=float),
            }
        )

    def events(
        self,
        rng: np.random.Generator,
        n: int = 2000,
        item_p: np.ndarray | None = None,
        n_lists: int = 300,
        click_p: float = 0.3,
    ) -> pd.DataFrame:
        """``n`` ratings plus ``n_lists`` served lists of 10 with position-decaying clicks.

        Shaped like the serving feedback store: an impression's rank is in ``position``, only ratings
        have a ``value``, and only impressions carry the ``model_version``.
        """
        p = self.item_p if item_p is None else item_p
        users = rng.choice(N_USERS, n, p=self.user_p)
        items = rng.choice(len(p), n, p=p)
        ratings = {
            "type": np.full(n, "rating"),
            "user_id": users,
            "item_id": items,
            "value": rng.integers(1, 6, n).astype(float),
            "ts": rng.uniform(0, 1e4, n),
        }
        list_users = rng.choice(N_USERS, n_lists, p=self.user_p)
        # Gumbel top-k: 10 distinct items per list drawn in proportion to p, vectorised.
        keys = np.log(np.maximum(p, 1e-300))[None, :] + rng.gumbel(size=(n_lists, len(p)))
        served = np.argsort(-keys, axis=1)[:, :10]
        list_ts = rng.uniform(0, 1e4, n_lists)
        request_ids = np.array([f"req{r}" for r in range(n_lists)], dtype=object)
        impressions = {
            "type": np.full(served.size, "impression"),
            "user_id": np.repeat(list_users, 10),
            "item_id": served.ravel(),
            "ts": np.repeat(list_ts, 10),
            "request_id": np.repeat(request_ids, 10),
            "position": np.tile(np.arange(1, 11), n_lists),
            "model_version": "3",
        }
        clicked = rng.random((n_lists, 10)) < click_p / np.arange(1, 11)
        rows, cols = np.nonzero(clicked)
        clicks = {
            "type": np.full(rows.size, "click"),
            "user_id": list_users[rows],
            "item_id": served[rows, cols],
            "ts": list_ts[rows] + 1.0,
            "request_id": request_ids[rows],
        }
        frame = pd.concat([pd.DataFrame(part) for part in (ratings, impressions, clicks)], ignore_index=True)
        frame["event_id"] = [f"e{i}" for i in range(len(frame))]
        return frame

    def shifted(self, weights: np.ndarray) -> np.ndarray:
        p = self.item_p * weights
        return p / p.sum()


def _world(seed: int = 0) -> World:
    rng = np.random.default_rng(seed)
    item_p = 1.0 / (np.arange(N_ITEMS) + 10.0) ** 0.9
    item_p /= item_p.sum()
    user_p = rng.lognormal(0.0, 1.0, N_USERS)
    user_p /= user_p.sum()
    genre_p = 1.0 / (np.arange(N_GENRES) + 2.0)
    genre_p /= genre_p.sum()
    rows: list[tuple[int, str]] = []
    first = np.empty(N_ITEMS + N_NEW, dtype=np.int64)
    for item in range(N_ITEMS + N_NEW):
        picked = rng.choice(N_GENRES, rng.integers(1, 4), replace=False, p=genre_p)
        first[item] = picked[0]
        rows.extend((item, f"g{g}") for g in picked)
    genres = pd.DataFrame(rows, columns=["item", "genre"])
    # Text embeddings cluster by an item's first genre, as titles and descriptions would.
    centroids = rng.normal(size=(N_GENRES, DIM))
    emb = centroids[first] + rng.normal(size=(N_ITEMS + N_NEW, DIM))
    has_genre = {
        f"g{g}": np.isin(np.arange(N_ITEMS), genres.loc[genres["genre"] == f"g{g}", "item"])
        for g in range(N_GENRES)
    }
    return World(item_p, user_p, genres, emb, has_genre)


@pytest.fixture(scope="module")
def world() -> World:
    return _world()


@pytest.fixture(scope="module")
def reference(world: World) -> Reference:
    rng = np.random.default_rng(1)
    interactions = world.interactions(50_000, rng)
    # The baseline is what healthy windows of this size measure (a champion's offline numbers in
    # production); averaged over a few windows so it is not one window's noise.
    probe = Reference.build(interactions, baseline={"hit@10": 1.0, "ndcg@10": 1.0})
    measured: dict[str, list[float]] = {"hit@10": [], "ndcg@10": []}
    for _ in range(4):
        res = monitor.check(probe, Window(world.events(rng)))
        for key, name in (("hit@10", "online_hit_at_10"), ("ndcg@10", "online_ndcg_at_10")):
            measured[key].append(res.get(name).values["online"])
    baseline = {k: float(np.mean(v)) for k, v in measured.items()}
    return Reference.build(
        interactions, world.genres, world.emb[:N_ITEMS], baseline=baseline, model_version="3"
    )


def _new_items(world: World, rng: np.random.Generator, n: int = 40) -> np.ndarray:
    return world.emb[rng.choice(np.arange(N_ITEMS, N_ITEMS + N_NEW), n, replace=False)]


def test_stationary_windows_rarely_fire(world: World, reference: Reference) -> None:
    rng = np.random.default_rng(2)
    fired = []
    for _ in range(25):
        result = monitor.check(reference, Window(world.events(rng), _new_items(world, rng)))
        # Every check had enough data, so a quiet window is a real "no drift", not a skip.
        assert all(c.status in ("ok", "drift") for c in result.checks), result.to_dict()
        fired.append(result.fired)
    assert sum(bool(f) for f in fired) <= 1, fired


def test_new_item_flood_fires_in_the_first_window(world: World, reference: Reference) -> None:
    rng = np.random.default_rng(3)
    # 40% of events go to items the reference has never seen.
    p = np.concatenate([world.item_p * 0.6, np.full(N_NEW, 0.4 / N_NEW)])
    result = monitor.check(reference, Window(world.events(rng, item_p=p), world.emb[N_ITEMS:]))
    assert result.drifted
    unseen = result.get("unseen_items")
    assert unseen.fired
    assert unseen.statistic == pytest.approx(0.4, abs=0.05)


def test_genre_swap_fires(world: World, reference: Reference) -> None:
    rng = np.random.default_rng(4)
    # The most common genre loses 90% of its traffic to a rare one.
    weights = np.where(world.has_genre["g0"], 0.1, 1.0) * np.where(world.has_genre["g10"], 10.0, 1.0)
    result = monitor.check(reference, Window(world.events(rng, item_p=world.shifted(weights))))
    assert result.drifted
    genre = result.get("genre_mix")
    assert genre.fired
    assert genre.values["p_value"] < 0.01 and genre.statistic > 0.1


def test_new_items_from_one_genre_fire_the_text_check(world: World, reference: Reference) -> None:
    rng = np.random.default_rng(5)
    new = world.genres.groupby("item")["genre"].first()
    one_genre = [i for i in range(N_ITEMS, N_ITEMS + N_NEW) if new[i] == "g3"]
    result = monitor.check(reference, Window(world.events(rng), world.emb[one_genre]))
    text = result.get("new_item_text")
    assert text.fired, text.message


def test_popularity_shift_to_the_tail_fires(world: World, reference: Reference) -> None:
    rng = np.random.default_rng(6)
    # Uniform traffic over the catalogue: the long tail gains what the head loses.
    uniform = np.full(N_ITEMS, 1.0 / N_ITEMS)
    result = monitor.check(reference, Window(world.events(rng, item_p=uniform)))
    pop = result.get("item_popularity")
    assert pop.fired and pop.statistic > 0.2


def test_quality_drop_fires(world: World, reference: Reference) -> None:
    rng = np.random.default_rng(7)
    result = monitor.check(reference, Window(world.events(rng, click_p=0.1)))
    assert result.drifted
    assert "online_hit_at_10" in result.fired
    assert result.get("online_hit_at_10").statistic > 0.2


def test_insufficient_data_does_not_fire(world: World, reference: Reference) -> None:
    rng = np.random.default_rng(8)
    # A tiny window made entirely of unseen items would fire every check if it were trusted.
    p = np.concatenate([np.zeros(N_ITEMS), np.full(N_NEW, 1.0 / N_NEW)])
    result = monitor.check(
        reference, Window(world.events(rng, n=100, item_p=p, n_lists=20), world.emb[N_ITEMS : N_ITEMS + 5])
    )
    assert not result.drifted
    assert all(c.status == "insufficient_data" for c in result.checks), [c.status for c in result.checks]


def test_checks_without_inputs_are_not_applicable(world: World) -> None:
    rng = np.random.default_rng(9)
    bare = Reference.build(world.interactions(5000, rng))
    result = monitor.check(bare, Window(world.events(rng)))
    for name in ("genre_mix", "new_item_text", "online_hit_at_10", "online_ndcg_at_10"):
        assert result.get(name).status == "not_applicable"
    # No check without a baseline to hold it to: clicks per impression have none offline.
    assert "online_ctr" not in {c.name for c in result.checks}


def test_only_the_champions_lists_count(world: World, reference: Reference) -> None:
    rng = np.random.default_rng(10)
    events = world.events(rng)
    events.loc[events["type"] == "impression", "model_version"] = "4"
    result = monitor.check(reference, Window(events))
    assert result.get("online_hit_at_10").status == "insufficient_data"


def test_feedback_before_a_list_was_served_is_not_a_hit() -> None:
    events = pd.DataFrame(
        {
            "event_id": [1, 2, 3, 4],
            "type": ["click", "impression", "impression", "rating"],
            "user_id": [7, 7, 7, 7],
            "item_id": [10, 10, 11, 11],
            "value": [1.0, 1.0, 2.0, 5.0],
            "model_version": ["1"] * 4,
            "ts": [1.0, 5.0, 5.0, 9.0],
        }
    )
    lists = monitor.served_lists(events[events["type"] == "impression"])
    assert lists["items"].tolist() == [[10, 11]]
    assert monitor.list_positives(lists, events, DriftConfig()) == [{11}]
    assert monitor.list_positives(lists, events, DriftConfig(rating_positive=6.0)) == [set()]
    # Datetimes work the same way as epoch seconds.
    events["ts"] = pd.to_datetime(events["ts"], unit="s", utc=True)
    lists = monitor.served_lists(events[events["type"] == "impression"])
    assert monitor.list_positives(lists, events, DriftConfig()) == [{11}]


def test_impressions_group_by_request_and_rank_by_position() -> None:
    events = pd.DataFrame(
        {
            "event_id": ["a", "b", "c", "d", "e", "f"],
            "type": ["impression", "impression", "impression", "impression", "click", "click"],
            "user_id": [1, 1, 2, 2, 1, 2],
            "item_id": [10, 11, 20, 21, 11, 20],
            "value": [None] * 6,
            "model_version": ["1", "1", "1", "1", None, None],
            "ts": [5.0, 5.0, 6.0, 6.0, 7.0, 8.0],
            # User 2's list has no request id: grouped by (user, version, ts) instead.
            "request_id": ["r1", "r1", None, None, "r1", None],
            "position": [2, 1, 1, 2, None, None],
        }
    )
    impressions = events[events["type"] == "impression"]
    lists = monitor.served_lists(impressions)
    assert sorted(lists["items"].tolist()) == [[11, 10], [20, 21]]


def test_window_and_config_validation() -> None:
    with pytest.raises(ValueError, match="miss columns"):
        Window(pd.DataFrame({"type": ["click"]}))
    frame = pd.DataFrame({c: [0] for c in monitor.EVENT_COLUMNS}).assign(type="view")
    with pytest.raises(ValueError, match="unknown event types"):
        Window(frame)
    with pytest.raises(ValidationError):
        DriftConfig(psi_maximum=0.3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        DriftConfig(input_event_types=["view"])
    interactions = pd.DataFrame({"user": [1], "item": [2]})
    with pytest.raises(ValueError, match="rates in"):
        Reference.build(interactions, baseline={"ndcg@10": 33.0})


def test_genres_long_explodes_token_sequences() -> None:
    items = pd.DataFrame({"item": [0, 1, 2], "class": ["Animation Children's Comedy", "Drama", None]})
    long = monitor.genres_long(items)
    assert long.values.tolist() == [[0, "Animation"], [0, "Children's"], [0, "Comedy"], [1, "Drama"]]


# ---------------------------------------------------------------------------------------------------
# Report


@pytest.fixture(scope="module")
def drifted_result(world: World, reference: Reference) -> monitor.DriftResult:
    rng = np.random.default_rng(11)
    p = np.concatenate([world.item_p * 0.6, np.full(N_NEW, 0.4 / N_NEW)])
    return monitor.check(reference, Window(world.events(rng, item_p=p), world.emb[N_ITEMS:]))


def test_report_writes_one_png_per_check_and_an_html(
    drifted_result: monitor.DriftResult, tmp_path: Path
) -> None:
    files = report.render(drifted_result, tmp_path / "report")
    pngs = [f for f in files if f.suffix == ".png"]
    assert len(pngs) == len(drifted_result.checks)
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "report" / report.HTML_FILE).read_text(encoding="utf-8")
    assert "DRIFT DETECTED" in page and "unseen_items" in page
    # Self-contained: every figure is inlined.
    assert page.count("data:image/png;base64,") == len(drifted_result.checks)
    assert (tmp_path / "report" / report.JSON_FILE).exists()


def test_metric_names_are_valid_mlflow_names(drifted_result: monitor.DriftResult) -> None:
    from mlflow.utils.validation import _validate_metric_name

    values = report.metrics(drifted_result)
    assert values["drift.drifted"] == 1.0
    assert values["drift.unseen_items.fired"] == 1.0
    assert "drift.item_popularity.psi" in values and "drift.genre_mix.cramers_v" in values
    for name, value in values.items():
        assert re.fullmatch(r"[A-Za-z0-9_\-./ ]+", name) and "@" not in name, name
        _validate_metric_name(name)
        assert isinstance(value, float) and math.isfinite(value), name


def test_log_to_mlflow_logs_metrics_tags_and_artifacts(
    drifted_result: monitor.DriftResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    calls: dict[str, list[Any]] = {"metrics": [], "tags": [], "artifacts": []}
    monkeypatch.setattr(mlflow, "log_metrics", lambda m, step=None: calls["metrics"].append((m, step)))
    monkeypatch.setattr(mlflow, "set_tag", lambda k, v: calls["tags"].append((k, v)))
    monkeypatch.setattr(mlflow, "log_artifact", lambda p, artifact_path=None: calls["artifacts"].append(p))
    report.log_to_mlflow(drifted_result, tmp_path, step=3)
    ((logged, step),) = calls["metrics"]
    assert step == 3 and logged == report.metrics(drifted_result)
    assert ("drift.fired", ",".join(drifted_result.fired)) in calls["tags"]
    assert len(calls["artifacts"]) == len(drifted_result.checks) + 2
