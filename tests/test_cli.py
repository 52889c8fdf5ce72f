"""The CLI in-process: recommendations from a trained workspace, and the errors users hit first."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

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
    assert not (tmp_path / "x.csv").exists()


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
