"""Stage ``fetch``: materialise the raw dataset files into ``data/raw``."""

from __future__ import annotations

from components.core.config import Config
from components.core.workspace import Paths
from components.data import fetch
from components.stages.common import deferred_run


def run(paths: Paths, cfg: Config) -> None:
    """Materialise the raw dataset files into ``data/raw``."""
    with deferred_run(paths, cfg, "fetch") as run:
        result = fetch.fetch(paths.raw, cfg.data.path, cfg.data.name)
        run.log_dict(result.files, "raw_files_sha256.json")
        run.log_param("data.source", cfg.data.path or f"pypi:recbole=={fetch.RECBOLE_VERSION}")
