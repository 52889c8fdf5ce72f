"""Baselines on ml-100k: fit time, evaluation time, peak memory and full-ranking test metrics.

Usage: .venv/bin/python benchmarks/baselines.py [--models pop itemknn bpr]
Protocol: user_temporal 80/10/10, implicit, full ranking excluding train+valid items (see docs).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from components import baselines
from components.core.config import BPRConfig, SplitConfig
from components.data import fetch, ingest, split
from components.evaluation import protocol as evaluate


def main() -> None:
    """Fetch ml-100k, split it and print one line per baseline."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["pop", "itemknn", "bpr"])
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        start = time.perf_counter()
        fetch.fetch(raw, None, "ml-100k")
        dataset = ingest.load_dataset(raw, "ml-100k")
        print(f"fetch+ingest: {time.perf_counter() - start:.1f}s")
    parts = split.split_interactions(dataset.interactions, SplitConfig())
    n_u, n_i = len(dataset.users), len(dataset.items)
    data = evaluate.EvalData(*(split.to_matrix(parts.part(p), n_u, n_i) for p in split.PARTS))

    header = (
        f"{'model':8} {'fit s':>7} {'eval s':>7} {'valid ndcg@10':>14} {'test ndcg@10':>13} "
        f"{'test recall@20':>15}"
    )
    print(header)
    for name in args.models:
        params = BPRConfig().model_dump() if name == "bpr" else {}
        model = baselines.build_model(name, params, args.seed)
        start = time.perf_counter()
        model.fit(data.train)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        valid = evaluate.evaluate(model, data, "valid", [10, 20], [20, 50, 100])["overall"]
        test = evaluate.evaluate(model, data, "test", [10, 20], [20, 50, 100])["overall"]
        eval_s = (time.perf_counter() - start) / 2
        print(
            f"{name:8} {fit_s:7.2f} {eval_s:7.2f} {valid['ndcg@10']:14.4f} {test['ndcg@10']:13.4f} "
            f"{test['recall@20']:15.4f}"
        )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
