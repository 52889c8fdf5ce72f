"""The CLI in-process: recommendations from a trained workspace, and the errors users hit first."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from metarec.cli import app

if TYPE_CHECKING:
    from conftest import TrainedWorkspace

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def seen_items(ws: Path) -> dict[str, set[str]]:
    """Original user id -> original ids of the items it had in train or valid."""
    users = pd.read_parquet(ws / "data/processed/users.parquet", columns=["user", "user_id"])
    items = pd.read_parquet(ws / "data/processed/items.parquet", columns=["item", "item_id"])
    parts = [
        pd.read_parquet(ws / f"data/split/{p}.parquet", columns=["user", "item"]) for p in ("train", "valid")
    ]
    seen = pd.concat(parts).merge(users, on="user").merge(items, on="item")
    return {str(u): set(map(str, g.item_id)) for u, g in seen.groupby("user_id")}


def test_recommend_all_users(trained_workspace: TrainedWorkspace, tmp_path: Path) -> None:
    trained_workspace.check()
    ws = trained_workspace.path
    out = tmp_path / "f.csv"
    code, output = invoke("recommend", "--workspace", str(ws), "--all-users", "--k", "3", "--out", str(out))
    assert code == 0, output
    assert "wrote 18 rows" in output

    with out.open(newline="", encoding="utf-8") as handle:
        lines = list(csv.reader(handle))
    assert lines[0] == ["user_id", "item_id", "rank", "score"]
    rows = lines[1:]
    all_users = set(pd.read_parquet(ws / "data/processed/users.parquet").user_id.astype(str))
    all_items = set(pd.read_parquet(ws / "data/processed/items.parquet").item_id.astype(str))
    assert all_users == {f"u{i}" for i in range(1, 7)}
    seen = seen_items(ws)
    by_user: dict[str, list[list[str]]] = {}
    for row in rows:
        by_user.setdefault(row[0], []).append(row)
    assert set(by_user) == all_users
    for user, recs in by_user.items():
        assert [int(r[2]) for r in recs] == [1, 2, 3], user
        items = [r[1] for r in recs]
        assert set(items) <= all_items and len(set(items)) == 3, (user, items)
        assert not set(items) & seen[user], (user, items, seen[user])
        scores = [float(r[3]) for r in recs]
        assert scores == sorted(scores, reverse=True), (user, scores)


def test_recommend_selected_users(trained_workspace: TrainedWorkspace, tmp_path: Path) -> None:
    trained_workspace.check()
    out = tmp_path / "some.csv"
    code, output = invoke(
        "recommend",
        "-w",
        str(trained_workspace.path),
        "--user",
        "u2",
        "--user",
        "u5",
        "--k",
        "2",
        "--out",
        str(out),
    )
    assert code == 0, output
    frame = pd.read_csv(out, dtype={"user_id": str, "item_id": str})
    assert frame.user_id.tolist() == ["u2", "u2", "u5", "u5"]
    assert frame["rank"].tolist() == [1, 2, 1, 2]


def test_recommend_rejects_unknown_user_and_k(trained_workspace: TrainedWorkspace, tmp_path: Path) -> None:
    trained_workspace.check()
    ws = str(trained_workspace.path)
    code, output = invoke(
        "recommend", "-w", ws, "--user", "nobody", "--k", "2", "--out", str(tmp_path / "x.csv")
    )
    assert code == 1
    assert "unknown user ids: nobody" in output
    code, output = invoke("recommend", "-w", ws, "--all-users", "--k", "9", "--out", str(tmp_path / "x.csv"))
    assert code == 1
    assert "--k must be in 1..8" in output
    code, output = invoke("recommend", "-w", ws, "--all-users", "--explain", "--out", str(tmp_path / "x.csv"))
    assert code == 1
    assert "--explain needs the fusion model" in output
    assert not (tmp_path / "x.csv").exists()


def test_the_cold_refit_trains_the_main_fits_best_epoch_count(metarec_workspace: TrainedWorkspace) -> None:
    """The saved model keeps how its fit went; the cold protocol's refit repeats its best epoch count
    without early stopping (``eval.cold_epochs: main``) and metrics.json says so."""
    metarec_workspace.check()
    ws = metarec_workspace.path
    fit = json.loads((ws / "models" / "current" / "model.json").read_text(encoding="utf-8"))["fit"]
    assert fit["early_stopping"] is True and 1 <= fit["best_epoch"] <= fit["epochs_run"]
    protocol = json.loads((ws / "metrics.json").read_text(encoding="utf-8"))["cold_protocol"]
    assert protocol["epochs_run"] == fit["best_epoch"] and protocol["early_stopping"] is False


def test_recommend_with_the_fusion_model_is_the_served_engine(
    metarec_workspace: TrainedWorkspace, tmp_path: Path
) -> None:
    """The fusion model ranks and explains offline with its bundle's engine; a stale bundle is refused."""
    from components.bundle.engine import load_bundle

    metarec_workspace.check()
    ws, out = metarec_workspace.path, tmp_path / "r.csv"
    code, output = invoke(
        "recommend", "-w", str(ws), "--all-users", "--k", "3", "--explain", "--out", str(out)
    )
    assert code == 0, output
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    engine, seen = load_bundle(ws / "models" / "bundle"), seen_items(ws)
    for user, rows in frame.groupby("user_id"):
        served = [(r["item_id"], r["explanation"] or "") for r in engine.recommend(str(user), 3)]
        assert list(zip(rows.item_id, rows.explanation, strict=True)) == served, user
        assert not set(rows.item_id) & seen[str(user)]
    assert frame.explanation.str.len().gt(0).any()
    cold = engine.recommend(None, 4, profile={"occupation": "writer"}, history=["i1"])
    code, output = invoke(
        "recommend", "-w", str(ws), "--profile", "occupation=writer", "--history", "i1", "--k", "4"
    )
    assert code == 0 and [r["item_id"] for r in json.loads(output)["items"]] == [r["item_id"] for r in cold]

    copy = tmp_path / "ws"
    shutil.copytree(ws / "models", copy / "models")
    model_json = copy / "models" / "current" / "model.json"
    model_json.write_text(model_json.read_text(encoding="utf-8") + "\n", encoding="utf-8")  # retrained
    code, output = invoke("recommend", "-w", str(copy), "--user", "u1", "--out", str(tmp_path / "s.csv"))
    output = " ".join(output.split())  # the console wraps long lines
    assert code == 1 and "is stale (model.json differ" in output and "run `metarec run`" in output
    shutil.rmtree(copy / "models" / "bundle")
    code, output = invoke("recommend", "-w", str(copy), "--profile", "age=30", "--k", "2")
    assert code == 1 and "no usable serving bundle" in " ".join(output.split())


