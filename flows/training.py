"""The ``training`` flow: drives the DVC stages as Prefect tasks inside one MLflow parent run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components import pipeline
from components.core import tracking
from components.core.config import Config
from components.core.workspace import Paths, read_metrics, workspace_config
from components.retrain import SplitReevaluator
from components.stages import STAGES
from registry import promotion


@task(name="prepare-workspace")
def prepare(workspace: str, overrides: list[str]) -> dict[str, Any]:
    """Create/refresh the workspace and return its validated config."""
    return pipeline.prepare_workspace(Path(workspace), overrides).model_dump(mode="json")


@task(name="dvc-stage", task_run_name="{stage}")
def run_stage(workspace: str, stage: str, parent_run_id: str) -> dict[str, Any]:
    """Run one DVC stage (skipped by DVC when nothing it depends on changed)."""
    logger = get_run_logger()
    # A line when a stale stage starts shows where a long run is (DVC captures the stage's own output).
    outcome = pipeline.repro_stage(
        Path(workspace), stage, parent_run_id, on_start=lambda: logger.info("stage %s: running", stage)
    )
    if not outcome.ran:
        state = "up to date, skipped"
    elif outcome.restored:
        state = f"restored from the DVC run cache in {outcome.seconds:.1f}s"
    else:
        state = f"ran in {outcome.seconds:.1f}s"
    if outcome.ran and outcome.peak_rss_mb is not None:
        state += f", peak RSS {outcome.peak_rss_mb:,.0f} MB"
    logger.info("stage %s: %s", stage, state)
    return {
        "stage": stage,
        "ran": outcome.ran,
        "seconds": round(outcome.seconds, 2),
        "peak_rss_mb": None if outcome.peak_rss_mb is None else round(outcome.peak_rss_mb, 1),
    }


# Fetching reaches PyPI: a transient network error deserves another try; the other stages are
# deterministic and a retry would only fail the same way.
fetch_stage = run_stage.with_options(retries=2, retry_delay_seconds=10)


# Registration is idempotent per training run, so a retry after a partial failure resumes it.
@task(name="register-and-gate", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def register(workspace: str, run_id: str, reevaluate: bool = False) -> dict[str, Any]:
    """Register the exported bundle as challenger, gate it against the champion, promote if it passes.

    With ``reevaluate`` (after a retrain) both are measured side by side on this workspace's split."""
    ws = Path(workspace)
    cfg = workspace_config(ws, missing_ok=True)
    measurer = SplitReevaluator(ws, cfg) if reevaluate else None
    outcome = promotion.register_and_gate(ws, Paths(ws).bundle, run_id, cfg, measurer)
    logger = get_run_logger()
    verdict = "promoted to champion" if outcome["promoted"] else "kept as challenger"
    logger.info("registered version %s (%s gate): %s", outcome["version"], outcome["gate"], verdict)
    for reason in outcome["reasons"]:
        logger.info("gate: %s", reason)
    return outcome


@flow(name="training", log_prints=True)
def training(workspace: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the DVC stages (fetch → … → evaluate, see STAGES) and return the run id and metrics."""
    cfg = Config.model_validate(prepare(workspace, overrides or []))
    root = Path(workspace)
    with tracking.parent_run(
        root,
        "training",
        cfg.flat(),
        cfg.tracking.experiment,
        cfg.tracking.uri,
        tags={"metarec.model": cfg.model.name},
    ) as run:
        outcomes = []
        for stage in STAGES:
            runner = fetch_stage if stage == "fetch" else run_stage
            outcomes.append(runner(workspace, stage, run.info.run_id))
        metrics = read_metrics(Paths(root))
        tracking.log_run_summary(root, metrics, outcomes)
    result: dict[str, Any] = {"run_id": run.info.run_id, "metrics": metrics, "stages": outcomes}
    # Only the fusion model exports a servable bundle; baselines are compared offline.
    if cfg.model.name == "metarec" and cfg.registry.enabled:
        result["registry"] = register(workspace, run.info.run_id)
    return result
