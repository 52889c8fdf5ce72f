"""Item and user text embeddings for the recommender, including cold-start items and users.

Embeddings depend on text alone, so an item or user that never appeared in training is embedded the
same way as any other: verbalise its metadata (and KG facts, if linked), then encode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.core.storage import atomic_dir, read_json, write_json
from components.data.kg import HeteroGraph
from components.text.encoder import EmbeddingCache, Encoder, encode_cached
from components.text.verbalise import DEFAULT_ITEM_TEMPLATE, DEFAULT_USER_TEMPLATE, item_texts, user_texts


def encode_texts(encoder: Encoder, texts: list[str], cache: EmbeddingCache | None) -> np.ndarray:
    """Embed ``texts`` (through ``cache`` when given)."""
    if cache is None:
        return encoder.encode(texts)
    return encode_cached(encoder, texts, cache)[0]


def encode_items(
    encoder: Encoder,
    items: pd.DataFrame,
    graph: HeteroGraph | None,
    template: str = DEFAULT_ITEM_TEMPLATE,
    max_facts: int = 4,
    cache: EmbeddingCache | None = None,
    **verbalise: Any,
) -> tuple[list[str], np.ndarray]:
    """Verbalise and embed items; rows absent from the graph or from training still get a vector.

    Args:
        encoder: The (possibly fine-tuned) encoder.
        items: Items table; new items may be appended with fresh ``item`` indices.
        graph: Graph for KG facts, or None.
        template: Item template.
        max_facts: KG facts per item.
        cache: Optional embedding cache.
        **verbalise: Further keyword arguments of :func:`~components.text.verbalise.item_texts`.

    Returns:
        The texts and their embeddings (float32, unit rows), in row order.
    """
    texts = item_texts(items, graph, template, max_facts, **verbalise)
    return texts, encode_texts(encoder, texts, cache)


def encode_users(
    encoder: Encoder,
    users: pd.DataFrame,
    train: pd.DataFrame,
    items: pd.DataFrame,
    n_recent: int = 10,
    template: str = DEFAULT_USER_TEMPLATE,
    cache: EmbeddingCache | None = None,
) -> tuple[list[str], np.ndarray]:
    """Verbalise and embed users from demographics and recent training items (none for a new user)."""
    texts = user_texts(users, train, items, n_recent, template)
    return texts, encode_texts(encoder, texts, cache)


def save_embeddings(dest: Path, ids: list[str], vectors: np.ndarray, meta: dict[str, Any]) -> None:
    """Write ``embeddings.npz`` (ids, vectors) and ``meta.json`` atomically into ``dest``."""
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
    with atomic_dir(dest) as tmp:
        np.savez(tmp / "embeddings.npz", ids=np.asarray(ids, dtype=str), vectors=vectors.astype(np.float32))
        write_json(tmp / "meta.json", {**meta, "n": len(ids), "dim": int(vectors.shape[1])})


def load_embeddings(src: Path) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """Read what :func:`save_embeddings` wrote."""
    with np.load(Path(src) / "embeddings.npz", allow_pickle=False) as data:
        ids, vectors = data["ids"].tolist(), data["vectors"]
    return ids, vectors, read_json(Path(src) / "meta.json")
