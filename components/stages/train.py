"""Stage ``train``: fit the configured model and save it with its config."""

from __future__ import annotations

import time

from components.core.config import Config
from components.core.storage import atomic_dir, write_json
from components.core.workspace import Paths
from components.model.facade import fit_configured
from components.stages.common import tracked_run


def run(paths: Paths, cfg: Config) -> None:
    """Fit the configured model on the training part and save it with its config."""
    with tracked_run(paths, cfg, "train"):
        import mlflow

        start = time.perf_counter()
        model, summary = fit_configured(paths, cfg, log=True)
        if summary:  # the fusion model's fit summary (a baseline has none)
            mlflow.log_metrics(
                {
                    "train.best_epoch": summary["best_epoch"],
                    "train.epochs_run": summary["epochs_run"],
                    "train.fit_targets": summary["fit_targets"],
                }
            )
            mlflow.log_dict({k: v for k, v in summary.items()}, "train_summary.json")
            mlflow.set_tag("metarec.model.channels", " ; ".join(summary["channels"]))
        mlflow.log_metric("train.seconds", time.perf_counter() - start)
        with atomic_dir(paths.model) as tmp:
            model.save(tmp)
            write_json(tmp / "config.json", cfg.model_dump(mode="json"))
        mlflow.log_artifacts(str(paths.model), artifact_path="model")
