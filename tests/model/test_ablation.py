"""Ablations: variants that remove one part each, seeds, the mean ± sd table, and the flow on the tiny
fusion workspace (one MLflow run per (variant, seed) plus a summary with table and chart)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from components import ablation
from components.ablation import VARIANTS, Variant, table, variant_config
from components.core.config import Config, MetarecConfig
from components.core.workspace import Paths
from tests.conftest import TrainedWorkspace

EXPECTED_VARIANTS = [
    "metarec",
    "metarec-no-mined-paths",
    "metarec-no-content-paths",
    "metarec-no-popularity",
    "metarec-no-ease",
    "metarec-no-channels",
    "metarec-with-text",
    "metarec-no-ids",
    "metarec-frozen-text",
    "metarec-no-attribute-bias",
    "metarec-language-gates",
    "metarec-both-gates",
    "metarec-text-to-id",
    "pop",
    "itemknn",
    "bpr",
    "ease",
]


def test_variant_config_flips_one_switch() -> None:
    cfg = Config()
    with_text = next(v for v in VARIANTS if v.name == "metarec-with-text")
    changed = variant_config(cfg, with_text)
    assert changed.model.name == "metarec" and changed.model.metarec.use_text is True
    assert changed.model.metarec.use_paths and changed.model.metarec.use_ids
    assert variant_config(cfg, Variant("pop", "pop")).model.name == "pop"
    assert cfg.model.metarec.use_text is False  # the base config is not mutated


def test_variants_remove_one_part_each() -> None:
    """Stable names; each fusion variant changes only its own keys of model.metarec, and validly."""
    assert [v.name for v in VARIANTS] == EXPECTED_VARIANTS
    cfg = Config()
    assert variant_config(cfg, VARIANTS[0]) == cfg  # the full model is the workspace's config
    full = cfg.model.metarec.model_dump()
    for variant in VARIANTS:
        changed = variant_config(cfg, variant)
        assert changed.model.name == variant.model
        if variant.model != "metarec":
            continue
        dumped = changed.model.metarec.model_dump()
        assert {k for k in full if dumped[k] != full[k]} == set(variant.changes), variant.name
        MetarecConfig.model_validate(dumped)  # a value the typed config accepts
    changes = {v.name: v.changes for v in VARIANTS}
    assert changes["metarec-no-mined-paths"] == {"use_mined_paths": False}
    assert changes["metarec-no-content-paths"] == {"content_paths": 0}
    assert changes["metarec-no-popularity"] == {"use_popularity": False}
    assert changes["metarec-no-ease"] == {"ease_l2": None}
    assert changes["metarec-no-channels"] == {"use_paths": False}
    assert changes["metarec-no-attribute-bias"] == {"attribute_bias": False}
    assert changes["metarec-language-gates"] == {"gates": "language"}
    assert changes["metarec-text-to-id"] == {"text_to_id": True}
    assert [v.name for v in VARIANTS if v.frozen_text] == ["metarec-frozen-text"]


def test_variant_config_sets_the_seed() -> None:
    cfg = Config()
    seeded = variant_config(cfg, VARIANTS[0], seed=7)
    assert seeded.seed == 7 and cfg.seed == 42
    assert seeded.model_copy(update={"seed": 42}) == cfg  # nothing else changed


def test_seed_list() -> None:
    assert ablation.seed_list(42) == [42]  # one seed: the workspace's, as before
    assert ablation.seed_list(42, 5) == [42, 43, 44, 45, 46]
    assert ablation.seed_list(42, 1, [3, 1]) == [3, 1]
    with pytest.raises(ValueError, match="not both"):
        ablation.seed_list(42, 2, [3])
    with pytest.raises(ValueError, match="at least 1"):
        ablation.seed_list(42, 0)
    with pytest.raises(ValueError, match="repeat"):
        ablation.seed_list(42, 1, [3, 3])


def test_select_and_plan() -> None:
    assert [v.name for v in ablation.select(None)] == EXPECTED_VARIANTS
    chosen = ablation.select(["pop", "metarec", "pop"])
    assert [v.name for v in chosen] == ["pop", "metarec"]
    with pytest.raises(ValueError, match="unknown variants"):
        ablation.select(["metarec-no-paths"])
    # Every (variant, seed) once, seed by seed.
    assert ablation.plan(chosen, [1, 2]) == [("pop", 1), ("metarec", 1), ("pop", 2), ("metarec", 2)]


def _row(variant: str, seed: int, **parts: dict[str, float]) -> dict[str, Any]:
    return {"variant": variant, "seed": seed, "fit_seconds": 1.0, **parts}


TINY_ROWS = [
    _row(
        "A",
        1,
        valid={"ndcg@5": 0.10},
        test={"ndcg@5": 0.20, "recall@5": 0.30},
        cold={"recall@5": 0.5, "ndcg@5": 0.1},
        cold_valid={"recall@5": 0.4},
    ),
    _row("B", 1, test={"ndcg@5": 0.05}),
    _row("A", 2, valid={"ndcg@5": 0.12}, test={"ndcg@5": 0.26, "recall@5": 0.30}, cold={"ndcg@5": 0.2}),
]


def test_table_is_mean_and_sd_over_seeds() -> None:
    """Hand-computed: mean ± sample sd (ddof 1); one value alone; no value n/a."""
    expected = "\n".join(
        [
            "| variant | seeds | valid ndcg@5 | test ndcg@5 | test recall@5 | test mrr@5 "
            "| cold_valid recall@5 | cold recall@5 | cold ndcg@5 | mixed ndcg@5 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            "| A | 2 | 0.1100 ± 0.0141 | 0.2300 ± 0.0424 | 0.3000 ± 0.0000 | n/a | 0.4000 | 0.5000 "
            "| 0.1500 ± 0.0707 | n/a |",
            "| B | 1 | n/a | 0.0500 | n/a | n/a | n/a | n/a | n/a | n/a |",
        ]
    )
    assert table(TINY_ROWS, [5]) == expected


def test_table_marks_missing_values() -> None:
    text = table([{"variant": "x", "seed": 0, "test": {"ndcg@10": 0.1234}}], [10, 20])
    assert "| x | 1 | n/a | 0.1234 | n/a |" in text


def test_summaries_and_metrics() -> None:
    summary = {s["variant"]: s for s in ablation.summarise(TINY_ROWS)}
    assert summary["A"]["seeds"] == [1, 2] and summary["A"]["n_seeds"] == 2
    assert summary["A"]["mean"]["test"]["ndcg@5"] == pytest.approx(0.23)
    assert summary["A"]["sd"]["test"]["ndcg@5"] == pytest.approx(np.std([0.20, 0.26], ddof=1))
    assert summary["B"]["sd"]["test"]["ndcg@5"] is None
    metrics = ablation.summary_metrics(TINY_ROWS, [5])
    assert metrics["A.test.ndcg_at_5.mean"] == pytest.approx(0.23)
    assert "B.test.ndcg_at_5.sd" not in metrics and "B.test.ndcg_at_5.mean" in metrics
    report = ablation.report(TINY_ROWS, [1, 2], [5])
    assert report.startswith("Ablations: 2 seed(s) (1, 2); each cell is the mean ± sample sd over seeds.")
    assert report.endswith(table(TINY_ROWS, [5]))
    flat = ablation.run_metrics({**TINY_ROWS[0], "cold_random": {"random_recall@5": 0.25}})
    assert flat == {
        "valid.ndcg_at_5": 0.10,
        "test.ndcg_at_5": 0.20,
        "test.recall_at_5": 0.30,
        "cold.recall_at_5": 0.5,
        "cold.ndcg_at_5": 0.1,
        "cold.random_recall_at_5": 0.25,
        "cold_valid.recall_at_5": 0.4,
        "fit_seconds": 1.0,
    }
    line = ablation.progress(2, 4, {**TINY_ROWS[0], "fit_seconds": 12.3}, [5], "ndcg@5", 120.0)
    assert line == (
        "[2/4] A seed 1: test ndcg@5 0.2000, cold recall@5 0.5000 (12 s warm fit; 2.0 min so far, "
        "about 2.0 min left)"
    )


def _synthetic_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 40-user × 30-item split in place of a workspace's (``facade.load_parts``)."""
    from components.evaluation.protocol import EvalData
    from components.model import facade

    rng = np.random.default_rng(0)
    seen = rng.random((40, 30)) < 0.3
    held = ~seen & (rng.random(seen.shape) < 0.15)
    in_test = rng.random(seen.shape) < 0.5
    train, valid, test = (
        sp.csr_matrix(m.astype(np.float32)) for m in (seen, held & ~in_test, held & in_test)
    )
    loaded = facade.Loaded(pd.DataFrame(), pd.DataFrame(), EvalData(train, valid, test))
    monkeypatch.setattr(facade, "load_parts", lambda paths: loaded)


