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
CODE_ROOT = Path(__file__).resolve().parents[2]


def configured_uri(configured: str = "") -> str:
    """The tracking server's URI: ``METAREC_TRACKING_URI[_FILE]`` when set, else ``configured`` ("": none)."""
    from components.core.secrets import tracking_uri as from_env

    return from_env(configured)


def tracking_uri(workspace: Path, configured: str = "") -> str:
    """Return the tracking URI: the environment's or configured one, else ``sqlite:///<workspace>/mlflow.db``.

    It may hold credentials (from the environment): print or log it only through
    ``components.core.secrets.redact_url``.
    """
    return configured_uri(configured) or f"sqlite:///{(Path(workspace).resolve() / 'mlflow.db').as_posix()}"


def artifact_root(workspace: Path) -> str:
    """Artifacts live beside the sqlite store so a workspace is self-contained."""
    return (Path(workspace).resolve() / "mlartifacts").as_uri()


def setup(workspace: Path, experiment: str, configured: str = "") -> str:
    """Point MLflow at the workspace store and return the experiment id (created if missing)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(workspace, configured))
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return str(found.experiment_id)
    # With the workspace's own store, artifacts live beside it; a configured server decides for itself.
    location = None if configured_uri(configured) else artifact_root(workspace)
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
    # Time and peak memory of each stage that ran: the growth curve across dataset sizes (issue 17).
    stages = {f"stage.{o['stage']}.seconds": float(o["seconds"]) for o in outcomes if o["ran"]}
    stages |= {
        f"stage.{o['stage']}.peak_rss_mb": float(o["peak_rss_mb"])
        for o in outcomes
        if o["ran"] and o.get("peak_rss_mb") is not None
    }
    mlflow.log_metrics(stages)
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


# ---- deferred stage runs --------------------------------------------------------------------------
# The data stages (fetch, ingest, build_kg, split) do seconds of work; importing MLflow and opening its
# store would cost more than the work itself. They write what they log to the workspace instead, and
# whoever has MLflow loaded already (the flow, or the stage itself when run by hand) logs it.

RECORDS_DIR = ".metarec/stage-runs"


def stage_record_dir(workspace: Path, stage: str) -> Path:
    """Where a stage's deferred run waits to be logged (``record.json`` plus its files)."""
    return Path(workspace) / RECORDS_DIR / stage


class StageRecord:
    """What one stage logs (params, metrics, JSON, figures, files), kept on disk until it is logged."""

    def __init__(self, workspace: Path, stage: str) -> None:
        self.workspace = Path(workspace)
        self.stage = stage
        self.dir = stage_record_dir(workspace, stage)
        self.params: dict[str, str] = {}
        self.metrics: dict[str, float] = {}
        self.files: list[tuple[str, str | None]] = []  # (path, artifact_path)
        self.started = 0.0
        self.status = "FINISHED"
        self.error = ""

    def log_param(self, key: str, value: Any) -> None:
        self.params[key] = str(value)

    def log_metrics(self, values: dict[str, float]) -> None:
        self.metrics.update({k: float(v) for k, v in values.items()})

    def log_dict(self, data: Any, name: str) -> None:
        import json

        path = self.dir / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
        self.files.append((str(path), str(Path(name).parent) if Path(name).parent != Path(".") else None))

    def log_figure(self, fig: Any, name: str) -> None:
        import matplotlib.pyplot as plt

        path = self.dir / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        self.files.append((str(path), None))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.files.append((str(Path(path).resolve()), artifact_path))

    def save(self, ended: float) -> None:
        import json

        self.dir.mkdir(parents=True, exist_ok=True)
        record = {
            "stage": self.stage,
            "params": self.params,
            "metrics": self.metrics,
            "files": self.files,
            "status": self.status,
            "error": self.error[:5000],
            "start_ms": int(self.started * 1000),
            "end_ms": int(ended * 1000),
        }
        (self.dir / "record.json").write_text(json.dumps(record), encoding="utf-8")


@contextlib.contextmanager
def deferred_stage_run(
    workspace: Path, stage: str, flat_config: dict[str, Any], experiment: str, uri: str = ""
) -> Iterator[StageRecord]:
    """A stage run logged later: by the flow (``flush_stage_run``) or, when run by hand, at its end."""
    import shutil
    import time

    record = StageRecord(workspace, stage)
    shutil.rmtree(record.dir, ignore_errors=True)  # an earlier attempt's record is not this run's
    record.started = time.time()
    try:
        yield record
    except BaseException as exc:
        # Failed runs are kept, as MLflow would have: the UI shows which stage broke and why.
        record.status, record.error = "FAILED", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        record.save(time.time())
        if not os.environ.get(PARENT_ENV):
            flush_stage_run(workspace, stage, None, flat_config, experiment, uri)


def flush_stage_run(
    workspace: Path,
    stage: str,
    parent_run_id: str | None,
    flat_config: dict[str, Any],
    experiment: str,
    uri: str = "",
) -> str | None:
    """Log a stage's deferred record as its MLflow run (nested under ``parent_run_id``); return the run id."""
    import json
    import shutil

    folder = stage_record_dir(workspace, stage)
    path = folder / "record.json"
    if not path.exists():
        return None
    import mlflow
    from mlflow.entities import Metric, Param

    record = json.loads(path.read_text(encoding="utf-8"))
    experiment_id = setup(workspace, experiment, uri)
    tags = {"metarec.stage": stage, "metarec.git_commit": git_commit()}
    tags.update({f"metarec.data_version.{p}": md5 for p, md5 in data_version(workspace).items()})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    if record.get("error"):
        tags["metarec.error"] = record["error"]
    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id, start_time=record["start_ms"], tags=tags, run_name=stage)
    run_id = run.info.run_id
    params = {k: ("null" if v is None else str(v))[:6000] for k, v in flat_config.items()}
    params.update(record["params"])
    metrics = [Metric(k, v, record["end_ms"], 0) for k, v in record["metrics"].items()]
    client.log_batch(run_id, metrics=metrics)
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[start : start + 100])
    for file, artifact_path in record["files"]:
        client.log_artifact(run_id, file, artifact_path)
    client.set_terminated(run_id, record.get("status", "FINISHED"), end_time=record["end_ms"])
    shutil.rmtree(folder, ignore_errors=True)
    return str(run_id)
