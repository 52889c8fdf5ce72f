"""Split stage: assign every interaction to train, valid or test under one of four protocols."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from components.core.config import SplitConfig
from components.core.storage import atomic_dir, write_json
from components.data.kg import binary_matrix

PARTS = ("train", "valid", "test")
# Guards floor(n * ratio) against products like 0.7 * 10 = 6.999999999999999.
_EPS = 1e-9


class SplitError(ValueError):
    """A protocol that cannot be applied to the data."""


@dataclass
class Split:
    """Interactions of each part (columns user, item, rating, timestamp)."""

    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame

    def part(self, name: str) -> pd.DataFrame:
        """Return one part by name."""
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]


def _need_time(inter: pd.DataFrame, protocol: str) -> None:
    if inter.timestamp.isna().any():
        raise SplitError(f"split.protocol={protocol} needs a timestamp:float field in the .inter file")


def _per_user_order(inter: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    ordered = inter.sort_values(["user", "timestamp", "item"], kind="stable")
    rank = ordered.groupby("user").cumcount().to_numpy()
    size = ordered.groupby("user")["item"].transform("size").to_numpy()
    return ordered, rank, size


def assign_parts(inter: pd.DataFrame, cfg: SplitConfig) -> pd.Series:
    """Return the part label of each interaction (index aligned with ``inter``)."""
    protocol = cfg.protocol
    if inter.empty:
        raise SplitError("no interactions to split")
    if protocol == "given":
        if "part" not in inter:
            raise SplitError("split.protocol=given needs pre-split <name>.train/.valid/.test.inter files")
        return inter["part"].astype(str)
    if "part" in inter:
        raise SplitError(f"the dataset is pre-split; use split.protocol=given instead of {protocol}")
    _need_time(inter, protocol)
    labels = np.empty(len(inter), dtype=object)
    if protocol == "user_temporal":
        ordered, rank, size = _per_user_order(inter)
        n_train = np.floor(size * cfg.train_ratio + _EPS)
        n_valid = np.floor(size * cfg.valid_ratio + _EPS)
        part = np.where(rank < n_train, "train", np.where(rank < n_train + n_valid, "valid", "test"))
        labels[inter.index.get_indexer(ordered.index)] = part
    elif protocol == "leave_last_out":
        ordered, rank, size = _per_user_order(inter)
        from_end = size - rank  # 1 for the last interaction
        part = np.where(
            (from_end == 1) & (size >= 2), "test", np.where((from_end == 2) & (size >= 3), "valid", "train")
        )
        labels[inter.index.get_indexer(ordered.index)] = part
    elif protocol == "global_temporal":
        if cfg.valid_start is not None and cfg.test_start is not None:
            t = inter.timestamp.to_numpy()
            labels[:] = np.where(
                t >= cfg.test_start, "test", np.where(t >= cfg.valid_start, "valid", "train")
            )
        else:
            ordered = inter.sort_values(["timestamp", "user", "item"], kind="stable")
            n = len(ordered)
            cut_valid = int(np.floor(n * cfg.train_ratio + _EPS))
            cut_test = cut_valid + int(np.floor(n * cfg.valid_ratio + _EPS))
            position = np.arange(n)
            part = np.where(position < cut_valid, "train", np.where(position < cut_test, "valid", "test"))
            labels[inter.index.get_indexer(ordered.index)] = part
    else:  # pragma: no cover - the config type rules this out
        raise SplitError(f"unknown split.protocol {protocol!r}")
    return pd.Series(labels, index=inter.index, name="part")


def split_interactions(inter: pd.DataFrame, cfg: SplitConfig) -> Split:
    """Split interactions under the configured protocol."""
    parts = assign_parts(inter, cfg)
    bad = set(parts.unique()) - set(PARTS)
    if bad:
        raise SplitError(f"unknown part labels {sorted(bad)}")
    columns = ["user", "item", "rating", "timestamp"]
    frames = {name: inter.loc[parts == name, columns].reset_index(drop=True) for name in PARTS}
    if frames["train"].empty:
        raise SplitError("the training part is empty")
    return Split(**frames)


def split_stats(split: Split) -> dict[str, Any]:
    """Counts per part, for the report."""
    stats: dict[str, Any] = {}
    for name in PARTS:
        frame = split.part(name)
        stats[name] = {
            "interactions": len(frame),
            "users": int(frame.user.nunique()),
            "items": int(frame.item.nunique()),
        }
    train_items = set(split.train.item)
    stats["test_items_unseen_in_train"] = int((~split.test.item.isin(train_items)).sum())
    return stats


def save_split(split: Split, dest: Path, meta: dict[str, Any]) -> None:
    """Write the three parts and their stats atomically."""
    with atomic_dir(dest) as tmp:
        for name in PARTS:
            split.part(name).to_parquet(tmp / f"{name}.parquet", index=False)
        write_json(tmp / "stats.json", {**split_stats(split), **meta})


def load_split(src: Path) -> Split:
    """Read a split written by :func:`save_split`."""
    return Split(*(pd.read_parquet(src / f"{name}.parquet") for name in PARTS))


def to_matrix(frame: pd.DataFrame, n_users: int, n_items: int) -> sp.csr_matrix:
    """Binary user×item CSR matrix of a part (every interaction counts once, ratings ignored)."""
    return binary_matrix(frame.user.to_numpy(), frame.item.to_numpy(), (n_users, n_items))
