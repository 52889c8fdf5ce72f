"""What every stage shares: its MLflow run, tracked or deferred, from the workspace's config."""

from __future__ import annotations

from typing import Any

from components.core import tracking
from components.core.config import Config
from components.core.workspace import Paths


def tracked_run(paths: Paths, cfg: Config, stage: str) -> Any:
    return tracking.stage_run(paths.root, stage, cfg.flat(), cfg.tracking.experiment, cfg.tracking.uri)


def deferred_run(paths: Paths, cfg: Config, stage: str) -> Any:
    tr = cfg.tracking
    return tracking.deferred_stage_run(paths.root, stage, cfg.flat(), tr.experiment, tr.uri)
