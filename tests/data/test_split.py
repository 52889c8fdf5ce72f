"""Split protocols checked against counts and orders worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.core.config import SplitConfig
from components.data.ingest import load_dataset
from components.data.split import (
    PARTS,
    SplitError,
    assign_parts,
    load_split,
    save_split,
    split_interactions,
    split_stats,
    to_matrix,
)

TINY = Path(__file__).parents[1] / "fixtures" / "tiny"


def _frame(rows: list[tuple[int, int, float]], part: list[str] | None = None) -> pd.DataFrame:
    """Interactions (user, item, timestamp); rating encodes the row number so rows can be told apart."""
    frame = pd.DataFrame(
        {
            "user": np.array([r[0] for r in rows], dtype=np.int32),
            "item": np.array([r[1] for r in rows], dtype=np.int32),
            "rating": np.arange(len(rows), dtype=np.float64),
            "timestamp": np.array([r[2] for r in rows], dtype=np.float64),
        }
    )
    if part is not None:
        frame["part"] = part
    return frame


def _user_rows(user: int, n: int, start: float = 0.0) -> list[tuple[int, int, float]]:
    return [(user, k, start + k) for k in range(n)]


def _check_partition(inter: pd.DataFrame, parts: pd.Series) -> None:
    """Every interaction is labelled exactly once with a known part."""
    assert parts.index.equals(inter.index)
    assert set(parts) <= set(PARTS)
    assert parts.notna().all()


def _labels_by_rating(inter: pd.DataFrame, cfg: SplitConfig) -> list[str]:
    parts = assign_parts(inter, cfg)
    _check_partition(inter, parts)
    return parts.sort_index().tolist()


# --------------------------------------------------------------------------------------------------
# user_temporal


@pytest.mark.parametrize("n", list(range(1, 13)) + [20, 33])
def test_user_temporal_counts(n: int) -> None:
    inter = _frame(_user_rows(0, n))
    labels = _labels_by_rating(inter, SplitConfig(protocol="user_temporal"))
    n_train, n_valid = math.floor(n * 0.8), math.floor(n * 0.1)
    assert labels == ["train"] * n_train + ["valid"] * n_valid + ["test"] * (n - n_train - n_valid)


def test_user_temporal_n7_and_n10() -> None:
    # two users, rows interleaved and shuffled; user 0 has 7 interactions (5/0/2), user 1 has 10 (8/1/1)
    rows = _user_rows(0, 7, start=100) + _user_rows(1, 10, start=50)
    order = np.random.default_rng(0).permutation(len(rows))
    inter = _frame([rows[k] for k in order])
    split = split_interactions(inter, SplitConfig(protocol="user_temporal"))
    counts = {name: split.part(name).groupby("user").size().to_dict() for name in PARTS}
    assert counts == {"train": {0: 5, 1: 8}, "valid": {1: 1}, "test": {0: 2, 1: 1}}
    assert sorted(split.train[split.train.user == 0].item) == [0, 1, 2, 3, 4]
    assert sorted(split.test[split.test.user == 0].item) == [5, 6]
    assert split.valid.item.tolist() == [8]
    assert split.test[split.test.user == 1].item.tolist() == [9]


def test_user_temporal_ties_broken_by_item_index() -> None:
    # user 0: all five at t=10 except item 1 (t=5); within the tie the item index decides
    # order: item 1 (t=5), then items 2, 4, 6, 9 (t=10) -> with ratios 0.6/0.2: train 1, 2, 4; valid 6; test 9
    inter = _frame([(0, 9, 10.0), (0, 4, 10.0), (0, 1, 5.0), (0, 6, 10.0), (0, 2, 10.0)])
    cfg = SplitConfig(protocol="user_temporal", train_ratio=0.6, valid_ratio=0.2)
    split = split_interactions(inter, cfg)
    assert sorted(split.train.item) == [1, 2, 4]
    assert split.valid.item.tolist() == [6]
    assert split.test.item.tolist() == [9]
    # the default 0.8/0.1 ratios on the same rows: floor(4.0)=4 train, floor(0.5)=0 valid, 1 test
    split = split_interactions(inter, SplitConfig(protocol="user_temporal"))
    assert sorted(split.train.item) == [1, 2, 4, 6]
    assert split.valid.empty
    assert split.test.item.tolist() == [9]


def test_user_temporal_labels_align_with_a_non_default_index() -> None:
    inter = _frame(_user_rows(0, 10))
    inter.index = np.arange(100, 90, -1)  # descending labels: alignment must follow labels, not positions
    parts = assign_parts(inter, SplitConfig(protocol="user_temporal"))
    assert parts.index.equals(inter.index)
    by_item = dict(zip(inter.item, parts.loc[inter.index], strict=True))
    assert [by_item[k] for k in range(10)] == ["train"] * 8 + ["valid", "test"]


def test_user_temporal_exact_ratio_products() -> None:
    # 0.7 * 10 = 6.999999999999999 must still give 7 train interactions
    inter = _frame(_user_rows(0, 10))
    labels = _labels_by_rating(inter, SplitConfig(protocol="user_temporal", train_ratio=0.7, valid_ratio=0.2))
    assert labels.count("train") == 7 and labels.count("valid") == 2 and labels.count("test") == 1


# --------------------------------------------------------------------------------------------------
# leave_last_out


def test_leave_last_out() -> None:
    rows = _user_rows(0, 1) + _user_rows(1, 2, start=10) + _user_rows(2, 3, start=20)
    rows += _user_rows(3, 6, start=30)
    inter = _frame(rows[::-1])  # file order reversed: only timestamps decide
    split = split_interactions(inter, SplitConfig(protocol="leave_last_out"))
    per_user = {name: split.part(name).groupby("user").item.apply(sorted).to_dict() for name in PARTS}
    assert per_user["train"] == {0: [0], 1: [0], 2: [0], 3: [0, 1, 2, 3]}
    assert per_user["valid"] == {2: [1], 3: [4]}
    assert per_user["test"] == {1: [1], 2: [2], 3: [5]}


def test_leave_last_out_ties() -> None:
    inter = _frame([(0, 7, 1.0), (0, 3, 1.0), (0, 5, 1.0)])
    split = split_interactions(inter, SplitConfig(protocol="leave_last_out"))
    assert (split.train.item.tolist(), split.valid.item.tolist(), split.test.item.tolist()) == ([3], [5], [7])


# --------------------------------------------------------------------------------------------------
# global_temporal


def test_global_temporal_cutoffs() -> None:
    inter = _frame(
        [(0, 0, 1.0), (0, 1, 5.0), (1, 0, 9.9), (1, 2, 10.0), (2, 1, 14.0), (2, 2, 20.0), (0, 3, 25.0)]
    )
    cfg = SplitConfig(protocol="global_temporal", valid_start=10, test_start=20)
    # boundaries are inclusive on the later part: t == valid_start is valid, t == test_start is test
    assert _labels_by_rating(inter, cfg) == ["train", "train", "train", "valid", "valid", "test", "test"]
    cfg = SplitConfig(protocol="global_temporal", valid_start=20, test_start=20)  # empty valid
    assert _labels_by_rating(inter, cfg) == ["train"] * 5 + ["test", "test"]


def test_global_temporal_ratios() -> None:
    # 10 interactions over 3 users, out of order; ties at t=3 broken by user then item
    inter = _frame(
        [
            (2, 0, 9.0),
            (0, 1, 3.0),
            (1, 5, 3.0),
            (0, 0, 3.0),
            (1, 1, 1.0),
            (2, 2, 7.0),
            (0, 4, 8.0),
            (1, 0, 6.0),
            (2, 3, 2.0),
            (0, 2, 5.0),
        ]
    )
    # global order (t, user, item): r4 (1), r8 (2), r3 (3,u0,i0), r1 (3,u0,i1), r2 (3,u1), r9 (5),
    #   r7 (6), r5 (7), r6 (8), r0 (9) -> 8 train, 1 valid (r6), 1 test (r0)
    labels = _labels_by_rating(inter, SplitConfig(protocol="global_temporal"))
    assert labels == ["test"] + ["train"] * 5 + ["valid"] + ["train"] * 3
    # 0.5/0.3: train = r4 r8 r3 r1 r2, valid = r9 r7 r5, test = r6 r0
    cfg = SplitConfig(protocol="global_temporal", train_ratio=0.5, valid_ratio=0.3)
    labels = _labels_by_rating(inter, cfg)
    assert labels == ["test", "train", "train", "train", "train", "valid", "test", "valid", "train", "valid"]


# --------------------------------------------------------------------------------------------------
# given


def test_given_uses_part_column_exactly() -> None:
    parts = ["test", "train", "valid", "train", "train", "test"]
    rows = [(0, 0, 9.0), (0, 1, 1.0), (1, 0, 2.0), (1, 1, 3.0), (2, 0, np.nan), (2, 1, 0.0)]
    inter = _frame(rows, part=parts)
    cfg = SplitConfig(protocol="given")
    assert assign_parts(inter, cfg).tolist() == parts  # timestamps (even missing ones) are ignored
    split = split_interactions(inter, cfg)
    assert split.train.rating.tolist() == [1.0, 3.0, 4.0]
    assert split.valid.rating.tolist() == [2.0]
    assert split.test.rating.tolist() == [0.0, 5.0]
    assert list(split.train.columns) == ["user", "item", "rating", "timestamp"]


def test_given_rejects_unknown_labels() -> None:
    inter = _frame([(0, 0, 1.0), (0, 1, 2.0)], part=["train", "holdout"])
    with pytest.raises(SplitError, match="unknown part labels"):
        split_interactions(inter, SplitConfig(protocol="given"))


def test_given_on_ingested_presplit_data(tmp_path: Path) -> None:
    header = "user_id:token\titem_id:token\n"
    src = tmp_path / "p"
    src.mkdir()
    for name, body in {"train": "u1\ti1\nu2\ti2\n", "valid": "u1\ti2\n", "test": "u2\ti1\n"}.items():
        (src / f"p.{name}.inter").write_text(header + body)
    inter = load_dataset(src, "p").interactions
    split = split_interactions(inter, SplitConfig(protocol="given"))
    assert [len(split.part(n)) for n in PARTS] == [2, 1, 1]
    with pytest.raises(SplitError, match="pre-split"):
        split_interactions(inter, SplitConfig(protocol="leave_last_out"))


# --------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("protocol", ["user_temporal", "global_temporal", "leave_last_out"])
def test_time_protocols_need_timestamps(protocol: str) -> None:
    inter = _frame([(0, 0, 1.0), (0, 1, np.nan)])
    with pytest.raises(SplitError, match=f"split.protocol={protocol} needs a timestamp"):
        assign_parts(inter, SplitConfig(protocol=protocol))


def test_given_needs_part() -> None:
    with pytest.raises(SplitError, match="protocol=given needs pre-split"):
        assign_parts(_frame([(0, 0, 1.0)]), SplitConfig(protocol="given"))


@pytest.mark.parametrize("protocol", ["user_temporal", "global_temporal", "leave_last_out"])
def test_presplit_needs_given(protocol: str) -> None:
    inter = _frame([(0, 0, 1.0), (0, 1, 2.0)], part=["train", "test"])
    with pytest.raises(SplitError, match=f"pre-split; use split.protocol=given instead of {protocol}"):
        assign_parts(inter, SplitConfig(protocol=protocol))


def test_empty_and_trainless() -> None:
    with pytest.raises(SplitError, match="no interactions"):
        assign_parts(_frame([]), SplitConfig())
    inter = _frame([(0, 0, 30.0), (0, 1, 40.0)])
    with pytest.raises(SplitError, match="training part is empty"):
        split_interactions(inter, SplitConfig(protocol="global_temporal", valid_start=10, test_start=20))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"train_ratio": 0.9, "valid_ratio": 0.1},
        {"train_ratio": 0.0},
        {"valid_start": 5.0},
        {"valid_start": 5.0, "test_start": 4.0},
        {"protocol": "random"},
    ],
)
def test_config_rejects(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SplitConfig(**kwargs)


# --------------------------------------------------------------------------------------------------
# whole-dataset properties on the tiny fixture


@pytest.fixture(scope="module")
def tiny_inter() -> pd.DataFrame:
    return load_dataset(TINY, "tiny").interactions


CONFIGS = [
    SplitConfig(protocol="user_temporal"),
    SplitConfig(protocol="user_temporal", train_ratio=0.6, valid_ratio=0.2),
    SplitConfig(protocol="leave_last_out"),
    SplitConfig(protocol="global_temporal"),
    SplitConfig(protocol="global_temporal", valid_start=1030, test_start=1040),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.protocol}-{c.train_ratio}-{c.valid_start}")
def test_partition_and_determinism(tiny_inter: pd.DataFrame, cfg: SplitConfig) -> None:
    first = split_interactions(tiny_inter, cfg)
    second = split_interactions(tiny_inter.sample(frac=1.0, random_state=1), cfg)  # row order must not matter
    again = split_interactions(tiny_inter, cfg)
    key = ["user", "item"]
    for name in PARTS:
        pd.testing.assert_frame_equal(first.part(name), again.part(name))
        a = first.part(name).sort_values(key).reset_index(drop=True)
        b = second.part(name).sort_values(key).reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b)
    together = pd.concat([first.part(n) for n in PARTS], ignore_index=True)
    assert len(together) == len(tiny_inter) == 30
    assert not together.duplicated(key).any()
    pd.testing.assert_frame_equal(
        together.sort_values(key).reset_index(drop=True), tiny_inter.sort_values(key).reset_index(drop=True)
    )


def test_tiny_user_temporal_counts(tiny_inter: pd.DataFrame) -> None:
    # each tiny user has 5 interactions: floor(4.0)=4 train, floor(0.5)=0 valid, 1 test -- the latest one
    split = split_interactions(tiny_inter, SplitConfig())
    assert (len(split.train), len(split.valid), len(split.test)) == (24, 0, 6)
    assert split.test.sort_values("user").timestamp.tolist() == [1041.0 + u for u in range(6)]
    stats = split_stats(split)
    assert stats["train"] == {"interactions": 24, "users": 6, "items": 8}
    assert stats["test"]["users"] == 6


def test_tiny_global_cutoffs(tiny_inter: pd.DataFrame) -> None:
    cfg = SplitConfig(protocol="global_temporal", valid_start=1030, test_start=1040)
    split = split_interactions(tiny_inter, cfg)
    # timestamps 10x1..10x6 for x = 0..4: x in {0,1,2} train, x = 3 valid, x = 4 test
    assert (len(split.train), len(split.valid), len(split.test)) == (18, 6, 6)


def test_save_load_and_matrix(tiny_inter: pd.DataFrame, tmp_path: Path) -> None:
    split = split_interactions(tiny_inter, SplitConfig(protocol="leave_last_out"))
    save_split(split, tmp_path / "split", {"protocol": "leave_last_out"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]
    loaded = load_split(tmp_path / "split")
    for name in PARTS:
        pd.testing.assert_frame_equal(loaded.part(name), split.part(name))
    matrix = to_matrix(split.train, 6, 8)
    assert matrix.shape == (6, 8) and matrix.nnz == len(split.train) == 18
    assert set(matrix.data.tolist()) == {1.0}
