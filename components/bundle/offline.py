"""Offline inference: recommendations and explanations written from a workspace."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from components.core.config import load_config
from components.core.storage import atomic_file
from components.core.workspace import Paths
from components.data import kg
from components.model.facade import load_parts, load_trained


def _csv_text(text: str | None) -> str:
    if text is None:
        return ""
    return '"' + text.replace('"', '""') + '"'


def offline_explainer(paths: Paths, model: Any) -> Any:
    """The serving explainer over this workspace's graph and training history (fusion model only)."""
    from components.bundle.engine import Explainer
    from components.metapaths.explain import Namer

    graph = kg.with_interactions(kg.load_graph(paths.graph), model.train)
    return Explainer(graph, Namer(graph, pd.read_parquet(paths.processed / "items.parquet")))


def explain_items(
    explainer: Any,
    model: Any,
    source_of: Callable[[Any], np.ndarray | None],
    user: int | None,
    items: np.ndarray,
    contrib: np.ndarray,
) -> list[str | None]:
    """Top metapath instance per item, trying channels by contribution (``contrib``: items × channels).

    ``source_of(channel)`` gives the user's source row for a channel (history or attribute one-hot),
    or None when the user has none.
    """
    from components.metapaths.schema import parse

    schema = explainer.graph.schema
    notes: list[str | None] = [None] * len(items)
    for j, item in enumerate(items):
        for c in np.argsort(-contrib[j]):
            channel = model.bank.channels[int(c)]
            if contrib[j, c] <= 0 or channel.kind != "metapath" or not channel.metapath_id:
                continue
            source = source_of(channel)
            if source is None:
                continue
            path = parse(channel.metapath_id, schema)
            start = -1 if user is None else user
            text = explainer.instances(path, np.asarray(source, np.float64), np.asarray([item]), start)[0]
            if text is not None:
                notes[j] = text
                break
    return notes


def _row(matrix: sp.csr_matrix | None) -> np.ndarray | None:
    return None if matrix is None else np.asarray(matrix.toarray()).ravel()


def recommend(
    paths: Paths,
    k: int,
    out: Path,
    user_ids: list[str] | None = None,
    block_size: int = 1024,
    explain: bool = False,
) -> int:
    """Write top-k recommendations (original ids) for all or some users; return the number of rows.

    Items the user interacted with in train or valid are excluded, as in test evaluation. With
    ``explain`` (fusion model only) each row carries the top metapath instance behind the item.
    """
    from components.evaluation.ranking import PAD, topk_items

    loaded = load_parts(paths)
    model = load_trained(paths.model)
    if explain and getattr(model, "name", "") != "metarec":
        raise ValueError("--explain needs the fusion model (model.name=metarec)")
    n_items = len(loaded.items)
    if not 1 <= k <= n_items:
        raise ValueError(f"--k must be in 1..{n_items}, got {k}")
    index = dict(zip(loaded.users.user_id.astype(str), loaded.users.user, strict=True))
    if user_ids is None:
        users = loaded.users.user.to_numpy()
    else:
        unknown = [u for u in user_ids if u not in index]
        if unknown:
            raise ValueError(f"unknown user ids: {', '.join(unknown[:10])}")
        users = np.asarray([index[u] for u in user_ids])
    exclude = loaded.data.exclusions("test")
    item_ids = loaded.items.item_id.astype(str).to_numpy()
    user_id_of = loaded.users.user_id.astype(str).to_numpy()
    explainer = offline_explainer(paths, model) if explain else None
    rows = 0
    with atomic_file(out) as handle:
        handle.write("user_id,item_id,rank,score" + (",explanation\n" if explain else "\n"))
        for start in range(0, len(users), block_size):
            block = users[start : start + block_size]
            scores = model.score(block, history=loaded.data.train)
            topk = topk_items(scores, k, exclude[block])
            for r, user in enumerate(block):
                items = topk[r][topk[r] != PAD]
                notes: list[str | None] = [None] * len(items)
                if explainer is not None:
                    contrib = model.contributions(np.full(len(items), user), items)

                    def source_of(channel: Any, u: int = int(user)) -> np.ndarray | None:
                        if channel.source == "history":
                            return _row(model.train[u])
                        return _row(model.bank.user_attributes[channel.source][u])

                    notes = explain_items(explainer, model, source_of, int(user), items, contrib)
                for rank, (item, note) in enumerate(zip(items, notes, strict=True), start=1):
                    line = f"{user_id_of[user]},{item_ids[item]},{rank},{scores[r, item]:.6g}"
                    handle.write(line + (f",{_csv_text(note)}\n" if explain else "\n"))
                    rows += 1
    return rows


def recommend_cold(
    paths: Paths, k: int, profile: dict[str, str], history: list[str], explain: bool = True
) -> list[dict[str, Any]]:
    """Top-k for a user unknown to the model, from a profile (demographics) and/or item history."""
    model = load_trained(paths.model)
    if getattr(model, "name", "") != "metarec":
        raise ValueError("cold users need the fusion model (model.name=metarec)")
    cfg = load_config(paths.params)
    items = pd.read_parquet(paths.processed / "items.parquet")
    index = {str(i): n for n, i in enumerate(items.item_id.astype(str))}
    unknown = [h for h in history if h not in index]
    if unknown:
        raise ValueError(f"unknown item ids in --history: {', '.join(unknown[:10])}")
    n_items = len(items)
    if not 1 <= k <= n_items:
        raise ValueError(f"--k must be in 1..{n_items}, got {k}")
    row = sp.csr_matrix(
        (np.ones(len(history), np.float32), ([0] * len(history), [index[h] for h in history])),
        shape=(1, n_items),
    )
    vector = np.zeros((1, model.profile.shape[1]), dtype=np.float32)
    if profile:
        from components.text.encoder import Encoder, resolve_model
        from components.text.verbalise import user_texts

        frame = pd.DataFrame([{"user": 0, "user_id": "new", **profile}])
        empty = pd.DataFrame({"user": [], "item": [], "timestamp": []})
        text = user_texts(frame, empty, items, cfg.text.n_recent, cfg.text.user_template)
        adapter = paths.text / "finetune" / "adapter"
        encoder = Encoder(
            resolve_model(cfg.text.model),
            cfg.text.max_length,
            cfg.text.batch_size,
            cfg.text.threads,
            adapter_dir=adapter if adapter.exists() else None,
        )
        vector = encoder.encode(text)
    attributes = model.bank.profile_attributes(profile)
    scores = model.score_rows(row, vector, attributes=attributes)[0].astype(np.float64)
    scores[[index[h] for h in history]] = -np.inf
    top = np.argsort(-scores, kind="stable")[: min(k, int(np.isfinite(scores).sum()))]
    notes: list[str | None] = [None] * len(top)
    if explain:
        feats = model.bank.rows(row, None, attributes)[0]
        import torch

        with torch.no_grad():
            user_vec = model.net.user_vector(torch.from_numpy(row.toarray()), torch.from_numpy(vector))
            gates = torch.nn.functional.softplus(
                model.net.path_bias + user_vec @ model.net.path_user
            ).numpy()[0]
        contrib = (gates[:, None] * feats[:, top]).T
        explainer = offline_explainer(paths, model)

        def source_of(channel: Any) -> np.ndarray | None:
            return _row(row if channel.source == "history" else attributes.get(channel.source))

        notes = explain_items(explainer, model, source_of, None, top, contrib)
    ids = items.item_id.astype(str).to_numpy()
    return [
        {"item_id": ids[i], "rank": r, "score": float(scores[i]), "explanation": notes[r - 1]}
        for r, i in enumerate(top, start=1)
    ]