def test_seed_changes_model_and_cold_draw_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Across seeds the warm split is the same; the cold items and a stochastic model's fit change."""
    from components.evaluation import coldstart
    from components.model.facade import evaluate_variant

    _synthetic_parts(monkeypatch)
    drawn: list[tuple[int, list[int], int]] = []
    original = coldstart.cold_item_split

    def spy(train: Any, valid: Any, test: Any, fraction: float, seed: int) -> coldstart.ColdSplit:
        cold = original(train, valid, test, fraction, seed)
        drawn.append((seed, cold.cold_items.tolist(), int(train.nnz)))
        return cold

    monkeypatch.setattr(coldstart, "cold_item_split", spy)
    base = Config.model_validate(
        {"eval": {"ks": [5, 10], "primary": "ndcg@5", "cold_fraction": 0.2}, "model": {"bpr": {"epochs": 3}}}
    )
    paths = Paths(tmp_path)
    results = {}
    for name in ("pop", "bpr"):
        for seed in (1, 2):
            cfg = variant_config(base, ablation.select([name])[0], seed)
            results[name, seed] = evaluate_variant(paths, cfg)
    assert [d[0] for d in drawn] == [1, 2, 1, 2]
    assert drawn[0][1] != drawn[1][1] and drawn[0][1] == drawn[2][1]  # the cold draw follows the seed
    assert len({d[2] for d in drawn}) == 1  # ... from the same warm training part
    # A deterministic model's warm results do not depend on the seed; BPR's initialisation does.
    assert results["pop", 1]["test"] == results["pop", 2]["test"]
    assert results["pop", 1]["cold"] != results["pop", 2]["cold"]
    assert results["bpr", 1]["test"] != results["bpr", 2]["test"]


