"""The training flow end to end on the tiny dataset: stages, MLflow lineage and DVC's skipping.

One module-scoped workspace runs the flow once; the no-op, model-change and split-change reruns build
on it in that order (each fixture depends on the previous one, so any subset of tests stays valid).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import POP_OVERRIDES

from components import pipeline
from components.core import tracking
from components.pipeline import PipelineError
from components.stages import STAGES
from flows.training import training

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SOURCE_SUFFIXES = (".py", ".md", ".toml", ".cfg", ".ini", ".txt", ".ipynb")
WATCHED = ("data/processed/interactions.parquet", "models/current/model.json")

pytestmark = pytest.mark.usefixtures("prefect_harness")


def git_status() -> set[str]:
    """``git status --porcelain`` lines of the code checkout (untracked files included)."""
    proc = subprocess.run(
        ["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=all"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(proc.stdout.splitlines())


def ran(result: dict[str, Any]) -> set[str]:
    return {s["stage"] for s in result["stages"] if s["ran"]}


@dataclass
class Workspace:
    path: Path
    overrides: list[str]
    first: dict[str, Any]
    mtimes: dict[str, int] = field(default_factory=dict)

    def run(self, *extra: str) -> dict[str, Any]:
        return training(workspace=str(self.path), overrides=[*self.overrides, *extra])

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=tracking.tracking_uri(self.path))

    def mtime(self, rel: str) -> int:
        return (self.path / rel).stat().st_mtime_ns


@pytest.fixture(scope="module")
def checkout_before() -> set[str]:
    return git_status()


@pytest.fixture(scope="module")
def ws(
    tmp_path_factory: pytest.TempPathFactory, tiny_overrides: list[str], checkout_before: set[str]
) -> Workspace:
    path = tmp_path_factory.mktemp("pipeline") / "ws"
    overrides = [*tiny_overrides, *POP_OVERRIDES]
    first = training(workspace=str(path), overrides=overrides)
    workspace = Workspace(path, overrides, first)
    workspace.mtimes = {rel: workspace.mtime(rel) for rel in WATCHED}
    return workspace


@pytest.fixture(scope="module")
def noop_run(ws: Workspace) -> dict[str, Any]:
    return ws.run()


@pytest.fixture(scope="module")
def model_change_run(ws: Workspace, noop_run: dict[str, Any]) -> dict[str, Any]:
    return ws.run("model.name=itemknn")


@pytest.fixture(scope="module")
def split_change_run(ws: Workspace, model_change_run: dict[str, Any]) -> dict[str, Any]:
    # 0.4 of 5 interactions per user moves one interaction from train to test: the split's output
    # changes, so DVC must rerun train and evaluate too (train_ratio=0.7 would floor to the same split).
    return ws.run("model.name=itemknn", "split.train_ratio=0.4")


def test_first_run_runs_every_stage(ws: Workspace) -> None:
    assert [s["stage"] for s in ws.first["stages"]] == list(STAGES)
    assert ran(ws.first) == set(STAGES)
    assert re.fullmatch(r"[0-9a-f]{32}", ws.first["run_id"])


def test_metrics_json(ws: Workspace) -> None:
    metrics = json.loads((ws.path / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["model"] == "pop"
    for part in ("valid", "test"):
        for name in ("ndcg@5", "recall@5", "ndcg@2"):
            assert math.isfinite(metrics[part][name]), (part, name, metrics[part])
            assert 0.0 <= metrics[part][name] <= 1.0
        assert metrics[part]["n_users"] == 6
    assert ws.first["metrics"] == metrics


def test_mlflow_parent_run_and_nested_stage_runs(ws: Workspace) -> None:
    client = ws.client()
    parent = client.get_run(ws.first["run_id"])
    assert parent.info.run_name == "training"
    assert parent.info.status == "FINISHED"
    params = parent.data.params
    assert params["model.name"] == "pop"
    assert params["seed"] == "42"
    assert params["split.protocol"] == "user_temporal"
    assert params["data.name"] == "tiny"
    assert math.isfinite(parent.data.metrics["test.ndcg_at_5"])
    assert math.isfinite(parent.data.metrics["valid.ndcg_at_5"])
    tags = parent.data.tags
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", tags["metarec.git_commit"])
    assert tags["metarec.data_version.data/raw"].endswith(".dir")
    assert tags["metarec.model"] == "pop"
    assert tags["metarec.stages_run"] == ",".join(STAGES)
    for stage in STAGES:  # every stage that ran: its time and its process tree's peak memory
        assert parent.data.metrics[f"stage.{stage}.seconds"] > 0
        assert 20 < parent.data.metrics[f"stage.{stage}.peak_rss_mb"] < 8000  # DVC alone takes tens of MB
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"data", "graph", "evaluation"} <= parent_artifacts

    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(c.info.run_name for c in children) == sorted(STAGES)
    for child in children:
        assert child.info.status == "FINISHED", child.info.run_name
        assert child.data.tags["metarec.stage"] == child.info.run_name
        assert child.data.params["model.name"] == "pop"
    by_name = {c.info.run_name: c.info.run_id for c in children}
    ingest = {a.path for a in client.list_artifacts(by_name["ingest"])}
    assert {"data_report.json", "data_report.png"} <= ingest
    assert "schema.png" in {a.path for a in client.list_artifacts(by_name["build_kg"])}
    assert "model" in {a.path for a in client.list_artifacts(by_name["train"])}
    evaluate = client.get_run(by_name["evaluate"])
    assert math.isfinite(evaluate.data.metrics["test.ndcg_at_5"])
    # Where evaluate's time went: warm ranking, the cold protocol's refit (pop: no training loop) and
    # its cold and mixed rankings.
    seconds = {k.rpartition(".")[2]: v for k, v in evaluate.data.metrics.items() if k.startswith("evaluate.")}
    assert set(seconds) == {"rank_warm", "refit", "refit_train", "rank_cold", "rank_mixed"}, seconds
    assert seconds["refit_train"] == 0 and all(v >= 0 for v in seconds.values())


def test_noop_rerun_skips_everything(ws: Workspace, noop_run: dict[str, Any]) -> None:
    assert [s["stage"] for s in noop_run["stages"]] == list(STAGES)
    assert ran(noop_run) == set()
    assert "up to date" in pipeline.stage_status(ws.path)
    assert {rel: ws.mtime(rel) for rel in WATCHED} == ws.mtimes
    assert noop_run["metrics"] == ws.first["metrics"]
    assert noop_run["run_id"] != ws.first["run_id"]
    parent = ws.client().get_run(noop_run["run_id"])
    assert parent.data.tags["metarec.stages_run"] == "none"


def test_model_change_reruns_train_evaluate_and_export(
    ws: Workspace, model_change_run: dict[str, Any]
) -> None:
    # retune too: whether the cold protocol needs a retuned encoder depends on the model.
    assert ran(model_change_run) == {"train", "retune", "evaluate", "export"}
    assert model_change_run["metrics"]["model"] == "itemknn"
    model = json.loads((ws.path / "models/current/model.json").read_text(encoding="utf-8"))
    assert "itemknn" in json.dumps(model).lower()
    assert ws.mtime("data/processed/interactions.parquet") == ws.mtimes["data/processed/interactions.parquet"]


def test_split_change_reruns_split_and_downstream(ws: Workspace, split_change_run: dict[str, Any]) -> None:
    assert ran(split_change_run) == {"split", "mine", "encode", "train", "retune", "evaluate", "export"}
    stats = json.loads((ws.path / "data/split/stats.json").read_text(encoding="utf-8"))
    assert stats["train"]["interactions"] == 12  # 2 of 5 per user
    assert "up to date" in pipeline.stage_status(ws.path)


def test_failing_stage_raises_and_writes_nothing(tmp_path: Path, tiny_overrides: list[str]) -> None:
    bad = tmp_path / "bad-data"
    bad.mkdir()
    # A header field without its `:type` suffix.
    (bad / "bad.inter").write_text("user_id\titem_id:token\nu1\ti1\n", encoding="utf-8")
    overrides = [o for o in tiny_overrides if not o.startswith("data.")]
    overrides += [f"data.path={bad}", "data.name=bad", "model.name=pop"]
    ws = tmp_path / "ws"
    with pytest.raises(PipelineError, match=r"stage ingest failed") as info:
        training(workspace=str(ws), overrides=overrides)
    assert "bad.inter" in str(info.value)
    assert (ws / "data" / "raw" / "bad.inter").is_file()
    assert not (ws / "data" / "processed").exists()
    assert not (ws / "metrics.json").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.tracking_uri(ws))
    runs = client.search_runs([client.get_experiment_by_name("metarec").experiment_id])
    statuses = {r.info.run_name: r.info.status for r in runs}
    assert statuses["training"] == "FAILED"
    assert statuses["ingest"] == "FAILED"


def test_checkout_not_dirtied(checkout_before: set[str]) -> None:
    # Last in the module: nothing the flows above ran wrote into the code checkout. Source edits made
    # meanwhile by people working in the same checkout are not the pipeline's doing and are ignored.
    changed = {
        line for line in git_status() ^ checkout_before if not line.rstrip('"').endswith(SOURCE_SUFFIXES)
    }
    assert not changed, f"the pipeline changed the checkout: {sorted(changed)}"
