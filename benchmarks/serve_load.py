"""Load on the serving API over loopback: latency percentiles, throughput, errors, hot swap.

Two modes, both over keep-alive connections from this (separate) process:

* open loop (default, ``--rate``): requests at a constant rate whatever the server does;
* closed loop (``--clients N``): N clients, each sending its next request when the last one answered,
  as many as the server sustains.

Usage:
    .venv/bin/python benchmarks/serve_load.py                       # spawn a stand-in server, 200 req/s
    .venv/bin/python benchmarks/serve_load.py --swap-at 10          # ... and move the champion at t=10 s
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8000 --users-file users.txt
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8000 --clients 8 --seconds 30
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8000 --rate 20 --cold-items-file f.txt

Requests are sent at a constant rate whatever the server does (open loop), so a stall shows up as latency
instead of silently lowering the rate. Latency is measured from each request's scheduled send time, which
includes any queueing in this client; ``service`` is send-to-response only. Goal: p99 <= 10 ms for top-10
at 200 req/s, also during a hot swap.

Without --url the server is spawned (``python -m components.serving.server``) with the test suite's
table engine (``tests/serving_support.py``, ml-100k-sized: 943 users x 1682 items) as a stand-in; its
champion is a file, which --swap-at rewrites. benchmarks/serve_registry.sh runs it against the real
registry-backed ONNX server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


@dataclass
class Sample:
    """One request: when it was due, sent and answered, and what came back."""

    due: float
    sent: float
    done: float
    status: int
    version: str


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn_server(args: argparse.Namespace, tmp: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    """Start the stand-in server; returns the process, its URL and its champion version file."""
    version_file = tmp / "champion"
    version_file.write_text("v1")
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
        "METAREC_TEST_VERSION_FILE": str(version_file),
        "METAREC_TEST_LOAD_SECONDS": str(args.load_seconds),
        "METAREC_TEST_TABLE_SHAPE": args.table_shape,
        "METAREC_API_KEY": "benchmark-key",
    }
    cmd = [
        sys.executable,
        "-m",
        "components.serving.server",
        "--source",
        "serving_support:make_source",
        "--port",
        str(port),
        "--workers",
        str(args.workers),
        "--feedback-url",
        f"sqlite:///{tmp / 'feedback.db'}",
        "--poll-seconds",
        "0.5",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if get(url, "/ready")[0] == 200:
                return proc, url, version_file
        except OSError:
            pass
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit("server not ready after 60 s")


def get(url: str, path: str) -> tuple[int, bytes]:
    """One GET on a fresh connection."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def trigger_swap(args: argparse.Namespace, version_file: Path | None) -> None:
    """Move the champion alias so the server hot-swaps.

    Against the real registry, --swap-cmd moves ``models:/<name>@champion`` (benchmarks/serve_registry.sh
    passes ``metarec registry promote VERSION --force``); the stand-in's champion is a file.
    """
    if args.swap_cmd:
        # Its output must not mix with this tool's (--json writes to stdout).
        subprocess.run(shlex.split(args.swap_cmd), check=True, stdout=subprocess.DEVNULL)
    elif version_file is not None:
        tmp = version_file.with_suffix(".tmp")
        tmp.write_text("v2")
        tmp.replace(version_file)
    else:
        raise SystemExit("--swap-at against --url needs --swap-cmd")


OCCUPATIONS = (
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive", "healthcare",
    "homemaker", "lawyer", "librarian", "marketing", "none", "other", "programmer", "retired", "salesman",
    "scientist", "student", "technician", "writer",
)  # fmt: skip


