#!/usr/bin/env bash
# Load test of the real server: `metarec serve` on the workspace's registered champion (ONNX engine),
# 200 req/s of top-10 over loopback from another process, with a hot swap 10 s in (the same bundle
# registered again and force-promoted, so the swap itself is what is measured).
# Usage: benchmarks/serve_registry.sh [WORKSPACE] [PORT]   (after `make demo`)
set -euo pipefail
WS=${1:-workspace}
PORT=${2:-8011}
BIN=${BIN:-.venv/bin}
export HF_HUB_OFFLINE=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false METAREC_API_KEY=${METAREC_API_KEY:-bench-key}
VERSION=$("$BIN/python" - "$WS" <<'PY'
import sys
from pathlib import Path
from registry.store import open_registry
registry = open_registry(Path(sys.argv[1]))
print(registry.register(Path(sys.argv[1]) / "models" / "bundle").version)
PY
)
"$BIN/python" -c "import pandas as pd, sys; print('\n'.join(pd.read_parquet(sys.argv[1]).user_id.astype(str)))" \
    "$WS/data/processed/users.parquet" > "$WS/bench-users.txt"
"$BIN/metarec" serve --workspace "$WS" --port "$PORT" > "$WS/bench-serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$PORT/ready" > /dev/null && break
    sleep 0.5
done
"$BIN/python" benchmarks/serve_load.py --url "http://127.0.0.1:$PORT" --users-file "$WS/bench-users.txt" \
    --rate 200 --seconds 20 --swap-at 10 \
    --swap-cmd "$BIN/metarec registry promote $VERSION --workspace $WS --force --reason 'load-test hot swap'"
