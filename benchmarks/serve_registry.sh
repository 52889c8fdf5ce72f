#!/usr/bin/env bash
# The serving benchmarks of docs/benchmarks.md against the real server: `metarec serve` on the workspace's
# registered champion (ONNX engine, explanations on, k=10), driven over loopback keep-alive connections by
# benchmarks/serve_load.py in another process on the same machine.
#
#   1. GET /health, closed loop, 8 clients: the HTTP stack's own floor
#   2. known users, closed loop, 8 clients, 30 s
#   3. known users, open loop 200 req/s, 30 s
#   4. new users (POST: a profile and 5 history items), open loop 20 req/s, 30 s
#   5. open loop 200 req/s with a promotion 10 s in (the same bundle registered again, force-promoted)
#
# Usage: benchmarks/serve_registry.sh [WORKSPACE] [PORT] [WORKERS]   (after `make demo`)
# Each result is printed as JSON too, under $WS/bench/.
set -euo pipefail
WS=${1:-workspace}
PORT=${2:-8011}
WORKERS=${3:-1}
BIN=${BIN:-.venv/bin}
SECONDS_EACH=${SECONDS_EACH:-30}
export HF_HUB_OFFLINE=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false METAREC_API_KEY=${METAREC_API_KEY:-bench-key-0123456789}
OUT="$WS/bench"
mkdir -p "$OUT"
"$BIN/python" -c "import pandas as pd, sys; print('\n'.join(pd.read_parquet(sys.argv[1]).user_id.astype(str)))" \
    "$WS/data/processed/users.parquet" > "$OUT/users.txt"
"$BIN/python" -c "import pandas as pd, sys; print('\n'.join(pd.read_parquet(sys.argv[1]).item_id.astype(str)))" \
    "$WS/data/processed/items.parquet" > "$OUT/items.txt"

"$BIN/metarec" serve --workspace "$WS" --port "$PORT" --workers "$WORKERS" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
start=$(date +%s.%N)
for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$PORT/ready" > /dev/null && break
    sleep 0.2
done
echo "ready (answering) after $(echo "$(date +%s.%N) - $start" | bc) s"
for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$PORT/ready" | grep -q '"warming":false' && break
    sleep 0.2
done
echo "warm (known users' lists computed) after $(echo "$(date +%s.%N) - $start" | bc) s; RSS of the server processes:"
ps -o pid=,rss= --ppid "$SERVER" -p "$SERVER" | awk '{printf "  pid %s: %.0f MB\n", $1, $2/1024}'

load() {
    local name=$1; shift
    "$BIN/python" benchmarks/serve_load.py --url "http://127.0.0.1:$PORT" --users-file "$OUT/users.txt" \
        --seconds "$SECONDS_EACH" "$@" --json > "$OUT/$name.json"
    "$BIN/python" - "$OUT/$name.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for part in ("overall", "swap_window"):
    if part in r:
        o = r[part]
        print(f"{sys.argv[2]:>14} {part:>11}: {o['requests']:6d} req, {o['errors']} errors, "
              f"{o['throughput_rps']:7.1f} req/s, p50 {o['p50_ms']:.2f} p95 {o['p95_ms']:.2f} "
              f"p99 {o['p99_ms']:.2f} max {o['max_ms']:.2f} ms, versions {o['versions']}")
if "new_version_after_s" in r:
    print(f"{'':>14} new version answered {r['new_version_after_s']} s after the promotion began")
PY
}
load health --clients 8 --health
load closed8 --clients 8
load open200 --rate 200
load cold20 --rate 20 --cold-items-file "$OUT/items.txt"
VERSION=$("$BIN/python" - "$WS" <<'PY'
import sys
from pathlib import Path
from registry.store import open_registry
registry = open_registry(Path(sys.argv[1]))
print(registry.register(Path(sys.argv[1]) / "models" / "bundle").version)
PY
)
load swap200 --rate 200 --swap-at 10 \
    --swap-cmd "$BIN/metarec registry promote $VERSION --workspace $WS --force --reason 'load-test hot swap'"