def test_recommend_without_a_trained_model(tmp_path: Path) -> None:
    code, output = invoke(
        "recommend", "--workspace", str(tmp_path / "empty"), "--all-users", "--out", str(tmp_path / "f.csv")
    )
    assert code == 1
    assert "no trained model" in output
    assert "metarec run" in output
    assert not (tmp_path / "f.csv").exists()


def test_recommend_needs_exactly_one_user_selection(tmp_path: Path) -> None:
    for args in (["--all-users", "--user", "u1"], []):
        code, output = invoke(
            "recommend", "--workspace", str(tmp_path), *args, "--out", str(tmp_path / "f.csv")
        )
        assert code == 1, args
        assert "exactly one of --all-users or --user" in output


@pytest.mark.usefixtures("prefect_harness")
def test_run_rejects_an_unknown_model(tmp_path: Path, tiny_overrides: list[str]) -> None:
    ws = tmp_path / "ws"
    sets = [arg for o in [*tiny_overrides, "model.name=nope"] for arg in ("-S", o)]
    code, output = invoke("run", "--workspace", str(ws), *sets)
    assert code == 1
    assert "error:" in output
    assert "model.name" in output
    assert "nope" in output
    assert not (ws / "params.yaml").exists()


@pytest.mark.usefixtures("prefect_harness")
def test_run_rejects_an_override_without_equals(tmp_path: Path) -> None:
    code, output = invoke("run", "--workspace", str(tmp_path / "ws"), "-S", "badkey")
    assert code == 1
    assert "badkey" in output
    assert "key=value" in output


def test_evaluate_takes_the_cold_encoder_from_the_retune_stage(metarec_workspace: TrainedWorkspace) -> None:
    """The retune stage's adapter and embeddings are what evaluate's cold refit used; another training
    part is another request, which the stage's output does not answer."""
    from components.core.workspace import Paths, workspace_config
    from components.data import kg, split
    from components.model import facade
    from components.model.fit import drop_items
    from components.text import retune
    from components.text.encoder import Encoder, resolve_model
    from components.text.verbalise import item_texts

    metarec_workspace.check()
    ws = metarec_workspace.path
    paths, cfg = Paths(ws), workspace_config(ws)
    info = json.loads((paths.retune / retune.RETUNE_JSON).read_text(encoding="utf-8"))
    assert info["retuned"] is True and info["n_pairs"] > 0
    assert json.loads((ws / "evaluation.json").read_text(encoding="utf-8"))["cold"]["encoder_source"] == (
        "retune stage"
    )
    loaded = facade.load_parts(paths)
    cold = facade.cold_split(cfg, loaded)
    train = drop_items(split.load_split(paths.split).train, cold.cold_items, len(loaded.items))
    got = facade.retuned_text(paths, cfg, train)
    assert got.source == "retune stage" and got.adapter_dir == paths.retune / "adapter"
    text = cfg.text
    texts = item_texts(
        loaded.items,
        kg.load_graph(paths.graph),
        text.item_template,
        text.max_facts,
        max_titles=text.max_titles,
        max_shared=text.max_shared,
    )
    encoder = Encoder.configured(text, adapter_dir=got.adapter_dir)
    np.testing.assert_allclose(encoder.encode(texts[:4]), got.item_vectors[:4], atol=1e-5)
    ids = (list(loaded.items.item_id.astype(str)), list(loaded.users.user_id.astype(str)))
    other = retune.request_key(resolve_model(text.model), text, cfg.seed, train.iloc[1:])
    assert other != retune.request_key(resolve_model(text.model), text, cfg.seed, train)
    assert retune.load(paths.retune, other, *ids) is None
    assert (
        retune.load(
            paths.retune, retune.request_key(resolve_model(text.model), text, cfg.seed + 1, train), *ids
        )
        is None
    )
