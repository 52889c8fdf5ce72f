"""User errors through `metarec run`: one `error:` block naming file, line and field; no traceback."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import METAREC, PROJECT_ROOT, subprocess_env

MALFORMED = Path(__file__).parents[1] / "fixtures" / "malformed"
CASES: dict[str, dict] = yaml.safe_load((MALFORMED / "cases.yaml").read_text(encoding="utf-8"))["cases"]
# One per kind of file: interactions, a pre-split part, the knowledge graph. Each run costs ~20 s.
RUN_CASES = ["rating_nan", "presplit_duplicate_across_parts", "kg_empty_tail"]
FETCH_OUTS = {"data/raw"}


def _stage_outs() -> set[str]:
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    # An out is a path, or a one-key mapping from a path to its options.
    return {
        next(iter(out)) if isinstance(out, dict) else out
        for s in stages.values()
        for out in s.get("outs", [])
    }


@pytest.mark.parametrize("name", RUN_CASES)
def test_malformed_dataset_through_metarec_run(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    ws = tmp_path / "ws"
    cmd = [str(METAREC), "run", "-w", str(ws), "-S", f"data.path={MALFORMED / name}", "-S", "data.name=bad"]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "Traceback" not in output, output
    errors = re.findall(r"^error: .*$", output, flags=re.M)
    assert len(errors) == 1, output
    where = f"{case['file']}:{case['line']}"
    assert re.search(re.escape(where) + r"(?!\d)", errors[0]) and case["message"] in errors[0], errors[0]
    assert output.count(case["message"]) == 1, output  # not repeated by Prefect's failure logs
    # The block points at the log, which has the details the console leaves out.
    log = ws / "logs" / "metarec.log"
    assert f"details in {log}" in output, output
    assert "Traceback" in log.read_text(encoding="utf-8")
    # No partial output: only the fetch stage (which succeeded) left anything.
    assert {out for out in _stage_outs() if (ws / out).exists()} <= FETCH_OUTS
    assert not (ws / "metrics.json").exists()
    assert not (tmp_path / "mlruns").exists()


def test_unexpected_error_is_one_line_and_its_traceback_goes_to_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from metarec.cli import app

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "mlflow.db").write_text("not a database", encoding="utf-8")  # a bug's stand-in: sqlite refuses it
    result = CliRunner().invoke(app, ["leaderboard", "-w", str(ws)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert len(re.findall(r"^error: DatabaseError: ", result.output, flags=re.M)) == 1, result.output
    log = ws / "logs" / "metarec.log"
    assert f"details in {log} (or rerun with --debug)" in result.output
    assert "Traceback" in log.read_text(encoding="utf-8")
    # --debug lets the exception (and so its traceback) through. It exports METAREC_DEBUG for the stage
    # processes; monkeypatch takes it out of this process again afterwards.
    monkeypatch.setenv("METAREC_DEBUG", "1")
    result = CliRunner().invoke(app, ["--debug", "leaderboard", "-w", str(ws)])
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "DatabaseError"
