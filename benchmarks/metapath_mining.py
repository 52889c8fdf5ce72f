"""Metapath mining benchmarks: ml-100k timings, speed against networkx, and synthetic scale-up.

Usage:
    .venv/bin/python benchmarks/metapath_mining.py ml100k             # ml-100k + networkx comparison
    .venv/bin/python benchmarks/metapath_mining.py scale --size small  # one synthetic size
    .venv/bin/python benchmarks/metapath_mining.py scale-all           # small, medium, large (a process each)

Each scale size runs in a fresh process so its peak RSS is its own. Mining uses the pipeline's defaults
(pathsim, max length 4, 2000 sampled validation users, blocks of 256, serial map in one process, which
is what one worker of the thread/process/Dask runners executes).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.core.config import Config, MineConfig, SplitConfig  # noqa: E402
from components.data import fetch, ingest, kg, split  # noqa: E402
from components.data.synthetic import SIZES, generate  # noqa: E402
from components.metapaths import mining  # noqa: E402
from components.metapaths.counting import Counter  # noqa: E402
from components.metapaths.schema import Metapath, enumerate_metapaths  # noqa: E402


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(raw: Path, name: str) -> tuple[kg.HeteroGraph, object, dict[str, float]]:
    """Ingest, build the graph and split; return the training graph, split matrices and timings."""
    cfg = Config()
    times = {}
    start = time.perf_counter()
    data = ingest.load_dataset(raw, name)
    times["ingest_s"] = time.perf_counter() - start
    start = time.perf_counter()
    graph, _ = kg.build_graph(
        data.users, data.items, data.kg, cfg.kg.item_fields, cfg.kg.user_fields, cfg.kg.age_buckets
    )
    times["build_graph_s"] = time.perf_counter() - start
    start = time.perf_counter()
    parts = split.split_interactions(data.interactions, SplitConfig())
    n_u, n_i = len(data.users), len(data.items)
    train, valid = split.to_matrix(parts.train, n_u, n_i), split.to_matrix(parts.valid, n_u, n_i)
    times["split_s"] = time.perf_counter() - start
    return kg.with_interactions(graph, train), (train, valid), times


def mine(graph: kg.HeteroGraph, train: object, valid: object, cfg: MineConfig, seed: int = 42) -> dict:
    """Enumerate, count, score and select with the serial map; return timings and the selection."""
    out: dict = {}
    start = time.perf_counter()
    candidates = enumerate_metapaths(graph.schema, cfg.max_length)
    out["enumerate_s"] = time.perf_counter() - start
    out["candidates"] = len(candidates)
    counter = Counter(graph, cfg.weighting, cfg.damping, cfg.suffix_budget_mb << 20)
    blocks = mining.validation_blocks(valid, cfg.sample_users, cfg.block_size, seed)  # type: ignore[arg-type]
    start = time.perf_counter()
    rows, steps = mining.select(
        candidates,
        blocks,
        mining.serial_map(counter, train, valid),  # type: ignore[arg-type]
        cfg.top_k,
        cfg.min_gain,
        cfg.shortlist,
    )
    out["count_score_select_s"] = time.perf_counter() - start
    out["selected"] = [s["name"] for s in steps if "selected" in s]
    out["combined_valid_ndcg@10"] = next(
        (s["combined_ndcg"] for s in reversed(steps) if "combined_ndcg" in s), None
    )
    out["pop_valid_ndcg@10"] = mining.popularity_ndcg(train, valid, blocks)  # type: ignore[arg-type]
    return out


def networkx_counts(graph: kg.HeteroGraph, path: Metapath, users: np.ndarray) -> np.ndarray:
    """Path-instance counts by walking a networkx instance graph (the baseline to beat)."""
    import networkx as nx

    g = nx.MultiDiGraph()
    for step, key in enumerate(path.keys):
        m = graph.matrix(key).tocoo()
        src_t, dst_t = path.types[step], path.types[step + 1]
        g.add_edges_from(((src_t, int(a)), (dst_t, int(b)), key) for a, b in zip(m.row, m.col, strict=True))
    out = np.zeros((len(users), len(graph.node_ids["item"])))

    def walk(node: tuple[str, int], step: int, row: int) -> None:
        if step == path.length:
            out[row, node[1]] += 1
            return
        if node in g:
            for _, nxt, k in g.out_edges(node, keys=True):
                if k == path.keys[step]:
                    walk(nxt, step + 1, row)

    for row, u in enumerate(users):
        walk(("user", int(u)), 0, row)
    return out


def bench_ml100k() -> None:
    """ml-100k: mining timings and the networkx comparison on a user sample."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        fetch.fetch(raw, None, "ml-100k")
        graph, (train, valid), times = prepare(raw, "ml-100k")
    cfg = MineConfig()
    result = mine(graph, train, valid, cfg)
    print("ml-100k (943 users, 1682 items, all 943 validation users scored)")
    print(
        f"  ingest {times['ingest_s']:.2f}s, graph {times['build_graph_s']:.2f}s, "
        f"split {times['split_s']:.2f}s"
    )
    print(
        f"  candidates up to length {cfg.max_length}: {result['candidates']} "
        f"(enumerated in {result['enumerate_s'] * 1000:.1f} ms)"
    )
    print(f"  count + score all candidates + greedy selection: {result['count_score_select_s']:.1f}s")
    print(f"  selected: {result['selected']}")
    print(
        f"  validation NDCG@10: selected set {result['combined_valid_ndcg@10']:.4f} vs Pop "
        f"{result['pop_valid_ndcg@10']:.4f}"
    )
    print(f"  peak RSS: {peak_rss_mb():.0f} MiB")

    # Speed against networkx: the same length-3 metapaths, the same 100 users, raw counts.
    users = np.random.default_rng(0).choice(len(graph.node_ids["user"]), size=100, replace=False)
    paths = [p for p in enumerate_metapaths(graph.schema, 3) if p.length == 3]
    counter = Counter(graph, "count")
    start = time.perf_counter()
    ours = [counter.block(p, users) for p in paths]
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = [networkx_counts(graph, p, users) for p in paths]
    nx_s = time.perf_counter() - start
    assert all(np.allclose(a, b) for a, b in zip(ours, theirs, strict=True)), "counts disagree"
    print(
        f"  networkx comparison ({len(paths)} length-3 metapaths, 100 users, identical counts): "
        f"sparse {ours_s:.3f}s vs networkx {nx_s:.1f}s = {nx_s / ours_s:.0f}x"
    )


