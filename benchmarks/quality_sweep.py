"""Validation sweeps of the fusion model's settings, warm or cold, over several seeds (issue 16).

Usage (a workspace after `metarec run`; each -S is a `key=value` override as in `metarec run -S`):
    .venv/bin/python benchmarks/quality_sweep.py cold -w W --seeds 42,43,44 -S model.metarec.text_to_id=true
    .venv/bin/python benchmarks/quality_sweep.py warm -w W --seeds 42,43,44 -S model.metarec.gates=language

``bounds`` ranks each seed's cold items the same way for every user by three reference scores: the cold
items' own training popularity (an oracle: the protocol removed exactly that), a ridge fit of warm items'
log popularity on their metadata one-hots (genre, release year: what the attribute bias sees), and
chance. It reads validation and test; no setting is chosen from it.

``cold`` runs the cold-item protocol per seed (the seed draws the cold items and trains the refit; the
encoder is fine-tuned again without the cold items unless ``eval.cold_finetune=false``, cached per draw
under <workspace>/.cache/retuned-adapters) and prints recall@20 among cold items on validation. ``warm``
fits on the training part and prints validation NDCG@10. Test figures are printed only with ``--test``:
settings are chosen on validation, and test is read once per final configuration (`metarec ablate`).
Nothing is logged to MLflow or written to the workspace except the adapter cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.core.config import Config  # noqa: E402
from components.core.workspace import Paths, workspace_config  # noqa: E402
from components.evaluation import protocol  # noqa: E402
from components.model.facade import Loaded, cold_protocol, fit_configured, load_parts  # noqa: E402


def bounds(paths: Paths, loaded: Loaded, cfg: Config) -> dict[str, float]:
    """Cold recall@20 of non-personalised reference scores on one seed's cold draw (valid and test)."""
    from components.data import kg
    from components.evaluation import coldstart
    from components.model.fit import item_attributes

    data = loaded.data
    cold = coldstart.cold_item_split(data.train, data.valid, data.test, cfg.eval.cold_fraction, cfg.seed)
    counts = np.asarray(cold.train.sum(axis=0)).ravel()
    warm = counts > 0
    attrs = item_attributes(kg.load_graph(paths.graph))
    features = np.hstack(
        [attrs if attrs is not None else np.zeros((len(counts), 0)), np.ones((len(counts), 1))]
    )
    lhs = features[warm].T @ features[warm] + 10.0 * np.eye(features.shape[1])
    ridge = features @ np.linalg.solve(lhs, features[warm].T @ np.log1p(counts[warm]))
    scores = {
        "oracle_popularity": np.log1p(np.asarray(data.train.sum(axis=0)).ravel()),
        "metadata_popularity": ridge,
    }
    out: dict[str, float] = {}
    for part, truth in (("valid", data.valid), ("test", data.test)):
        split = coldstart.ColdSplit(cold.train, cold.valid, truth, cold.cold_items)
        for name, score in scores.items():

            def constant(block: np.ndarray, row: np.ndarray = score) -> np.ndarray:
                return np.tile(row, (len(block), 1))

            result = coldstart.evaluate_cold(constant, split, [20], seed=cfg.seed)
            out[f"{part}_{name}@20"] = result["overall"]["recall@20"]
        out[f"{part}_chance@20"] = result["random_recall@20"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", choices=["cold", "warm", "bounds"])
    parser.add_argument("-w", "--workspace", required=True, type=Path)
    parser.add_argument("--seeds", default="42,43,44,45,46", help="comma-separated seeds")
    parser.add_argument("-S", "--set", action="append", default=[], dest="overrides", help="key=value")
    parser.add_argument("--test", action="store_true", help="also print test figures")
    args = parser.parse_args()
    paths = Paths(args.workspace)
    loaded = load_parts(paths)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        cfg = workspace_config(paths.root, [*args.overrides, f"seed={seed}"])
        start = time.perf_counter()
        row: dict[str, float | int] = {"seed": seed}
        if args.part == "bounds":
            row.update(bounds(paths, loaded, cfg))
        elif args.part == "cold":
            result = cold_protocol(paths, cfg, loaded)
            row["valid_cold_recall@20"] = result["cold_valid"].get("recall@20", float("nan"))
            if args.test:
                row["test_cold_recall@20"] = result["cold"]["overall"]["recall@20"]
        else:
            model, _ = fit_configured(paths, cfg, train=loaded.data.train)
            for part in ("valid", "test") if args.test else ("valid",):
                metrics = protocol.evaluate(model, loaded.data, part, cfg.eval.ks, cfg.eval.activity_buckets)
                row[f"{part}_ndcg@10"] = metrics["overall"]["ndcg@10"]
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    means = {
        k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0] if k not in ("seed", "seconds")
    }
    print(json.dumps({"overrides": args.overrides, "seeds": len(rows), "mean": means}), flush=True)


if __name__ == "__main__":
    main()
