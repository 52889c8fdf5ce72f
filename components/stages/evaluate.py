"""Stage ``evaluate``: warm and cold metrics, ``metrics.json`` and ``evaluation.json``."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from components.core import tracking
from components.core.config import Config
from components.core.storage import write_json
from components.core.workspace import Paths
from components.evaluation import protocol as evaluate
from components.model.facade import cold_protocol, cold_refit_epochs, evaluate_warm, load_parts, load_trained
from components.stages.common import tracked_run


def run(paths: Paths, cfg: Config) -> dict[str, Any]:
    """Evaluate the trained model on valid and test; write metrics.json and log everything."""
    with tracked_run(paths, cfg, "evaluate"):
        import matplotlib.pyplot as plt
        import mlflow

        loaded = load_parts(paths)
        model = load_trained(paths.model)
        clock = time.perf_counter()
        results = evaluate_warm(model, loaded, cfg)
        # Where the stage's time goes, in the tracking UI: at scale each part is minutes.
        mlflow.log_metric("evaluate.seconds.rank_warm", time.perf_counter() - clock)
        summary: dict[str, Any] = {
            "model": cfg.model.name,
            "valid": results["valid"]["overall"],
            "test": results["test"]["overall"],
        }
        if cfg.eval.cold_fraction > 0:
            try:
                main_fit = getattr(model, "fit_summary", {})  # a baseline has none
                cold = cold_protocol(paths, cfg, loaded, epochs=cold_refit_epochs(cfg, main_fit))
            except ValueError as err:  # e.g. no test user on a cold item in a tiny dataset
                mlflow.set_tag("metarec.cold.skipped", str(err))
            else:
                results["cold"] = cold
                summary["cold"] = cold["cold"]["overall"]
                summary["mixed"] = cold["mixed"]
                summary["cold_valid"] = cold["cold_valid"]
                # How the cold figure was made: the registry compares cold figures only when alike.
                summary["cold_protocol"] = {"encoder_retuned": cold["encoder_retuned"], **cold["refit"]}
                mlflow.log_metrics({f"evaluate.seconds.{k}": v for k, v in cold["seconds"].items()})
                if cold["encoder_source"]:
                    mlflow.set_tag("metarec.cold.encoder_source", cold["encoder_source"])
                mlflow.log_metrics(
                    {f"cold.{tracking.metric_name(k)}": float(v) for k, v in cold["cold"]["overall"].items()}
                    | {
                        f"cold_valid.{tracking.metric_name(k)}": float(v)
                        for k, v in cold["cold_valid"].items()
                    }
                    | {f"mixed.{tracking.metric_name(k)}": float(v) for k, v in cold["mixed"].items()}
                )
        for part, result in ((p, results[p]) for p in ("valid", "test")):
            mlflow.log_metrics(
                {
                    tracking.metric_name(k): v
                    for k, v in evaluate.flat_metrics(result, part).items()
                    if np.isfinite(v)
                }
            )
        mlflow.set_tag("metarec.eval.blocks", cfg.eval.blocks().label)
        mlflow.log_dict(results, "evaluation.json")
        figure = slice_figure(results["test"], cfg.eval.primary, cfg.model.name)
        mlflow.log_figure(figure, "test_slices.png")
        plt.close(figure)
        # Files last: a failure above leaves the previous metrics and evaluation side by side.
        write_json(paths.evaluation, results)
        write_json(paths.metrics, summary)
        return summary


def slice_figure(result: dict[str, Any], metric: str, model: str) -> Any:
    """Bar chart of one metric overall and per slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["overall", *result["slices"]]
    values = [result["overall"][metric], *(result["slices"][s].get(metric, np.nan) for s in result["slices"])]
    users = [result["overall"]["n_users"], *(result["slices"][s]["n_users"] for s in result["slices"])]
    fig, ax = plt.subplots(figsize=(9, 4))
    bars = ax.bar(names, values, color=["#264653"] + ["#2a9d8f"] * (len(names) - 1))
    for bar, n in zip(bars, users, strict=True):
        ax.annotate(
            f"n={int(n)}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set(title=f"{model}: test {metric} by slice", ylabel=metric)
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    return fig