def test_flow_wires_seeds_runs_and_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: None
) -> None:
    """The flow without fitting anything: (variant, seed) runs, tags, progress and the summary files."""
    import json
    import shutil

    import mlflow

    import flows.ablation as flow_module
    from components.core import tracking
    from tests.conftest import PROJECT_ROOT

    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(PROJECT_ROOT / "params.yaml", ws / "params.yaml")
    calls: list[tuple[str, int, bool]] = []

    def fake(paths: Paths, cfg: Config, frozen: bool = False) -> dict[str, Any]:
        calls.append((cfg.model.name, cfg.seed, frozen))
        value = 0.1 + (cfg.seed - 42) / 100
        return {
            "fit_seconds": 0.5,
            "valid": {"ndcg@10": value},
            "test": {"ndcg@10": value, "recall@20": 2 * value},
            "cold": {"recall@20": 0.3},
            "cold_random": {"random_recall@20": 0.12},
            "mixed": {"ndcg@10": value},
            "best_epoch": 3,
        }

    monkeypatch.setattr(flow_module, "evaluate_variant", fake)
    result = flow_module.ablations(workspace=str(ws), variants=["metarec-frozen-text", "pop"], n_seeds=2)
    assert result["seeds"] == [42, 43] and result["experiment"] == "metarec-ablations"
    assert calls == [("metarec", 42, True), ("pop", 42, False), ("metarec", 43, True), ("pop", 43, False)]
    assert "| metarec-frozen-text | 2 | 0.1050 ± 0.0071 |" in result["table"]
    assert (ws / "ablations.md").read_text(encoding="utf-8") == result["table"] + "\n"
    saved = json.loads((ws / "ablations.json").read_text(encoding="utf-8"))
    assert saved["seeds"] == [42, 43] and len(saved["rows"]) == 4
    assert [s["n_seeds"] for s in saved["summary"]] == [2, 2]
    mlflow.set_tracking_uri(tracking.tracking_uri(ws))
    runs = mlflow.search_runs(experiment_names=["metarec-ablations"], output_format="list")
    tagged = {(r.data.tags["metarec.variant"], r.data.tags.get("metarec.seed")) for r in runs}
    assert tagged == {
        ("metarec-frozen-text", "42"),
        ("metarec-frozen-text", "43"),
        ("pop", "42"),
        ("pop", "43"),
        ("summary", None),
    }
    summary = next(r for r in runs if r.info.run_name == "ablation-summary")
    assert summary.data.metrics["pop.test.ndcg_at_10.mean"] == pytest.approx(0.105)
    run = next(r for r in runs if r.info.run_name == "pop-seed43")
    assert run.data.params["seed"] == "43" and run.data.metrics["test.ndcg_at_10"] == pytest.approx(0.11)


