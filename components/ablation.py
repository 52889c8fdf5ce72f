"""Ablations: the fusion model with one part removed at a time, next to the baselines, warm and cold.

Each variant is fitted on the workspace's stage outputs, evaluated on valid and test (warm protocol)
and refitted under the cold-item protocol, once per seed. The seed is the model's initialisation and
training seed and the cold-item protocol's draw of cold items; the warm split is the workspace's
(temporal, no randomness), the same for every seed. Every (variant, seed) is one MLflow run in the
experiment ``<tracking.experiment>-ablations``, and a summary run holds the table (mean ± sd over
seeds per variant) and plot.

The fusion's parts, each removed alone: the mined metapaths, the KG content paths, the popularity
channel, the EASE channel (together: every channel), the text terms, the item-ID factors, the
item-metadata bias and the encoder's fine-tuning; the options that validation left off (channel
weights chosen by the language model, alone or with the learned ones; cold items' ID factors from
text); plus the baselines, EASE alone among them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from components.core.config import Config
from components.core.tracking import metric_name


@dataclass(frozen=True)
class Variant:
    """One row of the ablation table."""

    name: str
    model: str  # metarec or a baseline name
    changes: dict[str, Any] = field(default_factory=dict)  # overrides of model.metarec
    frozen_text: bool = False  # the un-fine-tuned encoder's embeddings
    note: str = ""


VARIANTS = (
    Variant(
        "metarec",
        "metarec",
        note="full model: mined + KG content paths, popularity and EASE channels with gates from fine-tuned "
        "text, metadata bias, IDs",
    ),
    Variant(
        "metarec-no-mined-paths",
        "metarec",
        {"use_mined_paths": False},
        note="without the mined metapaths (KG content paths, popularity, EASE kept)",
    ),
    Variant("metarec-no-content-paths", "metarec", {"content_paths": 0}, note="without the KG content paths"),
    Variant(
        "metarec-no-popularity", "metarec", {"use_popularity": False}, note="without the popularity channel"
    ),
    Variant("metarec-no-ease", "metarec", {"ease_l2": None}, note="fusion without the EASE channel"),
    Variant(
        "metarec-no-channels",
        "metarec",
        {"use_paths": False},
        note="without any channel (mined + content paths, popularity, EASE): metadata and ID terms only",
    ),
    Variant(
        "metarec-with-text",
        "metarec",
        {"use_text": True},
        note="with the bilinear text term and text bias (off by default)",
    ),
    Variant("metarec-no-ids", "metarec", {"use_ids": False}, note="without item-ID factors"),
    Variant("metarec-frozen-text", "metarec", frozen_text=True, note="frozen (not fine-tuned) encoder"),
    Variant(
        "metarec-no-attribute-bias",
        "metarec",
        {"attribute_bias": False},
        note="without the item-metadata (genre, year) bias",
    ),
    Variant(
        "metarec-language-gates",
        "metarec",
        {"gates": "language"},
        note="channel weights set by the language model (user text vs verbalised metapath), not learned",
    ),
    Variant(
        "metarec-both-gates",
        "metarec",
        {"gates": "both"},
        note="channel weights learned freely plus the language model's match",
    ),
    Variant(
        "metarec-text-to-id",
        "metarec",
        {"text_to_id": True},
        note="with cold items' ID factors mapped from their text (off by default)",
    ),
    Variant("pop", "pop", note="baseline"),
    Variant("itemknn", "itemknn", note="baseline"),
    Variant("bpr", "bpr", note="baseline"),
    Variant("ease", "ease", note="baseline: EASE alone (model.ease.l2)"),
)

#: The result parts whose metrics are averaged over seeds.
PARTS = ("valid", "test", "cold", "cold_random", "cold_valid", "mixed")


def select(names: Sequence[str] | None = None) -> list[Variant]:
    """The named variants in the order given (every variant when ``names`` is empty or None)."""
    if not names:
        return list(VARIANTS)
    known = {v.name: v for v in VARIANTS}
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; expected some of {list(known)}")
    return [known[name] for name in dict.fromkeys(names)]


def seed_list(base: int, n: int = 1, explicit: Sequence[int] | None = None) -> list[int]:
    """The seeds to run: ``explicit`` if given, else ``base, base + 1, …`` (``n`` of them).

    ``n=1`` is the workspace's own ``seed`` alone, a single run per variant as before seeds existed.
    """
    if explicit:
        if n != 1:
            raise ValueError("give either a number of seeds or an explicit seed list, not both")
        seeds = [int(s) for s in explicit]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat: {seeds}")
        return seeds
    if n < 1:
        raise ValueError(f"the number of seeds must be at least 1, got {n}")
    return [base + i for i in range(n)]


def plan(variants: Sequence[Variant], seeds: Sequence[int]) -> list[tuple[str, int]]:
    """Every (variant, seed) once, seed by seed: after the first seed every variant has a result."""
    return [(v.name, seed) for seed in seeds for v in variants]


def variant_config(cfg: Config, variant: Variant, seed: int | None = None) -> Config:
    """The workspace config with the variant's model and switches (and ``seed``, when given)."""
    metarec = cfg.model.metarec.model_copy(update=variant.changes)
    model = cfg.model.model_copy(update={"name": variant.model, "metarec": metarec})
    update: dict[str, Any] = {"model": model}
    if seed is not None:
        update["seed"] = seed
    return cfg.model_copy(update=update)


