"""Stage ``ingest``: validate the raw files, write Parquet tables and the data report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from components.core.config import Config
from components.core.workspace import Paths
from components.data import ingest
from components.stages.common import deferred_run


def run(paths: Paths, cfg: Config) -> None:
    """Validate the raw files and write Parquet tables plus the data report."""
    with deferred_run(paths, cfg, "ingest") as run:
        report = ingest.ingest(paths.raw, cfg.data.name, paths.processed, cfg.data.duplicates)
        run.log_dict(report, "data_report.json")
        run.log_metrics(
            {
                "data.n_users": report["n_users"],
                "data.n_items": report["n_items"],
                "data.n_interactions": report["n_interactions"],
                "data.density": report["density"],
                "data.n_triples": report["n_triples"],
            }
        )
        run.log_figure(data_report_figure(paths.processed, report), "data_report.png")


def data_report_figure(processed: Path, report: dict[str, Any]) -> Any:
    """Histograms of interactions per user and per item, and triples per KG relation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inter = pd.read_parquet(processed / "interactions.parquet", columns=["user", "item"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    axes[0].hist(inter.groupby("user").size(), bins=50, color="#f4a261")
    axes[0].set(title="interactions per user", xlabel="interactions", ylabel="users", yscale="log")
    axes[1].hist(inter.groupby("item").size(), bins=50, color="#2a9d8f")
    axes[1].set(title="interactions per item", xlabel="interactions", ylabel="items", yscale="log")
    rel = report["triples_per_relation"]
    if rel:
        names = sorted(rel, key=rel.get)
        axes[2].barh([n.split(".", 1)[-1] for n in names], [rel[n] for n in names], color="#264653")
        axes[2].set(title="KG triples per relation", xscale="log")
        axes[2].tick_params(axis="y", labelsize=7)
    else:
        axes[2].text(0.5, 0.5, "no knowledge graph", ha="center")
        axes[2].axis("off")
    fig.suptitle(
        f"{report['dataset']}: {report['n_users']:,} users, {report['n_items']:,} items, "
        f"{report['n_interactions']:,} interactions (density {report['density']:.4f})"
    )
    fig.tight_layout()
    return fig
