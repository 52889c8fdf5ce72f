"""Stage ``mine``: metapaths mined by the Prefect mining flow (passed in as ``miner``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from components.core.config import Config, MineConfig
from components.core.workspace import Paths
from components.stages.common import tracked_run

Miner = Callable[[Path, Path, MineConfig, int], dict[str, Any]]


def run(paths: Paths, cfg: Config, miner: Miner) -> None:
    """Mine metapaths with ``miner`` (the Prefect flow), export candidate features, log the report."""
    with tracked_run(paths, cfg, "mine"):
        import mlflow

        from components.metapaths import mining, report

        start = time.perf_counter()
        result = miner(paths.graph, paths.split, cfg.mine, cfg.seed)
        mine_seconds = time.perf_counter() - start
        features = None
        if not result["selected"]:
            mlflow.set_tag(
                "metarec.metapaths.warning", "no metapath improved validation NDCG; no features exported"
            )
        elif cfg.mine.candidates_per_user:
            ctx = mining.load_context(mining.ContextSpec.for_inputs(paths.graph, paths.split, cfg.mine))
            schema = ctx.counter.graph.schema
            from components.metapaths.schema import parse

            selected = [(parse(s["id"], schema), float(s["weight"])) for s in result["selected"]]
            features = mining.candidate_features(
                ctx.counter, selected, ctx.train, cfg.mine.candidates_per_user, cfg.mine.block_size
            )
        report.save(paths.metapaths, result, features)
        mlflow.log_artifact(str(paths.metapaths / report.METAPATHS_FILE))
        mlflow.log_artifact(str(paths.metapaths / report.CHART_FILE))
        mlflow.log_text(report.table(result), "metapaths_table.md")
        mlflow.log_dict({"steps": result["steps"]}, "selection_steps.json")
        metrics = {
            "mine.candidates": len(result["candidates"]),
            "mine.selected": len(result["selected"]),
            "mine.seconds": mine_seconds,
            "mine.pop_valid_ndcg_at_10": result["pop_valid_ndcg@10"],
        }
        if result["combined_valid_ndcg@10"] is not None:
            metrics["mine.combined_valid_ndcg_at_10"] = result["combined_valid_ndcg@10"]
        mlflow.log_metrics(metrics)
        mlflow.set_tag("metarec.metapaths.selected", " ; ".join(s["name"] for s in result["selected"]))
