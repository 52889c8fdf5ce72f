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
import asyncio
import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: A request unanswered this long counts as an error (status 0).
TIMEOUT_SECONDS = 5.0
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


class Connection:
    """One keep-alive HTTP/1.1 connection, as a client's pool holds; opened on first use.

    A minimal client on asyncio streams: a thread-per-connection client with http.client measured a
    higher floor on this machine (GET /health p99 8.6 ms against 5.6 ms at 200 req/s), its own GIL and
    header parsing showing up as server latency. Responses must carry Content-Length, as the API's do.
    """

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        """Where to connect and the headers every request carries."""
        self.host, self.port = host, port
        self.head = "".join(
            f"{name}: {value}\r\n" for name, value in {"Host": f"{host}:{port}", **headers}.items()
        )
        self.answered = False  # the current request's response head has arrived
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, request: tuple[str, str, bytes | None]) -> tuple[int, str]:
        """Send one request and read its answer: (status, model version). A failure is status 0 and
        closes the connection; the next request opens a new one, as a pool would."""
        method, path, payload = request
        if self.reader is not None and self.reader.at_eof():
            self.close()  # the server closed it while idle (uvicorn: after 5 s); pools reconnect too
        for attempt in (1, 2):
            reused = self.writer is not None
            self.answered = False
            try:
                return await asyncio.wait_for(self._exchange(method, path, payload or b""), TIMEOUT_SECONDS)
            except asyncio.IncompleteReadError as err:
                self.close()
                if not (reused and attempt == 1 and not err.partial and not self.answered):
                    return 0, ""
                # Closed by the server just as we reused it, before any answer: once more, as pools do.
            except Exception:  # refused, reset, timed out, malformed or without Content-Length: an error
                self.close()
                return 0, ""
        return 0, ""

    async def _exchange(self, method: str, path: str, payload: bytes) -> tuple[int, str]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        length = f"Content-Length: {len(payload)}\r\n" if payload else ""
        self.writer.write(f"{method} {path} HTTP/1.1\r\n{self.head}{length}\r\n".encode() + payload)
        head = await self.reader.readuntil(b"\r\n\r\n")
        self.answered = True  # a cut-off body after this is an error, never retried
        status = int(head.split(b" ", 2)[1])
        fields = dict(line.split(b":", 1) for line in head.lower().split(b"\r\n")[1:] if b":" in line)
        body = await self.reader.readexactly(int(fields[b"content-length"]))
        if fields.get(b"connection", b"").strip() == b"close":
            self.close()
        version = json.loads(body).get("model_version", "") if status == 200 else ""
        return status, str(version or "")

    def close(self) -> None:
        """Drop the connection (the next request reconnects)."""
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _headers(args: argparse.Namespace) -> dict[str, str]:
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    headers["Content-Type"] = "application/json"
    return headers


def run_load(args: argparse.Namespace, url: str, users: list[str], version_file: Path | None) -> list[Sample]:
    """Send requests at ``args.rate`` per second for warmup + seconds; returns the measured samples."""
    return _run(_open_loop(args, url, users, version_file))


async def _open_loop(
    args: argparse.Namespace, url: str, users: list[str], version_file: Path | None
) -> list[Sample]:
    parts = urllib.parse.urlsplit(url)
    pool: asyncio.LifoQueue[Connection] = asyncio.LifoQueue()
    for _ in range(args.connections):
        pool.put_nowait(Connection(parts.hostname or "127.0.0.1", parts.port or 80, _headers(args)))
    samples: list[Sample] = []

    async def one(n: int, due: float) -> None:
        # A request waits for a free connection when all are busy: that wait counts, as in a real pool.
        conn = await pool.get()
        sent = time.perf_counter()
        status, version = await conn.request(request_for(args, users, n))
        samples.append(Sample(due, sent, time.perf_counter(), status, version))
        pool.put_nowait(conn)

    loop = asyncio.get_running_loop()
    tasks = []
    total = args.warmup + args.seconds
    start = time.perf_counter()
    swapped = args.swap_at is None
    n = 0
    while (due := start + n / args.rate) - start < total:
        if not swapped and due - start >= args.warmup + args.swap_at:
            # Off the loop: the promotion is another process, waited for on a thread.
            loop.run_in_executor(None, trigger_swap, args, version_file)
            swapped = True
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(n, due)))
        n += 1
    await asyncio.wait(tasks, timeout=30)
    # A request still waiting 30 s after the last was due is an error, not a sample left out.
    late = time.perf_counter()
    for index, task in enumerate(tasks):
        if not task.done():
            task.cancel()
            samples.append(Sample(start + index / args.rate, late, late, 0, ""))
    while not pool.empty():
        pool.get_nowait().close()
    measured_from = start + args.warmup
    return [s for s in samples if s.due >= measured_from]


def run_closed(args: argparse.Namespace, url: str, users: list[str]) -> tuple[list[Sample], float]:
    """``args.clients`` keep-alive clients, each sending its next request as soon as the last answered.

    Returns the samples after the warm-up and the measured seconds. Latency is send-to-response (a closed
    loop has no schedule to fall behind), and the throughput is what the server sustained.
    """
    return _run(_closed_loop(args, url, users)), args.seconds


async def _closed_loop(args: argparse.Namespace, url: str, users: list[str]) -> list[Sample]:
    parts = urllib.parse.urlsplit(url)
    samples: list[Sample] = []
    start = time.perf_counter()
    measured_from, end = start + args.warmup, start + args.warmup + args.seconds

    async def client(offset: int) -> None:
        conn = Connection(parts.hostname or "127.0.0.1", parts.port or 80, _headers(args))
        n = offset
        while (sent := time.perf_counter()) < end:
            status, version = await conn.request(request_for(args, users, n))
            n += args.clients
            if sent >= measured_from:
                samples.append(Sample(sent, sent, time.perf_counter(), status, version))
        conn.close()

    await asyncio.gather(*(client(c) for c in range(args.clients)))
    return samples


def _run(main: Coroutine[Any, Any, list[Sample]]) -> list[Sample]:
    """Run on uvloop where installed (a dependency of the server, so normally), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


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
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections (open loop)")
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
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()
    if args.swap_at is not None and args.clients > 0:
        parser.error("--swap-at is for the open loop (--rate); the closed loop has no schedule to swap on")

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
