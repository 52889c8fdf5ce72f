"""The mining flow gives the same result on every executor: serial, Prefect threads, and a real Dask
LocalCluster (processes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from components.core.config import Config, MineConfig, SplitConfig
from components.data import ingest, kg, split
from components.metapaths import mining
from components.metapaths.schema import enumerate_metapaths
from flows.mining import make_task_runner, mine_metapaths

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mining")
    data = ingest.load_dataset(tiny_dir, "tiny")
    cfg = Config()
    graph, report = kg.build_graph(
        data.users, data.items, data.kg, cfg.kg.item_fields, cfg.kg.user_fields, cfg.kg.age_buckets
    )
    kg.save_graph(graph, root / "graph", report)
    parts = split.split_interactions(data.interactions, SplitConfig(train_ratio=0.6, valid_ratio=0.2))
    split.save_split(parts, root / "split", {})
    return root / "graph", root / "split"


def comparable(report: dict[str, Any]) -> tuple[Any, ...]:
    rows = [
        (r["id"], round(r["ndcg@10"], 12), round(r["recall@50"], 12), r["selected"])
        for r in report["candidates"]
    ]
    return rows, [s["id"] for s in report["selected"]], report["combined_valid_ndcg@10"]


# Two users per block so the tiny dataset's six validation users make three tasks.
CFG = MineConfig(max_length=3, block_size=2, top_k=3, weighting="dwpc")


def test_flow_matches_serial_map(saved: tuple[Path, Path]) -> None:
    graph_dir, split_dir = saved
    threads = mine_metapaths.with_options(task_runner=make_task_runner(CFG))(
        str(graph_dir), str(split_dir), CFG, 0
    )

    spec = mining.ContextSpec.for_inputs(graph_dir, split_dir, CFG)
    ctx = mining.load_context(spec)
    candidates = enumerate_metapaths(ctx.counter.graph.schema, CFG.max_length)
    blocks = mining.validation_blocks(ctx.valid, CFG.sample_users, CFG.block_size, 0)
    assert len(blocks) == 3
    rows, steps = mining.select(
        candidates,
        blocks,
        mining.serial_map(ctx.counter, ctx.train, ctx.valid),
        CFG.top_k,
        CFG.min_gain,
        CFG.shortlist,
    )
    assert [(r["id"], r["ndcg@10"]) for r in threads["candidates"]] == [(r["id"], r["ndcg@10"]) for r in rows]
    assert [s["id"] for s in threads["selected"]] == [s["selected"] for s in steps if "selected" in s]


def test_dask_local_cluster_gives_identical_results(saved: tuple[Path, Path]) -> None:
    graph_dir, split_dir = saved
    threads = mine_metapaths.with_options(task_runner=make_task_runner(CFG))(
        str(graph_dir), str(split_dir), CFG, 0
    )
    dask_cfg = CFG.model_copy(update={"task_runner": "dask", "workers": 2})
    runner = make_task_runner(dask_cfg)
    assert type(runner).__name__ == "DaskTaskRunner"
    on_dask = mine_metapaths.with_options(task_runner=runner)(str(graph_dir), str(split_dir), dask_cfg, 0)
    assert comparable(on_dask) == comparable(threads)
