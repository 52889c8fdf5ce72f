"""Ablations on the tiny fusion workspace: one MLflow run per variant plus a summary with table and chart."""

from __future__ import annotations

from pathlib import Path

from components.ablation import VARIANTS, Variant, table, variant_config
from components.core.config import Config
from tests.conftest import TrainedWorkspace


def test_variant_config_flips_one_switch() -> None:
    cfg = Config()
    no_text = next(v for v in VARIANTS if v.name == "metarec-no-text")
    changed = variant_config(cfg, no_text)
    assert changed.model.name == "metarec" and changed.model.metarec.use_text is False
    assert changed.model.metarec.use_paths and changed.model.metarec.use_ids
    assert variant_config(cfg, Variant("pop", "pop")).model.name == "pop"
    assert cfg.model.metarec.use_text is True  # the base config is not mutated


def test_table_marks_missing_values() -> None:
    text = table([{"variant": "x", "test": {"ndcg@10": 0.1234}}], [10, 20])
    assert "| x | n/a | 0.1234 | n/a |" in text


def test_ablation_flow_logs_a_run_per_variant(
    metarec_workspace: TrainedWorkspace, prefect_harness: None
) -> None:
    import mlflow

    from components.core import tracking
    from flows.ablation import ablations

    metarec_workspace.check()
    ws: Path = metarec_workspace.path
    result = ablations(workspace=str(ws), variants=["metarec-no-paths", "pop"])
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"metarec-no-paths", "pop"}
    for row in rows.values():
        assert 0.0 <= row["test"]["ndcg@5"] <= 1.0
        assert "cold" in row and "mixed" in row
    assert (ws / "ablations.md").read_text().count("\n") >= 3
    mlflow.set_tracking_uri(tracking.tracking_uri(ws))
    runs = mlflow.search_runs(experiment_names=["metarec-ablations"], output_format="list")
    names = {r.info.run_name for r in runs}
    assert {"metarec-no-paths", "pop", "ablation-summary"} <= names
    summary = next(r for r in runs if r.info.run_name == "ablation-summary")
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(summary.info.run_id)}
    assert {"ablations.png", "ablations.md"} <= artifacts
    no_paths = next(r for r in runs if r.info.run_name == "metarec-no-paths")
    assert no_paths.data.params["model.metarec.use_paths"] == "False"
