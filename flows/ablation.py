"""The ``ablations`` flow: one task per variant (fusion parts removed, baselines), one MLflow run each."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from components import ablation
from components.core import tracking
from components.core.storage import write_json
from components.core.workspace import Paths, workspace_config
from components.model.facade import evaluate_variant


def _flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    out = {}
    for part in ("valid", "test", "cold", "mixed"):
        for name, value in (result.get(part) or {}).items():
            out[f"{part}.{tracking.metric_name(name)}"] = float(value)
    for name, value in (result.get("cold_random") or {}).items():
        out[f"cold.{tracking.metric_name(name)}"] = float(value)
    out["fit_seconds"] = float(result["fit_seconds"])
    return out


@task(name="ablation-variant", task_run_name="{name}")
def run_variant(workspace: str, name: str, experiment: str) -> dict[str, Any]:
    """Fit and evaluate one variant inside its own MLflow run."""
    import mlflow

    paths = Paths(Path(workspace))
    base = workspace_config(paths.root)
    variant = next(v for v in ablation.VARIANTS if v.name == name)
    cfg = ablation.variant_config(base, variant)
    experiment_id = tracking.setup(paths.root, experiment, cfg.tracking.uri)
    tags = {"metarec.variant": name, "metarec.model": cfg.model.name}
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags):
        tracking.log_config(cfg.flat())
        mlflow.set_tags(
            {"metarec.variant.note": variant.note, "metarec.text.frozen": str(variant.frozen_text)}
        )
        result = evaluate_variant(paths, cfg, frozen=variant.frozen_text)
        mlflow.log_metrics(_flat_metrics(result))
    primary = cfg.eval.primary
    get_run_logger().info("%s: test %s %.4f", name, primary, result["test"][primary])
    return {"variant": name, **result}


@flow(name="ablations", log_prints=True)
def ablations(workspace: str, variants: list[str] | None = None) -> dict[str, Any]:
    """Run every ablation variant (or the named ones) and log a summary run with table and chart."""
    import mlflow

    paths = Paths(Path(workspace))
    cfg = workspace_config(paths.root)
    experiment = f"{cfg.tracking.experiment}-ablations"
    names = variants or [v.name for v in ablation.VARIANTS]
    unknown = sorted(set(names) - {v.name for v in ablation.VARIANTS})
    if unknown:
        raise ValueError(
            f"unknown variants {unknown}; expected some of {[v.name for v in ablation.VARIANTS]}"
        )
    rows = [run_variant(workspace, name, experiment) for name in names]
    text = ablation.table(rows, cfg.eval.ks)
    experiment_id = tracking.setup(paths.root, experiment, cfg.tracking.uri)
    with mlflow.start_run(
        experiment_id=experiment_id, run_name="ablation-summary", tags={"metarec.variant": "summary"}
    ):
        with tempfile.TemporaryDirectory() as tmp:
            ablation.chart(rows, Path(tmp) / "ablations.png", cfg.eval.ks)
            mlflow.log_artifact(str(Path(tmp) / "ablations.png"))
        mlflow.log_text(text, "ablations.md")
        mlflow.log_dict({"rows": rows}, "ablations.json")
    write_json(paths.root / "ablations.json", {"rows": rows})
    (paths.root / "ablations.md").write_text(text + "\n", encoding="utf-8")
    return {"rows": rows, "table": text}