def test_ablation_flow_logs_a_run_per_variant_and_seed(
    metarec_workspace: TrainedWorkspace, prefect_harness: None
) -> None:
    import mlflow

    from components.core import tracking
    from flows.ablation import ablations

    metarec_workspace.check()
    ws: Path = metarec_workspace.path
    # Two seeds whose cold draw (2 of the tiny dataset's 8 items) includes an item with test users.
    result = ablations(workspace=str(ws), variants=["metarec-no-mined-paths", "pop"], seeds=[42, 44])
    assert result["seeds"] == [42, 44]
    runs_by_key = {(row["variant"], row["seed"]): row for row in result["rows"]}
    assert set(runs_by_key) == {(v, s) for v in ("metarec-no-mined-paths", "pop") for s in (42, 44)}
    for row in runs_by_key.values():
        assert 0.0 <= row["test"]["ndcg@5"] <= 1.0
        assert "cold" in row and "mixed" in row
    assert [s["n_seeds"] for s in result["summary"]] == [2, 2]
    text = (ws / "ablations.md").read_text()
    assert "| metarec-no-mined-paths | 2 |" in text and " ± " in text
    mlflow.set_tracking_uri(tracking.tracking_uri(ws))
    runs = mlflow.search_runs(experiment_names=["metarec-ablations"], output_format="list")
    names = {r.info.run_name for r in runs}
    expected = {"metarec-no-mined-paths-seed42", "metarec-no-mined-paths-seed44", "pop-seed42", "pop-seed44"}
    assert expected | {"ablation-summary"} <= names
    summary = next(r for r in runs if r.info.run_name == "ablation-summary")
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(summary.info.run_id)}
    assert {"ablations.png", "ablations.md", "ablations.json"} <= artifacts
    assert summary.data.params["n_seeds"] == "2"
    no_mined = next(r for r in runs if r.info.run_name == "metarec-no-mined-paths-seed44")
    assert no_mined.data.params["model.metarec.use_mined_paths"] == "False"
    assert no_mined.data.params["seed"] == "44"
    assert no_mined.data.tags["metarec.variant"] == "metarec-no-mined-paths"
    assert no_mined.data.tags["metarec.seed"] == "44"
