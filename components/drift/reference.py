"""Drift monitoring of a workspace: the champion's reference, feedback windows, one check, the event.

The monitor compares what users did since the champion was trained with what it was trained on:

* The **reference** is built from the champion's own bundle (the flow fetches ``models:/<name>@champion``
  through ``registry.promotion.champion_bundle``): its training interactions (``profiles.npz``), its
  item genres (the bundle's graph) and its item text embeddings, with the offline metrics of its
  manifest as the online-quality baseline. So the reference is always what *serves*, not whatever the
  workspace trained last.
* The **window** is the feedback store's events after the champion's data version: the store's
  sequence number recorded as that version's high-water mark (:func:`champion_high_water`), optionally
  cut further by event time (:func:`read_window`). Ids stay the dataset's original string ids on both
  sides.

:func:`check_window` runs ``components.drift.checks.check``; :func:`report_window` logs one window's
check to MLflow; :func:`drift_payload` is the ``metarec.drift.detected`` event's payload and
:func:`retrain_parameters` what the event hands the retrain flow.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from components.core import secrets
from components.core.config import Config
from components.drift import checks as drift
from components.drift import report

if TYPE_CHECKING:
    from components.serving.feedback import FeedbackStore

DRIFT_EVENT = "metarec.drift.detected"
MONITOR_EXPERIMENT_SUFFIX = "-monitor"
_PAGE = 10_000


def workspace_resource(workspace: str | Path) -> dict[str, str]:
    """The Prefect event resource naming a workspace (triggers match on its id)."""
    path = str(Path(workspace).resolve())
    digest = hashlib.sha256(path.encode()).hexdigest()[:12]
    return {"prefect.resource.id": f"metarec.workspace.{digest}", "prefect.resource.name": path}


def feedback_url(workspace: Path, cfg: Config, url: str | None = None) -> str:
    """The feedback store URL; relative ``sqlite:///`` paths resolve under the workspace, as in serving."""
    url = url or secrets.feedback_url(cfg.serve.feedback_url)  # METAREC_FEEDBACK_URL[_FILE] wins
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        return f"{prefix}{(Path(workspace) / url[len(prefix) :]).resolve()}"
    return url


def open_feedback(workspace: Path, cfg: Config, url: str | None = None) -> FeedbackStore:
    """Open the workspace's feedback store (the one ``metarec serve`` writes)."""
    from components.serving.feedback import open_store

    return open_store(feedback_url(workspace, cfg, url))


def read_events(
    store: FeedbackStore,
    after_seq: int = 0,
    since_ts: float | None = None,
    until_ts: float | None = None,
) -> tuple[pd.DataFrame, int]:
    """Events with store sequence ``> after_seq`` (and ``since_ts <= ts <= until_ts`` when given).

    Returns:
        The events (``seq`` plus the monitor's columns, ``request_id`` and ``position``) and the
        highest sequence number read (``after_seq`` when there was nothing).
    """
    rows: list[dict[str, Any]] = []
    last = after_seq
    while True:
        page = store.read_since(last, _PAGE)
        if not page:
            break
        for rec in page:
            e = rec.event
            rows.append(
                {
                    "seq": rec.seq,
                    "event_id": e.event_id,
                    "type": e.type,
                    "user_id": str(e.user_id),
                    "item_id": str(e.item_id),
                    "value": e.value,
                    "model_version": e.model_version,
                    "ts": e.ts,
                    "request_id": e.request_id,
                    "position": e.position,
                }
            )
        last = page[-1].seq
        if len(page) < _PAGE:
            break
    columns = ["seq", *drift.EVENT_COLUMNS, "request_id", "position"]
    events = pd.DataFrame(rows, columns=columns)
    if since_ts is not None:
        events = events[events["ts"] >= since_ts]
    if until_ts is not None:
        events = events[events["ts"] <= until_ts]
    return events.reset_index(drop=True), int(last)