def run_name(variant: str, seed: int) -> str:
    """The MLflow run name of one (variant, seed)."""
    return f"{variant}-seed{seed}"


def run_tags(variant: Variant, cfg: Config) -> dict[str, str]:
    """The MLflow tags of one (variant, seed) run (``cfg`` from :func:`variant_config`)."""
    return {
        "metarec.variant": variant.name,
        "metarec.seed": str(cfg.seed),
        "metarec.model": cfg.model.name,
        "metarec.variant.note": variant.note,
        "metarec.text.frozen": str(variant.frozen_text),
    }


def run_metrics(result: dict[str, Any]) -> dict[str, float]:
    """One run's results as flat MLflow metrics (``test.ndcg_at_10``; chance levels under ``cold.``)."""
    out = {}
    for part in ("valid", "test", "cold", "cold_valid", "mixed"):
        for name, value in (result.get(part) or {}).items():
            out[f"{part}.{metric_name(name)}"] = float(value)
    for name, value in (result.get("cold_random") or {}).items():
        out[f"cold.{metric_name(name)}"] = float(value)
    out["fit_seconds"] = float(result["fit_seconds"])
    return out


def columns(ks: list[int]) -> list[tuple[str, str]]:
    """The table's (part, metric) columns for the evaluation cut-offs ``ks``."""
    low, high = min(ks), max(ks)
    return [
        ("valid", f"ndcg@{low}"),
        *(("test", f"ndcg@{k}") for k in ks),
        *(("test", f"recall@{k}") for k in ks),
        ("test", f"mrr@{low}"),
        ("cold_valid", f"recall@{high}"),
        ("cold", f"recall@{high}"),
        ("cold", f"ndcg@{low}"),
        ("mixed", f"ndcg@{low}"),
    ]


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1; None for a single value)."""
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant (in first-seen order), the mean and sample sd over its seeds of every metric.

    ``rows`` are per-run results (``variant``, ``seed``, and parts such as ``test`` mapping metric
    names to values). Each summary has ``variant``, ``seeds``, ``n_seeds``, and ``mean``/``sd`` as
    ``{part: {metric: value}}`` plus ``fit_seconds``; ``sd`` is None with a single seed. A metric
    missing from some runs is averaged over the runs that have it.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["variant"], []).append(row)
    out = []
    for name, runs in groups.items():
        mean: dict[str, Any] = {}
        sd: dict[str, Any] = {}
        for part in PARTS:
            metrics = dict.fromkeys(m for r in runs for m in (r.get(part) or {}))
            for metric in metrics:
                values = [float(r[part][metric]) for r in runs if metric in (r.get(part) or {})]
                m, s = _mean_sd(values)
                mean.setdefault(part, {})[metric] = m
                sd.setdefault(part, {})[metric] = s
        fits = [float(r["fit_seconds"]) for r in runs if r.get("fit_seconds") is not None]
        if fits:
            mean["fit_seconds"], sd["fit_seconds"] = _mean_sd(fits)
        seeds = [r.get("seed") for r in runs]
        out.append({"variant": name, "seeds": seeds, "n_seeds": len(runs), "mean": mean, "sd": sd})
    return out


def _cell(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.4f}" if sd is None else f"{mean:.4f} ± {sd:.4f}"


def table(rows: list[dict[str, Any]], ks: list[int] | None = None) -> str:
    """Markdown table of per-run ``rows``: one line per variant, mean ± sample sd over its seeds.

    A variant run with one seed shows the value alone; a metric no run has shows ``n/a``.
    """
    cols = columns(ks or [10, 20])
    head = "| variant | seeds | " + " | ".join(f"{part} {metric}" for part, metric in cols) + " |"
    sep = "|---|---:|" + "---:|" * len(cols)
    lines = [head, sep]
    for summary in summarise(rows):
        cells = [
            _cell(summary["mean"].get(part, {}).get(metric), summary["sd"].get(part, {}).get(metric))
            for part, metric in cols
        ]
        lines.append(f"| {summary['variant']} | {summary['n_seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(rows: list[dict[str, Any]], seeds: Sequence[int], ks: list[int] | None = None) -> str:
    """``ablations.md``: what the cells are, then :func:`table`."""
    listed = ", ".join(str(s) for s in seeds)
    spread = "mean ± sample sd over seeds" if len(seeds) > 1 else "one seed"
    return (
        f"Ablations: {len(seeds)} seed(s) ({listed}); each cell is the {spread}. The seed sets the "
        "model's initialisation and training and the cold-item protocol's draw of cold items; "
        "the warm split is the same for every seed.\n\n" + table(rows, ks)
    )


def summary_metrics(rows: list[dict[str, Any]], ks: list[int] | None = None) -> dict[str, float]:
    """The table's cells as MLflow metrics of the summary run: ``<variant>.<part>.<metric>.mean``/``.sd``."""
    out: dict[str, float] = {}
    for summary in summarise(rows):
        for part, metric in columns(ks or [10, 20]):
            mean = summary["mean"].get(part, {}).get(metric)
            sd = summary["sd"].get(part, {}).get(metric)
            key = f"{summary['variant']}.{part}.{metric_name(metric)}"
            if mean is not None:
                out[f"{key}.mean"] = float(mean)
            if sd is not None:
                out[f"{key}.sd"] = float(sd)
    return out


