"""Assemble the fusion model's inputs from the pipeline's stage outputs (pure functions)."""

from __future__ import annotations

from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
import scipy.sparse as sp

from components.data.kg import INTERACTED, HeteroGraph
from components.metapaths.schema import Metapath, parse
from components.model.features import DENSE_BUDGET_BYTES, EASE_MAX_ITEMS, FeatureBank, build_bank
from components.model.loop import FusionInputs, temporal_holdout


def model_paths(
    report: dict[str, Any], schema: nx.MultiDiGraph, content_paths: int, mined: bool = True
) -> list[Metapath]:
    """The mined selection (length ≥ 2) plus the best ``content_paths`` item–entity–item paths.

    Mining selects on warm validation users, where collaborative paths win; content paths
    (``user–item–X–item`` through KG entities or item attributes) are what reaches a cold item, so the
    best of them by individual validation NDCG join as channels whatever the selection did.
    ``mined=False`` leaves the selection out and keeps the same content paths (the ablation's
    "without mined metapaths").
    """
    selected = [parse(s["id"], schema) for s in report["selected"]]
    selected = [p for p in selected if p.length >= 2]
    seen = {p.id for p in selected}
    chosen = selected if mined else []
    content = [
        c
        for c in report["candidates"]
        if c["length"] == 3
        and c["id"] not in seen
        and INTERACTED not in c["id"].split("|", 1)[1].replace("~", "").split("|")
        and c["pair_coverage"] > 0
    ]
    content.sort(key=lambda c: (-c["ndcg@10"], c["id"]))
    chosen += [parse(c["id"], schema) for c in content[:content_paths]]
    return chosen


def assemble(
    graph: HeteroGraph,
    train: pd.DataFrame,
    train_matrix: sp.csr_matrix,
    valid_matrix: sp.csr_matrix,
    item_text: np.ndarray,
    profile: np.ndarray,
    paths: list[Metapath],
    weighting: str,
    damping: float,
    ease_l2: float | None,
    holdout: float,
    age_buckets: list[int] | None = None,
    dense_budget_bytes: int = DENSE_BUDGET_BYTES,
    popularity: bool = True,
    ease_max_items: int = EASE_MAX_ITEMS,
) -> FusionInputs:
    """Build :class:`FusionInputs`: the temporal holdout cut and a feature bank for each side."""
    n_users, n_items = train_matrix.shape
    history, targets = temporal_holdout(train, n_users, n_items, holdout)

    def bank(interactions: sp.csr_matrix) -> FeatureBank:
        return build_bank(
            graph,
            interactions,
            paths,
            weighting,
            damping,
            ease_l2,
            age_buckets,
            dense_budget_bytes,
            popularity=popularity,
            ease_max_items=ease_max_items,
        )

    return FusionInputs(
        item_text=np.asarray(item_text, dtype=np.float32),
        profile=np.asarray(profile, dtype=np.float32),
        history=history,
        targets=targets,
        fit_bank=bank(history),
        eval_history=train_matrix,
        eval_bank=bank(train_matrix),
        valid=valid_matrix,
        warm=np.asarray(train_matrix.sum(axis=0)).ravel() > 0,
    )