def read_window(
    workspace: Path,
    cfg: Config,
    after_seq: int = 0,
    since_ts: float | None = None,
    until_ts: float | None = None,
    url: str | None = None,
) -> tuple[pd.DataFrame, int]:
    """:func:`read_events` of the workspace's feedback store (or ``url``), opened and closed here."""
    store = open_feedback(workspace, cfg, url)
    try:
        return read_events(store, after_seq, since_ts, until_ts)
    finally:
        store.close()


@dataclass
class ReferenceData:
    """The champion's reference and what the windows need from its bundle."""

    reference: drift.Reference
    version: str | None
    # Text embedding of every catalogue item, by original id (new items' vectors come from here).
    item_vectors: dict[str, np.ndarray] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def window(self, events: pd.DataFrame) -> drift.Window:
        """The monitor's window over ``events``: new items' embeddings looked up in the catalogue."""
        known = self.reference.item_counts.index
        inputs = events[events["type"].isin(["click", "rating"])]
        new = [i for i in pd.unique(inputs["item_id"]) if i not in known and i in self.item_vectors]
        vectors = None
        if self.reference.item_embeddings is not None and new:
            vectors = np.stack([self.item_vectors[i] for i in new])
        return drift.Window(events[[c for c in events.columns if c != "seq"]], vectors)


def baseline_metrics(manifest: dict[str, Any], k: int) -> dict[str, float]:
    """The champion's offline warm-test ``hit@k`` and ``ndcg@k`` (what online quality is held to)."""
    warm = (manifest.get("metrics") or {}).get("warm") or {}
    out = {}
    for name in (f"hit@{k}", f"ndcg@{k}"):
        value = warm.get(name)
        if isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 1:
            out[name] = float(value)
    return out


def reference_from_tables(
    train: pd.DataFrame,
    item_genres: pd.DataFrame | None,
    item_vectors: dict[str, np.ndarray],
    baseline: dict[str, float],
    version: str | None,
    manifest: dict[str, Any] | None = None,
) -> ReferenceData:
    """A reference from plain tables: ``train`` has ``user`` and ``item`` (original ids)."""
    trained = pd.unique(train["item"])
    emb = None
    if item_vectors:
        rows = [item_vectors[i] for i in trained if i in item_vectors]
        emb = np.stack(rows) if rows else None
    ref = drift.Reference.build(train, item_genres, emb, baseline, version)
    return ReferenceData(ref, version, item_vectors, manifest or {})


def reference_from_bundle(bundle: Path, cfg: Config, version: str | None) -> ReferenceData:
    """The champion's reference from its serving bundle (training pairs, genres, item texts, metrics)."""
    import json

    from components.data.kg import load_graph

    bundle = Path(bundle)
    manifest = json.loads((bundle / "bundle.json").read_text(encoding="utf-8"))
    users = pd.read_parquet(bundle / "users.parquet").sort_values("user")
    items = pd.read_parquet(bundle / "items.parquet").sort_values("item")
    user_ids = users["user_id"].astype(str).to_numpy()
    item_ids = items["item_id"].astype(str).to_numpy()
    with np.load(bundle / "profiles.npz", allow_pickle=False) as data:
        rows, cols = np.asarray(data["train_rows"]), np.asarray(data["train_cols"])
    train = pd.DataFrame({"user": user_ids[rows], "item": item_ids[cols]})

    genre_type = ((manifest.get("config") or {}).get("kg") or {}).get("item_fields", {}).get("class")
    genres = None
    graph_dir = bundle / "graph"
    if genre_type and (graph_dir / "graph.json").exists():
        graph = load_graph(graph_dir)
        relation = graph.relations.get(f"item.{genre_type}")
        if relation is not None:
            coo = relation.matrix.tocoo()
            names = np.asarray(graph.node_ids[relation.dst], dtype=object)
            genres = pd.DataFrame({"item": item_ids[coo.row], "genre": names[coo.col]})

    vectors: dict[str, np.ndarray] = {}
    emb_file = bundle / "item_embeddings.npz"
    if emb_file.exists():
        with np.load(emb_file, allow_pickle=False) as data:
            ids = [str(i) for i in data["ids"]]
            mat = np.asarray(data["vectors"], dtype=np.float64)
        vectors = dict(zip(ids, mat, strict=True))
    baseline = baseline_metrics(manifest, cfg.drift.quality_k)
    return reference_from_tables(train, genres, vectors, baseline, version, manifest)


