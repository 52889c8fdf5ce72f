"""Offline inference from a workspace: the serving engine for the fusion model, ``score`` for baselines.

The fusion model ranks and explains through :class:`components.bundle.engine.BundleEngine` over the
workspace's ``models/bundle``, so a written list is the list the server would answer, explanations
included. A baseline has no bundle (the export stage leaves a skip marker) and ranks with its own
``score``, without explanations.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from components.core.storage import atomic_file
from components.core.workspace import Paths

if TYPE_CHECKING:
    from components.bundle.engine import BundleEngine


def _csv_text(text: str | None) -> str:
    if text is None:
        return ""
    return '"' + text.replace('"', '""') + '"'


def _model_name(paths: Paths) -> str:
    return str(json.loads((paths.model / "model.json").read_text(encoding="utf-8")).get("name", ""))


def workspace_engine(paths: Paths) -> BundleEngine:
    """The workspace's bundle, verified and checked to be the export of ``models/current``.

    Its exclusions are the offline ones: the export writes each user's train + valid items into the
    bundle (``seen.npz``), from the same split the model was trained on.

    Raises:
        BundleError: The bundle is missing, fails verification, or was exported from another model.
    """
    from components.bundle.engine import SEEN, load_bundle
    from components.bundle.format import MODEL_FILES, BundleError, file_sha256

    rerun = "run `metarec run` to export the trained model"
    try:
        engine = load_bundle(paths.bundle)
    except BundleError as exc:
        raise BundleError(f"no usable serving bundle for the fusion model ({exc}); {rerun}") from None
    files = engine.manifest["files"]
    stale = [f for f in MODEL_FILES if files.get(f) != file_sha256(paths.model / f)]
    if stale or SEEN not in files:  # a bundle without seen.npz predates the train+valid exclusion
        what = f"{', '.join(stale)} differ from {paths.model}" if stale else f"no {SEEN}"
        raise BundleError(f"{paths.bundle} is stale ({what}); {rerun}")
    return engine


def _check_k(k: int, n_items: int) -> None:
    if not 1 <= k <= n_items:
        raise ValueError(f"--k must be in 1..{n_items}, got {k}")


def recommend(
    paths: Paths,
    k: int,
    out: Path,
    user_ids: list[str] | None = None,
    block_size: int = 1024,
    explain: bool = False,
    feedback: Mapping[str, Sequence[str]] | None = None,
) -> int:
    """Write top-k recommendations (original ids) for all or some users; return the number of rows.

    Items the user interacted with in train or valid are excluded, as in test evaluation. With
    ``explain`` (fusion model only) each row carries the top metapath instance behind the item.
    ``block_size`` is the number of users a baseline scores at once. ``feedback`` (fusion model only;
    user id -> items from the feedback store, ``components.serving.online``) adds each user's feedback
    items to their history as the server does; users known only from feedback are then ranked too.
    """
    if _model_name(paths) != "metarec":
        if explain or feedback is not None:
            what = "--explain" if explain else "--with-feedback"
            raise ValueError(f"{what} needs the fusion model (model.name=metarec)")
        return _recommend_baseline(paths, k, out, user_ids, block_size)
    engine = workspace_engine(paths)
    _check_k(k, len(engine.item_ids))
    # Items the bundle cannot rank (the store may predate its catalogue) are dropped, as the server does.
    feedback = {u: [i for i in items if i in engine.item_ids] for u, items in (feedback or {}).items()}
    feedback = {u: items for u, items in feedback.items() if items}
    if user_ids is None:
        user_ids = engine.users.user_id.astype(str).tolist()
        user_ids += sorted(u for u in feedback if not engine.known_user(u))
    unknown = [u for u in user_ids if not engine.known_user(u) and not feedback.get(u)]
    if unknown:
        raise ValueError(f"unknown user ids: {', '.join(unknown[:10])}")
    rows = 0
    with atomic_file(out) as handle:
        handle.write("user_id,item_id,rank,score" + (",explanation\n" if explain else "\n"))
        for user in user_ids:
            for rec in engine.recommend(user, k, history=feedback.get(user, []), explain=explain):
                line = f"{user},{rec['item_id']},{rec['rank']},{rec['score']:.6g}"
                handle.write(line + (f",{_csv_text(rec['explanation'])}\n" if explain else "\n"))
                rows += 1
    return rows


def _recommend_baseline(paths: Paths, k: int, out: Path, user_ids: list[str] | None, block_size: int) -> int:
    from components.evaluation.ranking import PAD, topk_items
    from components.model.facade import load_parts, load_trained

    loaded = load_parts(paths)
    model = load_trained(paths.model)
    _check_k(k, len(loaded.items))
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
    rows = 0
    with atomic_file(out) as handle:
        handle.write("user_id,item_id,rank,score\n")
        for start in range(0, len(users), block_size):
            block = users[start : start + block_size]
            scores = model.score(block, history=loaded.data.train)
            topk = topk_items(scores, k, exclude[block])
            for r, user in enumerate(block):
                items = topk[r][topk[r] != PAD]
                for rank, item in enumerate(items, start=1):
                    handle.write(f"{user_id_of[user]},{item_ids[item]},{rank},{scores[r, item]:.6g}\n")
                    rows += 1
    return rows


def recommend_cold(
    paths: Paths, k: int, profile: dict[str, str], history: list[str], explain: bool = True
) -> list[dict[str, Any]]:
    """Top-k for a user unknown to the model, from a profile (demographics) and/or item history.

    Ranked and explained as the server ranks a cold user: the profile text is embedded by the bundle's
    int8 encoder, the history items are excluded.
    """
    if _model_name(paths) != "metarec":
        raise ValueError("cold users need the fusion model (model.name=metarec)")
    engine = workspace_engine(paths)
    _check_k(k, len(engine.item_ids))
    return engine.recommend(None, k, profile=profile or None, history=history, explain=explain)
