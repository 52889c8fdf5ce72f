"""Every path instance joining one user to one item along a workspace's selected metapaths."""

from __future__ import annotations

from typing import Any

import pandas as pd

from components.core.storage import read_json
from components.core.workspace import Paths, workspace_config


def explain_pair(paths: Paths, user_id: str, item_id: str, top_n: int = 3) -> list[dict[str, Any]]:
    """Path instances connecting a user to an item along the workspace's selected metapaths."""
    from components.metapaths import mining, report
    from components.metapaths.explain import Namer, explain

    if not (paths.metapaths / report.METAPATHS_FILE).exists():
        raise FileNotFoundError(f"no mined metapaths in {paths.metapaths}; run `metarec run` first")
    cfg = workspace_config(paths.root)
    # Score with the weighting the metapaths were mined with, even if params.yaml changed since.
    mined = read_json(paths.metapaths / report.METAPATHS_FILE)
    mine_cfg = cfg.mine.model_copy(update={"weighting": mined["weighting"], "damping": mined["damping"]})
    ctx = mining.load_context(mining.ContextSpec.for_inputs(paths.graph, paths.split, mine_cfg))
    graph = ctx.counter.graph
    users = {u: k for k, u in enumerate(graph.node_ids["user"])}
    items = {i: k for k, i in enumerate(graph.node_ids["item"])}
    if user_id not in users:
        raise ValueError(f"unknown user id {user_id!r}")
    if item_id not in items:
        raise ValueError(f"unknown item id {item_id!r}")
    selected = [p for p, _ in report.load_selected(paths.metapaths, graph.schema)]
    namer = Namer(graph, pd.read_parquet(paths.processed / "items.parquet"))
    return explain(ctx.counter, selected, users[user_id], items[item_id], namer, top_n)
