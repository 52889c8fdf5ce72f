"""Fit the fusion model from a workspace's stage outputs (used by the train stage and the ablations)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from components.core.config import MetarecConfig
from components.core.parallel import Blocks
from components.data import kg, split
from components.data.kg import HeteroGraph
from components.model.data import assemble, model_paths
from components.model.features import FeatureBank
from components.model.loop import EpochLog, TrainConfig, train
from components.model.recommender import FIT_KEYS, MetarecRecommender
from components.text.features import load_embeddings


@dataclass
class FitData:
    """Stage outputs the fusion model is fitted from."""

    graph: HeteroGraph
    train: pd.DataFrame  # training interactions with timestamps (user, item, timestamp)
    train_matrix: sp.csr_matrix
    valid_matrix: sp.csr_matrix
    report: dict[str, Any]  # the mining report (selected metapaths and per-candidate scores)
    item_text: np.ndarray
    profile: np.ndarray
    # Embeds texts with the encoder that made ``item_text`` (language gates embed the channels' phrases).
    encode: Callable[[list[str]], np.ndarray] | None = None

    def without_items(self, items: np.ndarray) -> FitData:
        """The same data with every train and valid interaction on ``items`` removed (cold items)."""
        cold = np.zeros(self.train_matrix.shape[1], dtype=bool)
        cold[np.asarray(items, dtype=np.int64)] = True
        keep = sp.diags((~cold).astype(np.float32))
        return replace(
            self,
            train=drop_items(self.train, items, self.train_matrix.shape[1]),
            train_matrix=sp.csr_matrix(self.train_matrix @ keep),
            valid_matrix=sp.csr_matrix(self.valid_matrix @ keep),
        )


def drop_items(train: pd.DataFrame, items: np.ndarray, n_items: int) -> pd.DataFrame:
    """``train``'s interactions (an ``item`` index column) without those on ``items``, renumbered rows."""
    cold = np.zeros(n_items, dtype=bool)
    cold[np.asarray(items, dtype=np.int64)] = True
    return train[~cold[train.item.to_numpy()]].reset_index(drop=True)


def _aligned(src: Path, expected: list[str], what: str) -> np.ndarray:
    ids, vectors, _ = load_embeddings(src)
    if ids != expected:
        raise ValueError(f"{src}: {what} embeddings are not aligned with the processed {what} table")
    return vectors


def load_fit_data(
    processed: Path, graph_dir: Path, split_dir: Path, metapaths: Path, text: Path, frozen: bool = False
) -> FitData:
    """Read graph, split, mining report and text embeddings (``frozen``: the un-fine-tuned ones)."""
    users = pd.read_parquet(processed / "users.parquet")
    items = pd.read_parquet(processed / "items.parquet")
    parts = split.load_split(split_dir)
    n_u, n_i = len(users), len(items)
    base = text / "frozen" if frozen else text
    if frozen and not base.exists():
        raise FileNotFoundError(f"{base} missing: frozen embeddings exist only when fine-tuning is enabled")
    profiles = base / "profiles"
    if not profiles.exists():
        raise FileNotFoundError(f"{profiles} missing: rerun the encode stage (metarec stage encode)")
    return FitData(
        graph=kg.load_graph(graph_dir),
        train=parts.train,
        train_matrix=split.to_matrix(parts.train, n_u, n_i),
        valid_matrix=split.to_matrix(parts.valid, n_u, n_i),
        report=json.loads((metapaths / "metapaths.json").read_text(encoding="utf-8")),
        item_text=_aligned(base / "items", list(items.item_id.astype(str)), "item"),
        profile=_aligned(profiles, list(users.user_id.astype(str)), "user"),
    )


def item_attributes(graph: HeteroGraph) -> np.ndarray | None:
    """The items' metadata one-hots (``kg.item_fields``: genre, release year), float32, or None if none.

    Only metadata relations (``item.<type>`` to a non-item type): KG entities such as actors are many,
    mostly single-film, and a bias per entity would learn the items' own popularity back.
    """
    parts = [
        rel.matrix.toarray()
        for key, rel in sorted(graph.relations.items())
        if key.startswith("item.") and rel.src == "item" and rel.dst != "item"
    ]
    return np.hstack(parts).astype(np.float32) if parts else None


def channel_sentences(bank: FeatureBank, graph: HeteroGraph) -> list[str]:
    """What each channel recommends, in words: the language gates' side of the match."""
    from components.metapaths.explain import describe
    from components.metapaths.schema import parse

    phrases = {
        "popularity": "items that many people liked",
        "ease": "items often liked together with items you liked",
    }
    out = []
    for channel in bank.channels:
        if channel.kind == "metapath" and channel.metapath_id:
            out.append(describe(parse(channel.metapath_id, graph.schema)))
        else:
            out.append(phrases.get(channel.kind, channel.name))
    return out


def fit(
    data: FitData,
    mcfg: MetarecConfig,
    weighting: str,
    damping: float,
    seed: int,
    on_epoch: EpochLog | None = None,
    *,
    eval_metric: str,
    config: dict[str, Any] | None = None,
    age_buckets: list[int] | None = None,
    blocks: Blocks | None = None,
    epochs: int | None = None,
) -> tuple[MetarecRecommender, dict[str, Any]]:
    """Train the fusion model on ``data``; return it (scoring with the whole training part) and a summary.

    ``blocks``: where each epoch's validation ranks its user blocks (in order by default); ``epochs``:
    train exactly that many without validation (see :func:`~components.model.loop.train`).
    """
    paths = model_paths(data.report, data.graph.schema, mcfg.content_paths, mcfg.use_mined_paths)
    inputs = assemble(
        data.graph,
        data.train,
        data.train_matrix,
        data.valid_matrix,
        data.item_text,
        data.profile,
        paths,
        weighting,
        damping,
        mcfg.ease_l2,
        mcfg.holdout,
        age_buckets,
        int(mcfg.dense_suffix_mb * (1 << 20)),
        popularity=mcfg.use_popularity,
        ease_max_items=mcfg.ease_max_items,
    )
    if mcfg.attribute_bias:
        inputs.item_attributes = item_attributes(data.graph)
    if mcfg.use_paths and mcfg.gates != "learned" and inputs.eval_bank.channels:
        if data.encode is None:
            raise ValueError(
                f"model.metarec.gates={mcfg.gates!r} needs the text encoder to embed the channels"
            )
        sentences = channel_sentences(inputs.eval_bank, data.graph)
        inputs.channel_text = np.asarray(data.encode(sentences), dtype=np.float32)
    net, summary = train(inputs, TrainConfig.from_section(mcfg, seed, eval_metric), on_epoch, blocks, epochs)
    summary["channels"] = inputs.eval_bank.names
    fitted = {k: summary[k] for k in FIT_KEYS}
    model = MetarecRecommender(net, inputs.eval_bank, data.profile, data.train_matrix, config, fitted)
    return model, summary
