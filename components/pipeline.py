"""Workspace set-up and DVC invocation: the glue between the Prefect flow and ``dvc.yaml``.

A workspace is a directory that is its own DVC project (``dvc init --no-scm``) holding a copy of the
project's ``dvc.yaml``, its own ``params.yaml``, the MLflow store and every stage output. Runs never
write into the code checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from components import fetch, tracking
from components.stages import Paths
from components.storage import atomic_file
from metarec.config import Config, apply_overrides, build_config, read_params

PROJECT_ROOT = Path(__file__).resolve().parents[1]
WORKSPACE_ENV = "METAREC_WORKSPACE"


class PipelineError(RuntimeError):
    """A DVC stage failed; the message carries the tail of its output."""


def default_workspace() -> Path:
    """``$METAREC_WORKSPACE`` if set, else ``./workspace`` under the current directory."""
    return Path(os.environ.get(WORKSPACE_ENV) or Path.cwd() / "workspace").resolve()


def _stage_env(parent_run_id: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # DVC runs each stage's `metarec stage ...` through a shell: make it find this interpreter's scripts
    # even when the virtual environment is not activated.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    if parent_run_id:
        env[tracking.PARENT_ENV] = parent_run_id
    return env


def _dvc(workspace: Path, *args: str, parent_run_id: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=workspace,
        capture_output=True,
        text=True,
        env=_stage_env(parent_run_id),
    )


def prepare_workspace(workspace: Path, overrides: list[str] | None = None) -> Config:
    """Create or update a workspace: DVC project, pipeline file and params with overrides applied.

    Overrides are written into the workspace's ``params.yaml`` (as ``dvc exp run -S`` does), so the
    workspace always states the configuration its outputs were made with.
    """
    workspace = Path(workspace).resolve()
    paths = Paths(workspace)
    # Validate before touching the disk: a bad override must not leave a half-made workspace.
    base = read_params(paths.params) if paths.params.exists() else read_params(PROJECT_ROOT / "params.yaml")
    tree = apply_overrides(base, overrides or [])
    cfg = build_config(tree, source=f"{paths.params} with overrides {overrides or []}")
    workspace.mkdir(parents=True, exist_ok=True)
    if not (workspace / ".dvc").is_dir():
        proc = _dvc(workspace, "init", "--no-scm", "-q")
        if proc.returncode != 0:
            raise PipelineError(f"dvc init failed in {workspace}:\n{proc.stderr.strip()}")
        _dvc(workspace, "config", "core.analytics", "false")
    # dvc.yaml is the project's single pipeline definition; the workspace always gets the current one.
    shutil.copyfile(PROJECT_ROOT / "dvc.yaml", workspace / "dvc.yaml")
    if cfg.data.path is not None:
        # Stages run with the workspace as their directory: store the path absolute.
        source = Path(cfg.data.path).expanduser().resolve()
        if not fetch.dataset_files(source, cfg.data.name):
            raise PipelineError(f"data.path {source}: no RecBole atomic files named {cfg.data.name}.* found")
        tree["data"]["path"] = str(source)
    tree.setdefault("data", {})["fingerprint"] = fetch.fingerprint(tree["data"].get("path"), cfg.data.name)
    cfg = build_config(tree)
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    if not paths.params.exists() or paths.params.read_text(encoding="utf-8") != text:
        with atomic_file(paths.params) as handle:
            handle.write(text)
    return cfg


@dataclass
class StageOutcome:
    """What running one DVC stage did."""

    stage: str
    ran: bool
    seconds: float
    log: str
    restored: bool = False


def repro_stage(workspace: Path, stage: str, parent_run_id: str | None = None) -> StageOutcome:
    """Run one stage with ``dvc repro --single-item``; DVC skips it when deps and params are unchanged."""
    start = time.perf_counter()
    proc = _dvc(Path(workspace), "repro", "--single-item", stage, parent_run_id=parent_run_id)
    log = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise PipelineError(f"stage {stage} failed (dvc exit {proc.returncode}):\n{log[-4000:]}")
    skipped = "didn't change, skipping" in log
    # DVC's run cache restores outputs of a deps+params combination it has run before.
    restored = "is cached - skipping run" in log
    return StageOutcome(stage, not skipped, time.perf_counter() - start, log, restored)


def stage_status(workspace: Path) -> str:
    """``dvc status`` output: which stages are stale."""
    return _dvc(Path(workspace), "status").stdout.strip()
