"""The ``ablations`` flow: one task and one MLflow run per (variant, seed), then a summary run."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, task

from components import ablation
from components.core import tracking
from components.core.storage import write_json
from components.core.workspace import Paths, workspace_config
from components.model.facade import evaluate_variant


@task(name="ablation-variant", task_run_name="{name}-seed{seed}")
def run_variant(workspace: str, name: str, seed: int, experiment: str) -> dict[str, Any]:
    """Fit and evaluate one variant under one seed (a warm fit and a cold refit) in its own MLflow run."""
    import mlflow

    paths = Paths(Path(workspace))
    variant = ablation.select([name])[0]
    cfg = ablation.variant_config(workspace_config(paths.root), variant, seed)
    experiment_id = tracking.setup(paths.root, experiment, cfg.tracking.uri)
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=ablation.run_name(name, seed),
        tags=ablation.run_tags(variant, cfg),
    ):
        tracking.log_config(cfg.flat())
        result = evaluate_variant(paths, cfg, frozen=variant.frozen_text)
        mlflow.log_metrics(ablation.run_metrics(result))
    return {"variant": name, "seed": seed, **result}


@flow(name="ablations", log_prints=True)
def ablations(
    workspace: str,
    variants: list[str] | None = None,
    n_seeds: int = 1,
    seeds: list[int] | None = None,
) -> dict[str, Any]:
    """Run every ablation variant (or the named ones) over the seeds; log a summary run with table and chart.

    ``seeds`` (explicit) or ``n_seeds`` (the workspace's ``seed`` and the next ones) choose the seeds;
    the default is the workspace's seed alone.
    """
    import mlflow

    paths = Paths(Path(workspace))
    cfg = workspace_config(paths.root)
    experiment = f"{cfg.tracking.experiment}-ablations"
    chosen = ablation.select(variants)
    seed_list = ablation.seed_list(cfg.seed, n_seeds, seeds)
    runs = ablation.plan(chosen, seed_list)
    print(f"{len(runs)} runs: {len(chosen)} variant(s) × seeds {seed_list}")
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for name, seed in runs:
        print(f"[{len(rows) + 1}/{len(runs)}] {name} seed {seed} ...")
        rows.append(run_variant(workspace, name, seed, experiment))
        print(
            ablation.progress(
                len(rows), len(runs), rows[-1], cfg.eval.ks, cfg.eval.primary, time.perf_counter() - start
            )
        )
    text = ablation.report(rows, seed_list, cfg.eval.ks)
    summary = ablation.summarise(rows)
    experiment_id = tracking.setup(paths.root, experiment, cfg.tracking.uri)
    with mlflow.start_run(
        experiment_id=experiment_id, run_name="ablation-summary", tags={"metarec.variant": "summary"}
    ):
        mlflow.log_params({"seeds": ",".join(map(str, seed_list)), "n_seeds": len(seed_list)})
        mlflow.log_metrics(ablation.summary_metrics(rows, cfg.eval.ks))
        with tempfile.TemporaryDirectory() as tmp:
            ablation.chart(rows, Path(tmp) / "ablations.png", cfg.eval.ks)
            mlflow.log_artifact(str(Path(tmp) / "ablations.png"))
        mlflow.log_text(text, "ablations.md")
        mlflow.log_dict({"seeds": seed_list, "summary": summary, "rows": rows}, "ablations.json")
    write_json(paths.root / "ablations.json", {"seeds": seed_list, "summary": summary, "rows": rows})
    (paths.root / "ablations.md").write_text(text + "\n", encoding="utf-8")
    return {"rows": rows, "summary": summary, "seeds": seed_list, "table": text, "experiment": experiment}
