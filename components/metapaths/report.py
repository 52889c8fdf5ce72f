"""Mining outputs: ``metapaths.json`` (every candidate, selected ones marked), features, a chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx
import pandas as pd

from components.core.storage import atomic_dir, read_json, write_json
from components.metapaths.schema import Metapath, parse

METAPATHS_FILE = "metapaths.json"
FEATURES_FILE = "candidates.parquet"
CHART_FILE = "metapaths.png"


def save(dest: Path, report: dict[str, Any], features: pd.DataFrame | None) -> None:
    """Write the report, the candidate features and the chart atomically into ``dest``."""
    with atomic_dir(dest) as tmp:
        write_json(tmp / METAPATHS_FILE, report)
        if features is not None:
            features.to_parquet(tmp / FEATURES_FILE, index=False)
        chart(report, tmp / CHART_FILE)


def load_selected(src: Path, schema: nx.MultiDiGraph) -> list[tuple[Metapath, float]]:
    """The selected metapaths with their combination weights, in selection order."""
    report = read_json(src / METAPATHS_FILE)
    return [(parse(entry["id"], schema), float(entry["weight"])) for entry in report["selected"]]


def table(report: dict[str, Any]) -> str:
    """A markdown table of all candidates, best validation NDCG first."""
    header = "| rank | metapath | length | ndcg@10 | recall@50 | user coverage | pair coverage | density |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    rows = sorted(report["candidates"], key=lambda r: -r["ndcg@10"])
    for row in rows:
        mark = f"**{row['selection_rank']}**" if row["selected"] else ""
        lines.append(
            f"| {mark} | {row['name']} | {row['length']} | {row['ndcg@10']:.4f} | {row['recall@50']:.4f} | "
            f"{row['user_coverage']:.2f} | {row['pair_coverage']:.2f} | {row['density']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path, top: int = 25) -> None:
    """Bar chart of the best candidates' validation NDCG@10, selected ones highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(report["candidates"], key=lambda r: -r["ndcg@10"])[:top][::-1]
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(rows) + 1.6))
    colors = ["#e76f51" if r["selected"] else "#8d99ae" for r in rows]
    ax.barh([r["name"] for r in rows], [r["ndcg@10"] for r in rows], color=colors)
    for y, r in enumerate(rows):
        note = f" #{r['selection_rank']} (w={r['weight']})" if r["selected"] else ""
        ax.annotate(
            f"{r['ndcg@10']:.3f}{note}  cov {r['user_coverage']:.2f}  dens {r['density']:.2f}",
            (r["ndcg@10"], y),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
        )
    pop = report.get("pop_valid_ndcg@10")
    if pop is not None:
        ax.axvline(pop, color="#264653", linestyle="--", linewidth=1, label=f"Pop {pop:.3f}")
    combined = report.get("combined_valid_ndcg@10")
    if combined is not None:
        ax.axvline(
            combined, color="#e76f51", linestyle=":", linewidth=1, label=f"selected set {combined:.3f}"
        )
    peak = max([r["ndcg@10"] for r in rows] + [v for v in (pop, combined) if v is not None])
    ax.set_xlim(0, peak * 1.45)  # room for the annotations right of the longest bar
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("validation NDCG@10 of the metapath's scores alone (full ranking)")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(f"metapath candidates ({report['weighting']}; selected in orange)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
