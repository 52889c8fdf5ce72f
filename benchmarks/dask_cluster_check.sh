#!/usr/bin/env bash
# docs/operations.md's cluster commands on loopback: a `dask scheduler` and a `dask worker` with two
# processes, then `metarec run` on the tiny fixture twice, in order (eval.workers=1) and on the cluster
# (mine.task_runner=dask, mine.dask_address, eval.dask_address); the two metrics.json must be equal.
# Usage: benchmarks/dask_cluster_check.sh [workdir]    (about 5 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-$(mktemp -d -t metarec-dask-XXXXXX)}
mkdir -p "$W"
PORT=$(.venv/bin/python -c 'from components.core.processes import free_port; print(free_port())')
ADDRESS=tcp://127.0.0.1:$PORT
.venv/bin/dask scheduler --host 127.0.0.1 --port "$PORT" --no-dashboard > "$W/scheduler.log" 2>&1 &
SCHEDULER=$!
trap 'kill $SCHEDULER ${WORKER:-} 2>/dev/null || true' EXIT
sleep 4
.venv/bin/dask worker "$ADDRESS" --nworkers 2 --nthreads 1 --no-dashboard > "$W/worker.log" 2>&1 &
WORKER=$!
sleep 6
tiny=(-S data.path="$PWD/tests/fixtures/tiny" -S data.name=tiny -S split.train_ratio=0.6 -S split.valid_ratio=0.2
    -S "eval.ks=[2,5]" -S eval.primary=ndcg@5 -S eval.cold_fraction=0.25 -S registry.enabled=false
    -S text.finetune.steps=3 -S text.finetune.batch_size=4 -S text.finetune.checkpoint_every=2
    -S text.finetune.warmup_steps=1)
.venv/bin/metarec run -w "$W/serial" "${tiny[@]}" -S eval.workers=1 > "$W/serial.log" 2>&1
.venv/bin/metarec run -w "$W/cluster" "${tiny[@]}" -S mine.task_runner=dask -S mine.dask_address="$ADDRESS" \
    -S eval.dask_address="$ADDRESS" > "$W/cluster.log" 2>&1
echo "client connections the scheduler received: $(grep -c 'Receive client connection' "$W/scheduler.log")"
.venv/bin/python - "$W" <<'PY'
import json, sys
from pathlib import Path

runs = {name: json.loads((Path(sys.argv[1]) / name / "metrics.json").read_text()) for name in ("serial", "cluster")}
parts = ("valid", "test", "cold", "mixed")
for name, metrics in runs.items():
    print(name, {p: round(metrics[p]["ndcg@5"], 6) for p in parts})
same = all(runs["serial"][p] == runs["cluster"][p] for p in parts)
print("metrics equal" if same else "metrics DIFFER")
sys.exit(0 if same else 1)
PY
