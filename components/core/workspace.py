"""The workspace layout: where each stage's outputs live, and the workspace's one config.

A workspace is its own DVC project holding ``params.yaml``, ``dvc.yaml``, the stage outputs and the
MLflow store; every reader of a workspace goes through :class:`Paths` and :func:`workspace_config`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.core.config import Config, apply_overrides, build_config, load_config


@dataclass(frozen=True)
class Paths:
    """Where each stage's outputs live inside a workspace (must match dvc.yaml)."""

    root: Path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def processed(self) -> Path:
        return self.root / "data" / "processed"

    @property
    def graph(self) -> Path:
        return self.root / "data" / "graph"

    @property
    def split(self) -> Path:
        return self.root / "data" / "split"

    @property
    def metapaths(self) -> Path:
        return self.root / "data" / "metapaths"

    @property
    def text(self) -> Path:
        return self.root / "data" / "text"

    @property
    def retune(self) -> Path:
        return self.root / "data" / "retune"

    @property
    def model(self) -> Path:
        return self.root / "models" / "current"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.json"

    @property
    def bundle(self) -> Path:
        return self.root / "models" / "bundle"


def workspace_config(
    workspace: str | Path, overrides: list[str] | None = None, missing_ok: bool = False
) -> Config:
    """``params.yaml`` with ``overrides`` as typed config (the defaults if absent and ``missing_ok``)."""
    params = Paths(Path(workspace)).params
    if missing_ok and not params.exists():
        return build_config(apply_overrides(Config().model_dump(mode="json"), overrides or []))
    return load_config(params, overrides or [])


def read_metrics(paths: Paths) -> dict[str, Any]:
    """Read ``metrics.json`` written by the evaluate stage."""
    return dict(json.loads(paths.metrics.read_text(encoding="utf-8")))
