"""The ``mine-metapaths`` flow: candidate blocks as Prefect tasks under a configurable task runner.

Every block of validation users is one task that loads its inputs from the workspace (once per
worker process) and returns additive statistics, so the same flow runs on a thread pool, a process
pool or a Dask cluster and gives the same result.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from components.core.config import MineConfig
from components.metapaths import mining
from components.metapaths.schema import Metapath, enumerate_metapaths, parse


def make_task_runner(cfg: MineConfig) -> TaskRunner[Any]:
    """The task runner named by ``mine.task_runner``."""
    if cfg.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.workers)
    if cfg.task_runner == "processes":
        return ProcessPoolTaskRunner(max_workers=cfg.workers)
    from prefect_dask import DaskTaskRunner

    if cfg.dask_address:
        return DaskTaskRunner(address=cfg.dask_address)
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": cfg.workers, "threads_per_worker": 1, "processes": True}
    )


@task(name="score-block", cache_policy=NO_CACHE)
def score_block(
    spec: mining.ContextSpec, candidate_ids: list[str], users: list[int], base: list[tuple[str, float]]
) -> mining.BlockStats:
    """Statistics of one block of validation users for every candidate (alone or added to ``base``)."""
    ctx = mining.load_context(spec)
    schema = ctx.counter.graph.schema
    candidates = [parse(c, schema) for c in candidate_ids]
    selection = [(parse(c, schema), w) for c, w in base]
    block = np.asarray(users, dtype=np.int64)
    return mining.block_stats(ctx.counter, candidates, block, ctx.train[block], ctx.valid[block], selection)


@flow(name="mine-metapaths")
def mine_metapaths(graph_dir: str, split_dir: str, cfg: MineConfig, seed: int) -> dict[str, Any]:
    """Enumerate, count, score and select metapaths; return the mining report (features excluded)."""
    logger = get_run_logger()
    spec = mining.ContextSpec.for_inputs(Path(graph_dir), Path(split_dir), cfg)
    ctx = mining.load_context(spec)
    candidates = enumerate_metapaths(
        ctx.counter.graph.schema, cfg.max_length, include=cfg.include, exclude=cfg.exclude
    )
    blocks = mining.validation_blocks(ctx.valid, cfg.sample_users, cfg.block_size, seed)
    logger.info(
        "%d candidate metapaths up to length %d; %d validation users in %d blocks",
        len(candidates),
        cfg.max_length,
        sum(len(b) for b in blocks),
        len(blocks),
    )

    def map_blocks(parts: list[np.ndarray], cands: Sequence[Metapath], base: mining.Selection) -> list[Any]:
        ids = [c.id for c in cands]
        base_ids = [(p.id, w) for p, w in base]
        futures = [score_block.submit(spec, ids, b.tolist(), base_ids) for b in parts]
        return [f.result() for f in futures]

    rows, steps = mining.select(candidates, blocks, map_blocks, cfg.top_k, cfg.min_gain, cfg.shortlist)
    for step in steps:
        logger.info("selection round %s: %s", step["round"], step)
    selected = [r for r in rows if r["selected"]]
    selected.sort(key=lambda r: r["selection_rank"])
    combined = next((s["combined_ndcg"] for s in reversed(steps) if "combined_ndcg" in s), None)
    return {
        "weighting": cfg.weighting,
        "damping": cfg.damping,
        "max_length": cfg.max_length,
        "users_scored": int(sum(len(b) for b in blocks)),
        "candidates": rows,
        "steps": steps,
        "selected": [{"id": r["id"], "name": r["name"], "weight": r["weight"]} for r in selected],
        "combined_valid_ndcg@10": combined,
        "pop_valid_ndcg@10": mining.popularity_ndcg(ctx.train, ctx.valid, blocks),
    }


def run_mining(graph_dir: Path, split_dir: Path, cfg: MineConfig, seed: int) -> dict[str, Any]:
    """Run the mining flow with the configured task runner."""
    runner = make_task_runner(cfg)
    return mine_metapaths.with_options(task_runner=runner)(str(graph_dir), str(split_dir), cfg, seed)
