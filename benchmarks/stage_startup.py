"""Start-up cost of the data stages: `metarec stage NAME` as the training flow runs it.

Each stage runs in a fresh process (as DVC starts it), under a parent run id as the flow sets it, so its
MLflow record is deferred to the flow (components/core/tracking.py). Reported per stage: the process's wall
time, the stage's own work (from its record), and start-up = wall - work (interpreter, imports, config).
`--standalone` also times the stage run by hand, which logs its MLflow run itself.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/stage_startup.py --workspace workspace --repeats 3

Needs a workspace where `metarec run` has run (its data stages' inputs exist).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from components.core.tracking import stage_record_dir

STAGES = ("fetch", "ingest", "build_kg", "split")


def time_stage(workspace: Path, stage: str, deferred: bool) -> tuple[float, float]:
    """(wall seconds, work seconds) of one `metarec stage` process."""
    env = dict(os.environ)
    env.pop("METAREC_PARENT_RUN_ID", None)
    if deferred:
        env["METAREC_PARENT_RUN_ID"] = "benchmark"  # the record stays on disk; nothing is logged
    metarec = Path(sys.executable).parent / "metarec"
    start = time.perf_counter()
    subprocess.run([str(metarec), "stage", stage, "-w", str(workspace)], env=env, check=True)
    wall = time.perf_counter() - start
    record = stage_record_dir(workspace, stage) / "record.json"
    work = wall
    if deferred and record.exists():
        data = json.loads(record.read_text(encoding="utf-8"))
        work = (data["end_ms"] - data["start_ms"]) / 1000
    return wall, work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path("workspace"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--standalone", action="store_true", help="also time the stages run by hand")
    args = parser.parse_args()
    ws = args.workspace.resolve()
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min), cores: {os.cpu_count()}")
    print("| stage | wall (median) | stage work | start-up (wall - work) | by hand, MLflow in-process |")
    print("|---|---:|---:|---:|---:|")
    for stage in STAGES:
        runs = [time_stage(ws, stage, deferred=True) for _ in range(args.repeats)]
        wall = statistics.median(r[0] for r in runs)
        work = statistics.median(r[1] for r in runs)
        alone = "—"
        if args.standalone:
            alone = f"{statistics.median(time_stage(ws, stage, False)[0] for _ in range(args.repeats)):.2f} s"
        print(f"| {stage} | {wall:.2f} s | {work:.2f} s | {wall - work:.2f} s | {alone} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
