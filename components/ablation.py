"""Ablations: the fusion model with one part removed at a time, next to the baselines, warm and cold.

Each variant is fitted on the workspace's stage outputs, evaluated on valid and test (warm protocol)
and refitted under the cold-item protocol; every variant is one MLflow run in the experiment
``<tracking.experiment>-ablations`` and a summary run holds the comparison table and plot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from components.core.config import Config


@dataclass(frozen=True)
class Variant:
    """One row of the ablation table."""

    name: str
    model: str  # metarec or a baseline name
    changes: dict[str, Any] = field(default_factory=dict)  # overrides of model.metarec
    frozen_text: bool = False  # the un-fine-tuned encoder's embeddings
    note: str = ""


VARIANTS = (
    Variant("metarec", "metarec", note="full model"),
    Variant("metarec-no-paths", "metarec", {"use_paths": False}, note="without metapath channels"),
    Variant("metarec-no-text", "metarec", {"use_text": False}, note="without text terms"),
    Variant("metarec-no-ids", "metarec", {"use_ids": False}, note="without item-ID factors"),
    Variant("metarec-frozen-text", "metarec", frozen_text=True, note="frozen (not fine-tuned) encoder"),
    Variant("pop", "pop", note="baseline"),
    Variant("itemknn", "itemknn", note="baseline"),
    Variant("bpr", "bpr", note="baseline"),
    Variant("ease", "ease", note="baseline"),
)


def variant_config(cfg: Config, variant: Variant) -> Config:
    """The workspace config with the variant's model and switches."""
    metarec = cfg.model.metarec.model_copy(update=variant.changes)
    model = cfg.model.model_copy(update={"name": variant.model, "metarec": metarec})
    return cfg.model_copy(update={"model": model})


def columns(ks: list[int]) -> list[tuple[str, str]]:
    """The table's (part, metric) columns for the evaluation cut-offs ``ks``."""
    low, high = min(ks), max(ks)
    return [
        ("valid", f"ndcg@{low}"),
        *(("test", f"ndcg@{k}") for k in ks),
        *(("test", f"recall@{k}") for k in ks),
        ("test", f"mrr@{low}"),
        ("cold", f"recall@{high}"),
        ("cold", f"ndcg@{low}"),
        ("mixed", f"ndcg@{low}"),
    ]


def table(rows: list[dict[str, Any]], ks: list[int] | None = None) -> str:
    """Markdown table of the ablation results (one row per variant)."""
    cols = columns(ks or [10, 20])
    head = "| variant | " + " | ".join(f"{part} {metric}" for part, metric in cols) + " |"
    sep = "|---|" + "---:|" * len(cols)
    lines = [head, sep]
    for row in rows:
        cells = []
        for part, metric in cols:
            value = (row.get(part) or {}).get(metric)
            cells.append("n/a" if value is None else f"{value:.4f}")
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], path: Any, ks: list[int] | None = None) -> None:
    """Grouped bars: test NDCG@k_min (warm) and Recall@k_max (cold items) per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low, high = min(ks or [10, 20]), max(ks or [10, 20])
    names = [r["variant"] for r in rows]
    warm = [(r.get("test") or {}).get(f"ndcg@{low}", np.nan) for r in rows]
    cold = [(r.get("cold") or {}).get(f"recall@{high}", np.nan) for r in rows]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.bar(x - 0.2, warm, 0.4, label=f"warm: test NDCG@{low}", color="#264653")
    ax.bar(x + 0.2, cold, 0.4, label=f"cold items: Recall@{high}", color="#e76f51")
    ax.set_xticks(x, names, rotation=25, ha="right")
    ax.set_title("metarec ablations: warm full ranking and the cold-item protocol")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
