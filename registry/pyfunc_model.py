"""MLflow "model from code": the pyfunc that serves a registered metarec bundle.

MLflow stores this file's source with every model version and runs it at load time, so no pickled
object ever enters the registry. The bundle itself is the ``bundle`` artifact: verified against its
manifest on load, then handed to ``components.bundle.engine.load_bundle``.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

OUTPUT_COLUMNS = ["user_id", "item_id", "rank", "score"]


class MetarecBundleModel(PythonModel):
    """Top-k recommendations from a verified bundle; input rows are ``(user_id: str, k: int)``.

    ``components.bundle.engine.load_bundle(path)`` returns a ``components.serving.protocol.Engine``;
    its ``recommend(user_id, k, explain=...)`` does the work.
    """

    def __init__(self) -> None:
        self.recommender: Any = None
        self.manifest: dict[str, Any] = {}

    def load_context(self, context: Any) -> None:
        """Verify the bundle's files against ``bundle.json``, then load it.

        Raises:
            components.bundle.format.BundleError: A bundle file is missing or altered.
            RuntimeError: ``components.bundle.engine`` (the bundle's loader) is not importable here.
        """
        # Imported here, not at module top: MLflow also executes this file when it logs the model, and
        # only serving needs the bundle's loader (and the serving stack it pulls in).
        from components.bundle.format import verify_bundle

        path = context.artifacts["bundle"]
        self.manifest = verify_bundle(path)
        try:
            from components.bundle.engine import load_bundle
        except ImportError as exc:
            raise RuntimeError(
                f"cannot serve bundle {path}: components.bundle.engine is not importable ({exc})"
            ) from exc
        self.recommender = load_bundle(path)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Recommend ``k`` items for each row's user; returns user_id, item_id, rank, score rows."""
        rows = [
            (str(user), rec["item_id"], rec["rank"], rec["score"])
            for user, k in zip(model_input["user_id"], model_input["k"], strict=True)
            for rec in self.recommender.recommend(str(user), int(k), explain=False)
        ]
        frame = pd.DataFrame(rows, columns=OUTPUT_COLUMNS)
        return frame.astype({"user_id": str, "item_id": str, "rank": "int64", "score": "float64"})


mlflow.models.set_model(MetarecBundleModel())
