"""MLflow tracking: the workspace's sqlite store, nested stage runs, config, data version and git commit."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

PARENT_ENV = "METAREC_PARENT_RUN_ID"
CODE_ROOT = Path(__file__).resolve().parents[1]


def tracking_uri(workspace: Path, configured: str = "") -> str:
    """Return the tracking URI: the configured one, else ``sqlite:///<workspace>/mlflow.db``."""
    return configured or f"sqlite:///{(Path(workspace).resolve() / 'mlflow.db').as_posix()}"


def artifact_root(workspace: Path) -> str:
    """Artifacts live beside the sqlite store so a workspace is self-contained."""
    return (Path(workspace).resolve() / "mlartifacts").as_uri()


def setup(workspace: Path, experiment: str, configured_uri: str = "") -> str:
    """Point MLflow at the workspace store and return the experiment id (created if missing)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(workspace, configured_uri))
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return str(found.experiment_id)
    # With the workspace's own store, artifacts live beside it; a configured server decides for itself.
    location = None if configured_uri else artifact_root(workspace)
    try:
        return str(mlflow.create_experiment(experiment, artifact_location=location))
    except Exception:  # another process created it between our lookup and create
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            raise
        return str(found.experiment_id)


def git_commit() -> str:
    """The code's git commit, suffixed ``-dirty`` when the tree has uncommitted changes."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(CODE_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(CODE_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def data_version(workspace: Path) -> dict[str, str]:
    """DVC content hashes of every stage output recorded in ``dvc.lock`` (path -> md5)."""
    lock = Path(workspace) / "dvc.lock"
    if not lock.exists():
        return {}
    data = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    versions: dict[str, str] = {}
    stages = list((data.get("stages") or {}).values())
    # A stage's recorded deps are what it last ran on, which may be older than what the producing
    # stage has written since (export runs on the new split after its lock entry was written); the
    # producing stage's outs are the current version, so they win over any dep.
    for kind in ("deps", "outs"):
        for stage in stages:
            for entry in stage.get(kind) or []:
                if "md5" in entry:
                    versions[entry["path"]] = entry["md5"]
    return versions


def log_config(flat: dict[str, Any]) -> None:
    """Log the flattened typed config as run params (lists and dicts as their JSON-ish text)."""
    import mlflow

    mlflow.log_params({k: ("null" if v is None else str(v))[:6000] for k, v in flat.items()})


def metric_name(name: str) -> str:
    """MLflow forbids ``@`` and ``=`` in metric names: ``ndcg@10`` becomes ``ndcg_at_10``."""
    return name.replace("@", "_at_").replace("=", "_").replace("+", "plus")


@contextlib.contextmanager
def stage_run(
    workspace: Path, stage: str, flat_config: dict[str, Any], experiment: str, uri: str = ""
) -> Iterator[Any]:
    """Open the MLflow run of one pipeline stage, nested under the flow's run when there is one."""
    import mlflow

    experiment_id = setup(workspace, experiment, uri)
    parent = os.environ.get(PARENT_ENV) or None
    tags = {"metarec.stage": stage, "metarec.git_commit": git_commit()}
    tags.update({f"metarec.data_version.{path}": md5 for path, md5 in data_version(workspace).items()})
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=stage,
        parent_run_id=parent,
        nested=parent is not None,
        tags=tags,
    ) as run:
        log_config(flat_config)
        yield run


@contextlib.contextmanager
def parent_run(
    workspace: Path,
    run_name: str,
    flat_config: dict[str, Any],
    experiment: str,
    uri: str = "",
    tags: dict[str, str] | None = None,
) -> Iterator[Any]:
    """Open the flow-level MLflow run that every stage's run nests under."""
    import mlflow

    experiment_id = setup(workspace, experiment, uri)
    all_tags = {"metarec.flow": run_name, "metarec.git_commit": git_commit(), **(tags or {})}
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags) as run:
        log_config(flat_config)
        yield run


def log_data_version(workspace: Path) -> None:
    """Tag the active run with the DVC hashes of the workspace's data and models."""
    import mlflow

    mlflow.set_tags({f"metarec.data_version.{p}": md5 for p, md5 in data_version(workspace).items()})


def log_run_summary(workspace: Path, metrics: dict[str, Any], outcomes: list[dict[str, Any]]) -> None:
    """Log the pipeline's headline metrics, which stages ran, and the data version on the active run."""
    import mlflow

    for part in ("valid", "test"):
        mlflow.log_metrics({metric_name(f"{part}.{k}"): float(v) for k, v in metrics.get(part, {}).items()})
    mlflow.set_tag("metarec.stages_run", ",".join(o["stage"] for o in outcomes if o["ran"]) or "none")
    mlflow.set_tag("metarec.stages_skipped", ",".join(o["stage"] for o in outcomes if not o["ran"]) or "none")
    log_data_version(workspace)
    # The stage runs hold these too, but a stage DVC skipped has no run this time: keep the parent
    # run self-explanatory either way.
    for path, folder in (
        ("data/processed/report.json", "data"),
        ("data/graph/schema.png", "graph"),
        ("data/split/stats.json", "data"),
        ("evaluation.json", "evaluation"),
    ):
        if (Path(workspace) / path).exists():
            mlflow.log_artifact(str(Path(workspace) / path), artifact_path=folder)
