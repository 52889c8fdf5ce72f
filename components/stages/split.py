"""Stage ``split``: train/valid/test parts of the interactions."""

from __future__ import annotations

from components.core.config import Config
from components.core.storage import read_json
from components.core.workspace import Paths
from components.data import ingest, split
from components.stages.common import deferred_run


def run(paths: Paths, cfg: Config) -> None:
    """Split interactions into train/valid/test."""
    with deferred_run(paths, cfg, "split") as run:
        inter, *_ = ingest.read_processed(paths.processed)
        parts = split.split_interactions(inter, cfg.split)
        split.save_split(parts, paths.split, {"protocol": cfg.split.protocol, "seed": cfg.seed})
        stats = read_json(paths.split / "stats.json")
        run.log_dict(stats, "split_stats.json")
        run.log_metrics({f"split.{p}.interactions": stats[p]["interactions"] for p in split.PARTS})
