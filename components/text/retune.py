"""Text embeddings from an encoder fine-tuned on a reduced training part (the cold-item protocol).

The encode stage fine-tunes on next-item pairs from the whole training part. The cold-item protocol
removes a seeded share of items from training and asks the refitted model to rank them; reusing the
stage's embeddings there would let the encoder carry what it learnt from the cold items' own
interactions (they were pair targets, and their titles sat in users' "recently watched" text). So the
protocol fine-tunes again on pairs built from the reduced part, with the stage's settings and seed.

Adapters are cached under ``<cache>/<key>/adapter`` with ``key`` a hash of the base model, the
fine-tuning config, the seed and the pairs' fingerprint: every variant of an ablation that shares a
cold draw reuses one fine-tune, and a changed input never reuses a stale one.

The pipeline's ``retune`` stage runs this once per cold draw and saves the result (:func:`save`) under
``data/retune``; the evaluate stage takes it from there when its :func:`request_key` matches (fine-tuning
and re-encoding 20k items are minutes of their own at scale, not evaluation).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from components.core.config import TextConfig
from components.core.storage import atomic_dir, read_json, write_json
from components.data.kg import HeteroGraph
from components.text import features, pairs
from components.text.encoder import EmbeddingCache, Encoder, ModelRef
from components.text.finetune import ADAPTER, FinetuneConfig, finetune
from components.text.verbalise import item_texts

#: Part of every cache key: bump it when the fine-tuning objective changes, so old adapters are not reused.
KEY_VERSION = 1
RETUNE_JSON = "retune.json"


@dataclass(frozen=True)
class Retuned:
    """Item and profile embeddings of an encoder fine-tuned on a given training part."""

    item_vectors: np.ndarray
    profile_vectors: np.ndarray
    adapter_dir: Path
    n_pairs: int
    source: str = "fine-tuned"  # or "adapter cache", or "retune stage" (data/retune, nothing recomputed)
    key: str = ""  # the request it answers (:func:`request_key`), when the caller computed it

    @property
    def cached(self) -> bool:
        """The adapter came from a cache or the retune stage: no fine-tuning ran."""
        return self.source != "fine-tuned"


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
    encoder = Encoder.configured(text, ref, adapter_dir=home / ADAPTER)
    item_vectors = features.encode_texts(encoder, texts, cache)
    # Profiles without watched titles, as the encode stage saves them.
    _, profile_vectors = features.encode_users(
        encoder, users, train.iloc[:0], items, text.n_recent, text.user_template, cache
    )
    source = "adapter cache" if cached else "fine-tuned"
    return Retuned(item_vectors, profile_vectors, home / ADAPTER, len(pair_set), source)


def request_key(ref: ModelRef, text: TextConfig, seed: int, train: pd.DataFrame) -> str:
    """What a retune's result depends on, cheap to compute (no pairs): model, text config, seed, data."""
    rows = pd.util.hash_pandas_object(train, index=False).to_numpy()
    blob = json.dumps(
        {
            "version": KEY_VERSION,
            "base": ref.fingerprint,
            "text": text.model_dump(mode="json"),
            "seed": int(seed),
            "train": hashlib.sha256(rows.tobytes()).hexdigest(),
            "columns": list(map(str, train.columns)),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def save(dest: Path, retuned: Retuned, item_ids: list[str], user_ids: list[str]) -> None:
    """Write a retune's adapter, item and profile embeddings and ``retune.json`` (its key) to ``dest``."""
    if not retuned.key:
        raise ValueError("a retune is saved with the key of the request it answers")
    shutil.copytree(retuned.adapter_dir, Path(dest) / ADAPTER)
    meta = {"adapter": ADAPTER, "dim": int(retuned.item_vectors.shape[1])}
    features.save_embeddings(Path(dest) / "items", item_ids, retuned.item_vectors, meta)
    features.save_embeddings(Path(dest) / "profiles", user_ids, retuned.profile_vectors, meta)
    write_json(Path(dest) / RETUNE_JSON, {"retuned": True, "key": retuned.key, "n_pairs": retuned.n_pairs})


def load(src: Path, key: str, item_ids: list[str], user_ids: list[str]) -> Retuned | None:
    """The retune saved in ``src`` if it was made for ``key`` (and these items and users), else None."""
    manifest = Path(src) / RETUNE_JSON
    if not manifest.is_file():
        return None
    info = read_json(manifest)
    if not info.get("retuned") or info.get("key") != key:
        return None
    items, item_vectors, _ = features.load_embeddings(Path(src) / "items")
    users, profile_vectors, _ = features.load_embeddings(Path(src) / "profiles")
    if items != item_ids or users != user_ids:
        return None
    return Retuned(
        item_vectors, profile_vectors, Path(src) / ADAPTER, int(info["n_pairs"]), "retune stage", key
    )
