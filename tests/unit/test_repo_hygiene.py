"""What the checkout must not gain: MLflow runs outside a workspace, machine paths in docs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _start_run_calls(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "start_run"
    ]


def test_every_mlflow_run_names_its_experiment() -> None:
    # A run without an experiment goes to "Default", whose artifact root MLflow fixes to ./mlruns of
    # the directory that first opened the store: the code checkout, for in-process flows under pytest.
    # That is how a top-level mlruns/ once got committed.
    offenders = []
    for folder in ("components", "flows", "registry", "metarec"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for call in _start_run_calls(path):
                if not {kw.arg for kw in call.keywords} & {"experiment_id", "run_id"}:
                    offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert not offenders, f"mlflow.start_run without experiment_id or run_id: {offenders}"


def test_no_mlruns_in_the_checkout() -> None:
    # mlruns/ is git-ignored, so test_pipeline's git-status check cannot see one appear: look for it.
    assert not (ROOT / "mlruns").exists(), "something logged MLflow runs into the code checkout"


def test_docs_and_benchmarks_name_no_machine_paths() -> None:
    pattern = re.compile(r"(?<![\w.$~>})-])/(?:work|tmp|root|home|Users|mnt|data|shared)/")
    found = []
    for path in sorted([*(ROOT / "docs").rglob("*.md"), *(ROOT / "benchmarks").rglob("*.py")]):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if pattern.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
