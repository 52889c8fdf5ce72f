"""Stage ``export``: the ONNX serving bundle, or a skip marker for a baseline."""

from __future__ import annotations

import time
from pathlib import Path

from components.core.config import Config
from components.core.storage import atomic_dir
from components.core.workspace import Paths
from components.stages.common import tracked_run


def run(paths: Paths, cfg: Config) -> None:
    """Export the fusion model to the ONNX serving bundle (``models/bundle``), failing on a parity breach.

    A baseline writes only a skip marker there: only the fusion model is served and registered. The
    bundle is renamed into place only after every check passed, so a failure keeps the previous one.
    Logged: the parity numbers, scorer latency, encoder throughput, file sizes and the model card.
    """
    with tracked_run(paths, cfg, "export"):
        import mlflow

        from components.bundle import export

        if cfg.model.name != "metarec":
            with atomic_dir(paths.bundle) as tmp:
                export.write_skip(tmp, cfg.model.name)
            mlflow.set_tag("metarec.export.skipped", f"model.name={cfg.model.name}")
            return
        start = time.perf_counter()
        with export.make_work_dir(paths) as work, atomic_dir(paths.bundle) as tmp:
            manifest = export.export_bundle(paths, cfg, tmp, Path(work))
        metrics = manifest["metrics"]
        mlflow.log_metrics(
            {
                f"export.{section}.{key}": float(value)
                for section in ("parity", "latency", "sizes")
                for key, value in metrics[section].items()
                if isinstance(value, int | float)
            }
            | {"export.seconds": time.perf_counter() - start}
        )
        mlflow.log_text(manifest["model_card"], "model_card.md")
        mlflow.log_dict(metrics, "bundle_metrics.json")
