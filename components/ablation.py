"""Ablations: the fusion model with one part removed at a time, next to the baselines, warm and cold.

Each variant is fitted on the workspace's stage outputs, evaluated on valid and test (warm protocol)
and refitted under the cold-item protocol; every variant is one MLflow run in the experiment
``<tracking.experiment>-ablations`` and a summary run holds the comparison table and plot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from metarec.config import Config


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


TABLE_COLUMNS = (
    ("valid", "ndcg@10"),
    ("test", "ndcg@10"),
    ("test", "ndcg@20"),
    ("test", "recall@10"),
    ("test", "recall@20"),
    ("test", "mrr@10"),
    ("cold", "recall@20"),
    ("cold", "ndcg@10"),
    ("mixed", "ndcg@10"),
)


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the ablation results (one row per variant)."""
    head = "| variant | " + " | ".join(f"{part} {metric}" for part, metric in TABLE_COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(TABLE_COLUMNS)
    lines = [head, sep]
    for row in rows:
        cells = []
        for part, metric in TABLE_COLUMNS:
            value = (row.get(part) or {}).get(metric)
            cells.append("n/a" if value is None else f"{value:.4f}")
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], path: Any) -> None:
    """Grouped bars: test NDCG@10 (warm) and Recall@20 (cold items) per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    warm = [(r.get("test") or {}).get("ndcg@10", np.nan) for r in rows]
    cold = [(r.get("cold") or {}).get("recall@20", np.nan) for r in rows]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.bar(x - 0.2, warm, 0.4, label="warm: test NDCG@10", color="#264653")
    ax.bar(x + 0.2, cold, 0.4, label="cold items: Recall@20", color="#e76f51")
    ax.set_xticks(x, names, rotation=25, ha="right")
    ax.set_title("metarec ablations (ml-100k, user_temporal 80/10/10)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