def bench_scale(size: str) -> None:
    """One synthetic size: generate, ingest, build, split, mine; print times and peak RSS."""
    spec = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        generate(spec, Path(tmp) / "syn")
        gen_s = time.perf_counter() - start
        graph, (train, valid), times = prepare(Path(tmp) / "syn", "synthetic")
    result = mine(graph, train, valid, MineConfig())
    total = sum(times.values()) + result["enumerate_s"] + result["count_score_select_s"]
    print(
        f"{size}: {spec.n_users:,} users x {spec.n_items:,} items x {spec.n_entities:,} entities, "
        f"{spec.n_interactions:,} interactions, {spec.n_triples:,} triples"
    )
    print(
        f"  generate {gen_s:.1f}s | ingest {times['ingest_s']:.1f}s | graph {times['build_graph_s']:.1f}s | "
        f"split {times['split_s']:.1f}s | mine ({result['candidates']} candidates, 2000 users) "
        f"{result['count_score_select_s']:.1f}s | total (excl. generate) {total:.1f}s | "
        f"peak RSS {peak_rss_mb() / 1024:.2f} GiB"
    )
    print(
        f"  selected: {result['selected']}; valid NDCG@10 {result['combined_valid_ndcg@10']} vs Pop "
        f"{result['pop_valid_ndcg@10']:.4f}"
    )


def main() -> None:
    """Parse the command and run it."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["ml100k", "scale", "scale-all"])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    args = parser.parse_args()
    if args.what == "ml100k":
        bench_ml100k()
    elif args.what == "scale":
        bench_scale(args.size)
    else:
        for size in ("small", "medium", "large"):
            subprocess.run([sys.executable, __file__, "scale", "--size", size], check=True)


if __name__ == "__main__":
    main()