def progress(done: int, total: int, row: dict[str, Any], ks: list[int], primary: str, elapsed: float) -> str:
    """One line after run ``done`` of ``total``: its warm and cold headline figures and time left."""
    high = max(ks)
    test = (row.get("test") or {}).get(primary)
    cold = (row.get("cold") or {}).get(f"recall@{high}")
    parts = [f"test {primary} {'n/a' if test is None else f'{test:.4f}'}"]
    if cold is not None:
        parts.append(f"cold recall@{high} {cold:.4f}")
    left = elapsed / done * (total - done)
    return (
        f"[{done}/{total}] {row['variant']} seed {row['seed']}: {', '.join(parts)} "
        f"({row.get('fit_seconds', 0.0):.0f} s warm fit; {elapsed / 60:.1f} min so far, "
        f"about {left / 60:.1f} min left)"
    )


def chart(rows: list[dict[str, Any]], path: Any, ks: list[int] | None = None) -> None:
    """Grouped bars (mean, sd as error bars): test NDCG@k_min (warm) and Recall@k_max (cold items)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low, high = min(ks or [10, 20]), max(ks or [10, 20])
    summaries = summarise(rows)
    names = [s["variant"] for s in summaries]

    def series(part: str, metric: str) -> tuple[list[float], list[float]]:
        means = [s["mean"].get(part, {}).get(metric) for s in summaries]
        sds = [s["sd"].get(part, {}).get(metric) for s in summaries]
        return (
            [np.nan if m is None else m for m in means],
            [0.0 if d is None else d for d in sds],
        )

    warm, warm_sd = series("test", f"ndcg@{low}")
    cold, cold_sd = series("cold", f"recall@{high}")
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(13, 4.8))
    ax.bar(x - 0.2, warm, 0.4, yerr=warm_sd, capsize=2, label=f"warm: test NDCG@{low}", color="#264653")
    ax.bar(x + 0.2, cold, 0.4, yerr=cold_sd, capsize=2, label=f"cold items: Recall@{high}", color="#e76f51")
    ax.set_xticks(x, names, rotation=30, ha="right")
    n = max((s["n_seeds"] for s in summaries), default=1)
    ax.set_title(f"metarec ablations: warm full ranking and the cold-item protocol (mean ± sd, {n} seed(s))")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
