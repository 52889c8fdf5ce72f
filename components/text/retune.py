"""Text embeddings from an encoder fine-tuned on a reduced training part (the cold-item protocol).

The encode stage fine-tunes on next-item pairs from the whole training part. The cold-item protocol
removes a seeded share of items from training and asks the refitted model to rank them; reusing the
stage's embeddings there would let the encoder carry what it learnt from the cold items' own
interactions (they were pair targets, and their titles sat in users' "recently watched" text). So the
protocol fine-tunes again on pairs built from the reduced part, with the stage's settings and seed.

Adapters are cached under ``<cache>/<key>/adapter`` with ``key`` a hash of the base model, the
fine-tuning config, the seed and the pairs' fingerprint: every variant of an ablation that shares a
cold draw reuses one fine-tune, and a changed input never reuses a stale one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from components.core.config import TextConfig
from components.core.storage import atomic_dir
from components.data.kg import HeteroGraph
from components.text import features, pairs
from components.text.encoder import EmbeddingCache, Encoder, ModelRef
from components.text.finetune import ADAPTER, FinetuneConfig, finetune
from components.text.verbalise import item_texts

#: Part of every cache key: bump it when the fine-tuning objective changes, so old adapters are not reused.
KEY_VERSION = 1


@dataclass(frozen=True)
class Retuned:
    """Item and profile embeddings of an encoder fine-tuned on a given training part."""

    item_vectors: np.ndarray
    profile_vectors: np.ndarray
    adapter_dir: Path
    n_pairs: int
    cached: bool  # the adapter came from the cache (no fine-tuning ran)


def training_pairs(
    train: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame, item_texts: list[str], text: TextConfig
) -> pairs.PairSet:
    """The fine-tuning pairs of ``train`` with the stage's settings (one home for both callers)."""
    return pairs.next_item_pairs(
        train,
        users,
        items,
        item_texts,
        text.n_recent,
        text.user_template,
        max_per_user=text.finetune.max_pairs_per_user,
    )


def adapter_key(ref: ModelRef, cfg: FinetuneConfig, pair_set: pairs.PairSet) -> str:
    """What makes two fine-tunes the same: base model, config (checkpointing aside) and pairs."""
    config = {k: v for k, v in cfg.to_dict().items() if k != "checkpoint_every"}
    blob = json.dumps(
        {"version": KEY_VERSION, "base": ref.fingerprint, "config": config, "pairs": pair_set.fingerprint()},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def retuned_embeddings(
    ref: ModelRef,
    train: pd.DataFrame,
    users: pd.DataFrame,
    items: pd.DataFrame,
    graph: HeteroGraph,
    text: TextConfig,
    seed: int,
    adapters: Path,
    cache: EmbeddingCache | None = None,
) -> Retuned:
    """Fine-tune on ``train``'s pairs (or reuse the cached adapter) and embed every item and profile.

    Args:
        ref: Base model.
        train: The training interactions the encoder may learn from (``user``, ``item``, ``timestamp``).
        users: Processed users table (all users: profiles carry no interactions).
        items: Processed items table (all items: cold ones are embedded from their text alone).
        graph: The typed graph, for the items' KG facts.
        text: The ``text`` config section (templates, fine-tuning settings).
        seed: Fine-tuning seed (the pipeline's ``seed``, as in the encode stage).
        adapters: Cache folder of adapters.
        cache: Embedding cache (entries are keyed by the adapter's fingerprint).
    """
    texts = item_texts(
        items,
        graph,
        text.item_template,
        text.max_facts,
        max_titles=text.max_titles,
        max_shared=text.max_shared,
    )
    pair_set = training_pairs(train, users, items, texts, text)
    # No resumable checkpoints: an interrupted retune simply runs again, and they would stay in the cache.
    cfg = replace(FinetuneConfig.from_section(text.finetune, seed), checkpoint_every=0)
    home = Path(adapters) / adapter_key(ref, cfg, pair_set)
    cached = (home / ADAPTER).is_dir()
    if not cached:
        with atomic_dir(home) as tmp:
            finetune(ref, pair_set, cfg, tmp, threads=text.threads)
    encoder = Encoder(ref, text.max_length, text.batch_size, text.threads, adapter_dir=home / ADAPTER)
    item_vectors = features.encode_texts(encoder, texts, cache)
    # Profiles without watched titles, as the encode stage saves them.
    _, profile_vectors = features.encode_users(
        encoder, users, train.iloc[:0], items, text.n_recent, text.user_template, cache
    )
    return Retuned(item_vectors, profile_vectors, home / ADAPTER, len(pair_set), cached)
