"""The full pipeline on ml-100k through the CLI, as `make demo` runs it (slow: several minutes).

Run with `make test-all` or `pytest -m slow`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

METAREC = Path(sys.executable).parent / "metarec"

pytestmark = [pytest.mark.slow, pytest.mark.network]


def test_metarec_run_on_ml100k(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    proc = subprocess.run(
        [str(METAREC), "run", "--workspace", str(ws), "-S", "model.name=itemknn"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((ws / "metrics.json").read_text(encoding="utf-8"))
    assert abs(metrics["test"]["ndcg@10"] - 0.110) <= 0.005  # the calibration reference
    mined = json.loads((ws / "data/metapaths/metapaths.json").read_text(encoding="utf-8"))
    assert mined["combined_valid_ndcg@10"] > mined["pop_valid_ndcg@10"]
    signal = json.loads((ws / "data/text/validation_signal.json").read_text(encoding="utf-8"))
    assert set(signal) == {"frozen", "finetuned"}
    recs = tmp_path / "recs.csv"
    out = subprocess.run(
        [str(METAREC), "recommend", "--workspace", str(ws), "--all-users", "--k", "10", "--out", str(recs)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert len(recs.read_text(encoding="utf-8").splitlines()) == 1 + 943 * 10