def champion_high_water(workspace: Path, ref: ReferenceData, url: str) -> int:
    """Store sequence the champion's training data already contains (0 when none of the store's)."""
    from components.retrain import DataVersions

    data = (ref.manifest.get("config") or {}).get("data") or {}
    found = DataVersions(Path(workspace)).by_path(data.get("path"))
    if found is None or found.feedback_url != url:
        return 0
    return found.feedback_seq


def check_window(ref: ReferenceData, events: pd.DataFrame, cfg: Config) -> drift.DriftResult:
    """Every drift check of ``events`` against the reference."""
    return drift.check(ref.reference, ref.window(events), cfg.drift)


def report_window(
    workspace: Path,
    cfg: Config,
    ref: ReferenceData,
    events: pd.DataFrame,
    window: str,
    step: int | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Check a window, log report, statistics and payload to a ``-monitor`` run; ``{drifted, payload}``."""
    import tempfile

    import mlflow

    from components.core import tracking

    result = check_window(ref, events, cfg)
    experiment = cfg.tracking.experiment + MONITOR_EXPERIMENT_SUFFIX
    experiment_id = tracking.setup(Path(workspace), experiment, cfg.tracking.uri)
    run_tags = {
        "metarec.flow": "monitor",
        "metarec.window": window,
        "metarec.champion": str(ref.version),
        "metarec.git_commit": tracking.git_commit(),
        **(tags or {}),
    }
    with (
        mlflow.start_run(experiment_id=experiment_id, run_name=f"monitor {window}", tags=run_tags) as run,
        tempfile.TemporaryDirectory(prefix="metarec-drift-") as tmp,
    ):
        mlflow.log_params({f"drift.{k}": str(v)[:500] for k, v in cfg.drift.model_dump().items()})
        report.log_to_mlflow(result, Path(tmp), step=step)
        payload = drift_payload(result, window, Path(workspace), ref.version, run.info.run_id)
        mlflow.log_dict(payload, "drift/payload.json")
    return {"drifted": result.drifted, "payload": payload}


def statistics(result: drift.DriftResult) -> dict[str, dict[str, Any]]:
    """Per check: headline statistic, threshold and status (JSON-safe, NaN as None)."""
    out: dict[str, dict[str, Any]] = {}
    for c in result.checks:
        value = c.statistic if math.isfinite(c.statistic) else None
        out[c.name] = {
            "statistic": c.statistic_name,
            "value": value,
            "threshold": c.threshold,
            "status": c.status,
        }
    return out


def drift_payload(
    result: drift.DriftResult,
    window: str,
    workspace: Path,
    champion: str | None,
    run_id: str | None,
) -> dict[str, Any]:
    """The ``metarec.drift.detected`` event payload: which checks fired, every statistic, where to look."""
    return {
        "window": window,
        "workspace": str(Path(workspace).resolve()),
        "champion": champion,
        "fired": result.fired,
        "fired_text": ",".join(result.fired) or "none",
        "n_events": result.n_events,
        "n_input_events": result.n_input_events,
        "window_start": result.window_start,
        "window_end": result.window_end,
        "statistics": statistics(result),
        "metrics": report.metrics(result),
        "mlflow_run_id": run_id,
    }


def retrain_parameters(workspace: str | Path, payload: dict[str, Any]) -> dict[str, Any]:
    """What a drift event hands the retrain flow (the deployment trigger templates the same)."""
    return {
        "workspace": str(Path(workspace).resolve()),
        "window": payload["window"],
        "reason": f"drift: {payload['fired_text']}",
    }
