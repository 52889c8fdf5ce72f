"""The pipeline's stages, one module per ``dvc.yaml`` stage and named as it is.

``dvc.yaml`` runs each through ``metarec stage NAME``, which lands in :func:`run_stage`. A stage module
reads its inputs from the workspace (:class:`components.core.workspace.Paths`), calls the libraries,
writes its outputs atomically and logs to its own MLflow run. ``STAGES`` is the one stage list: the CLI
help and the flow read it, and a test checks ``dvc.yaml`` against it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from components.core.workspace import Paths, workspace_config

STAGES = ("fetch", "ingest", "build_kg", "split", "mine", "encode", "train", "retune", "evaluate", "export")


def run_stage(name: str, workspace: Path, miner: Any | None = None) -> None:
    """Run one stage by name in a workspace (the entry point of ``metarec stage NAME``).

    ``miner`` runs the mining flow; the CLI passes the Prefect flow so components stay free of flows.
    """
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}")
    paths = Paths(Path(workspace).resolve())
    cfg = workspace_config(paths.root)
    module = importlib.import_module(f"components.stages.{name}")
    if name == "mine":
        if miner is None:
            raise ValueError("stage mine needs a miner (run it through `metarec stage mine`)")
        module.run(paths, cfg, miner)
    else:
        module.run(paths, cfg)