def profile_for(n: int) -> dict[str, str]:
    """A new user's profile: 50 ages x 2 genders x 21 occupations, so few repeat within a run."""
    return {"age": str(18 + n % 50), "gender": "FM"[n % 2], "occupation": OCCUPATIONS[(n // 2) % 21]}


def request_for(args: argparse.Namespace, users: list[str], n: int) -> tuple[str, str, bytes | None]:
    """Request ``n``: a known user's GET, or with ``--cold-items`` a new user's POST (profile + history)."""
    if args.health:
        return "GET", "/health", None
    if not args.cold_items:
        return "GET", f"/recommendations/{urllib.parse.quote(users[n % len(users)])}?k={args.k}", None
    items = args.cold_items
    history = [items[(n * 7 + j * 131) % len(items)] for j in range(args.cold_history)]
    body = {"profile": profile_for(n), "history": history, "k": args.k}
    return "POST", "/recommendations", json.dumps(body).encode()


def send(
    conn: http.client.HTTPConnection, request: tuple[str, str, bytes | None], headers: dict[str, str]
) -> tuple[http.client.HTTPConnection, int, str]:
    """One request on a keep-alive connection: (the connection to use next, status, model version).

    A failed request counts as status 0 and the connection is replaced, as a client's pool would.
    """
    method, path, payload = request
    try:
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        body = response.read()
        version = json.loads(body).get("model_version", "") if response.status == 200 else ""
        return conn, response.status, version
    except (OSError, http.client.HTTPException, ValueError):
        conn.close()
        return http.client.HTTPConnection(conn.host, conn.port, timeout=5), 0, ""


def run_load(args: argparse.Namespace, url: str, users: list[str], version_file: Path | None) -> list[Sample]:
    """Send requests at ``args.rate`` per second for warmup + seconds; returns the measured samples."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    headers["Content-Type"] = "application/json"
    due_times: queue.SimpleQueue[tuple[int, float] | None] = queue.SimpleQueue()
    samples: list[Sample] = []
    lock = threading.Lock()

    def worker() -> None:
        # One keep-alive connection per worker, as a client's connection pool would hold.
        conn = http.client.HTTPConnection(host, port, timeout=5)
        while (job := due_times.get()) is not None:
            n, due = job
            sent = time.perf_counter()
            conn, status, version = send(conn, request_for(args, users, n), headers)
            done = time.perf_counter()
            with lock:
                samples.append(Sample(due, sent, done, status, version))
        conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.connections)]
    for thread in threads:
        thread.start()
    total = args.warmup + args.seconds
    start = time.perf_counter()
    swapped = args.swap_at is None
    n = 0
    while True:
        due = start + n / args.rate
        if due - start >= total:
            break
        if not swapped and due - start >= args.warmup + args.swap_at:
            threading.Thread(target=trigger_swap, args=(args, version_file), daemon=True).start()
            swapped = True
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        due_times.put((n, due))
        n += 1
    for _ in threads:
        due_times.put(None)
    for thread in threads:
        thread.join(30)
    measured_from = start + args.warmup
    return [s for s in samples if s.due >= measured_from]


def run_closed(args: argparse.Namespace, url: str, users: list[str]) -> tuple[list[Sample], float]:
    """``args.clients`` keep-alive clients, each sending its next request as soon as the last answered.

    Returns the samples after the warm-up and the measured seconds. Latency is send-to-response (a closed
    loop has no schedule to fall behind), and the throughput is what the server sustained.
    """
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    headers["Content-Type"] = "application/json"
    samples: list[Sample] = []
    lock = threading.Lock()
    start = time.perf_counter()
    measured_from, end = start + args.warmup, start + args.warmup + args.seconds

    def client(offset: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=5)
        mine: list[Sample] = []
        n = offset
        while (sent := time.perf_counter()) < end:
            conn, status, version = send(conn, request_for(args, users, n), headers)
            n += args.clients
            if sent >= measured_from:
                mine.append(Sample(sent, sent, time.perf_counter(), status, version))
        conn.close()
        with lock:
            samples.extend(mine)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(args.warmup + args.seconds + 30)
    return samples, args.seconds


def summarise(samples: list[Sample], seconds: float) -> dict[str, Any]:
    """Latency percentiles (ms), throughput and errors of a set of samples."""
    ok = [s for s in samples if s.status == 200]
    latency = [(s.done - s.due) * 1000 for s in ok] or [float("nan")]
    service = [(s.done - s.sent) * 1000 for s in ok] or [float("nan")]
    versions: dict[str, int] = {}
    for s in ok:
        versions[s.version] = versions.get(s.version, 0) + 1
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "throughput_rps": round(len(ok) / seconds, 1),
        "p50_ms": round(percentile(latency, 50), 2),
        "p95_ms": round(percentile(latency, 95), 2),
        "p99_ms": round(percentile(latency, 99), 2),
        "max_ms": round(max(latency), 2),
        "service_p99_ms": round(percentile(service, 99), 2),
        "versions": versions,
    }


def main() -> None:
    """Parse arguments, run the load (spawning a server if no --url) and print the summary."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="target this server instead of spawning the stand-in")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second (open loop)")
    parser.add_argument(
        "--clients",
        type=int,
        default=0,
        help="closed loop: N keep-alive clients, each as fast as answered",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="measured duration")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured lead-in")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections (threads)")
    parser.add_argument("--users-file", type=Path, help="user ids, one a line (default: u1..u<users>)")
    parser.add_argument("--api-key", default=os.environ.get("METAREC_API_KEY"), help="for protected reads")
    parser.add_argument("--swap-at", type=float, help="move the champion this many seconds into the run")
    parser.add_argument("--swap-cmd", help="command that moves the champion (required with --url)")
    parser.add_argument("--workers", type=int, default=1, help="spawned server's uvicorn workers")
    parser.add_argument("--table-shape", default="943x1682", help="stand-in engine: <users>x<items>")
    parser.add_argument("--load-seconds", type=float, default=1.0, help="stand-in engine's load time")
    parser.add_argument(
        "--cold-items-file",
        type=Path,
        help="item ids, one a line: POST /recommendations for new users (profile + --cold-history items)",
    )
    parser.add_argument("--health", action="store_true", help="GET /health: the HTTP stack's own floor")
    parser.add_argument("--cold-history", type=int, default=5, help="history items per new-user request")
    parser.add_argument("--switch-interval", type=float, default=0.0002, help="this client's GIL switch (s)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()
    if args.swap_at is not None and args.clients > 0:
        parser.error("--swap-at is for the open loop (--rate); the closed loop has no schedule to swap on")
    # The client's threads share one GIL: at the default 5 ms switch interval a thread due to send (or to
    # read its answer) can wait that long for another, which this tool would report as server latency.
    sys.setswitchinterval(args.switch_interval)

    args.cold_items = []
    if args.cold_items_file:
        args.cold_items = [
            line.strip() for line in args.cold_items_file.read_text().splitlines() if line.strip()
        ]
    if args.users_file:
        users = [line.strip() for line in args.users_file.read_text().splitlines() if line.strip()]
    else:
        users = [f"u{i + 1}" for i in range(int(args.table_shape.split("x")[0]))]

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        proc = None
        version_file = None
        url = args.url
        if url is None:
            proc, url, version_file = spawn_server(args, Path(tmp))
        try:
            if args.clients > 0:
                samples, _ = run_closed(args, url, users)
            else:
                samples = run_load(args, url, users, version_file)
        finally:
            if proc is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)

    mode = f"closed loop, {args.clients} clients" if args.clients > 0 else f"open loop {args.rate:.0f} req/s"
    result: dict[str, Any] = {
        "mode": mode,
        "rate": None if args.clients > 0 else args.rate,
        "clients": args.clients or None,
        "k": args.k,
        "overall": summarise(samples, args.seconds),
    }
    if args.swap_at is not None:
        # The swap window: from the alias move until 2 s after the first answer from the new version
        # (poll, download, verify, load, warm and switch all fall inside), or to the end of the run.
        start = min(s.due for s in samples)
        answered = [s for s in samples if s.status == 200]
        first = min(answered, key=lambda s: s.due).version if answered else ""
        moved = [s.done - start for s in samples if s.status == 200 and s.version != first]
        until = min(moved) + 2.0 if moved else args.seconds
        window = [s for s in samples if args.swap_at <= s.due - start < until]
        result["swap_window"] = summarise(window, until - args.swap_at)
        result["new_version_after_s"] = round(min(moved) - args.swap_at, 2) if moved else None
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{mode}, top-{args.k}, {args.seconds:.0f} s measured, {url}")
    columns = ("requests", "errors", "throughput_rps", "p50_ms", "p95_ms", "p99_ms", "max_ms")
    print(f"{'':12} " + " ".join(f"{c.replace('throughput_rps', 'req/s'):>8}" for c in columns))
    for name in ("overall", "swap_window"):
        if name in result:
            row = result[name]
            cells = " ".join(f"{row[c]:8d}" if isinstance(row[c], int) else f"{row[c]:8.2f}" for c in columns)
            print(f"{name:12} {cells}  versions {row['versions']}")


if __name__ == "__main__":
    main()
