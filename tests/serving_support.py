"""Test doubles and servers for the serving tests: a table-driven engine, a file-driven source, and uvicorn
servers on free ports (in a thread, or as a ``python -m components.serving.server`` subprocess).

``TableEngine`` stands in for the registry's ONNX engine until that exists: it implements the ``Engine``
protocol over a fixed random score table, so the HTTP layer is tested against the same contract.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from fastapi import FastAPI

from components.core.config import ServeSettings
from components.serving.feedback import FeedbackEvent
from components.serving.protocol import Recommendation

TESTS_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = TESTS_DIR.parent
API_KEY = "test-key-0123456789"

# Read by make_source in server subprocesses, which get their source from an import string.
VERSION_FILE_ENV = "METAREC_TEST_VERSION_FILE"
LOAD_SECONDS_ENV = "METAREC_TEST_LOAD_SECONDS"
# "<users>x<items>", e.g. "943x1682" for an ml-100k-sized table (benchmarks).
TABLE_SHAPE_ENV = "METAREC_TEST_TABLE_SHAPE"


class TableEngine:
    """An ``Engine`` over a fixed score table: users ``u1..uN``, items ``i1..iM``, 5 seen items per user.

    Scores depend on the version, so two versions rank differently, as real retrained models would.
    """

    def __init__(
        self,
        version: str,
        n_users: int = 50,
        n_items: int = 200,
        slow_k: int | None = None,
        slow_s: float = 0.5,
    ) -> None:
        """Build the table; requests with ``k == slow_k`` sleep ``slow_s`` (to hold a request in flight)."""
        self.version = version
        seed = int.from_bytes(hashlib.sha256(version.encode()).digest()[:4], "little")
        rng = np.random.default_rng(seed)
        self.user_list = [f"u{i + 1}" for i in range(n_users)]
        self.item_list = [f"i{j + 1}" for j in range(n_items)]
        self.item_ids = frozenset(self.item_list)
        self._users = {u: i for i, u in enumerate(self.user_list)}
        self._items = {it: j for j, it in enumerate(self.item_list)}
        self.scores = rng.random((n_users, n_items))
        self.popularity = rng.random(n_items)
        # Seen items do not depend on the version: they are the user's training interactions.
        seen_rng = np.random.default_rng(0)
        self.seen = [set(seen_rng.choice(n_items, 5, replace=False).tolist()) for _ in range(n_users)]
        self.slow_k = slow_k
        self.slow_s = slow_s

    def seen_items(self, user_id: str) -> set[str]:
        """Item ids the user interacted with (excluded from their recommendations)."""
        return {self.item_list[j] for j in self.seen[self._users[user_id]]}

    def known_user(self, user_id: str) -> bool:
        """Whether the user is in the table."""
        return user_id in self._users

    def recommend(
        self,
        user_id: str | None,
        k: int,
        profile: dict[str, str] | None = None,
        history: list[str] | None = None,
        explain: bool = True,
    ) -> list[Recommendation]:
        """Top-k by table score (known users) or popularity nudged by the profile (cold users)."""
        if self.slow_k is not None and k == self.slow_k:
            time.sleep(self.slow_s)
        unknown = [item for item in history or [] if item not in self._items]
        if unknown:
            raise ValueError(f"unknown items in history: {', '.join(unknown[:10])}")
        excluded = {self._items[item] for item in history or []}
        if user_id is not None and user_id in self._users:
            row = self._users[user_id]
            scores = self.scores[row].copy()
            excluded |= self.seen[row]
        elif profile or history:
            scores = self.popularity.copy()
            for key, value in sorted((profile or {}).items()):
                digest = hashlib.sha256(f"{key}={value}".encode()).digest()
                scores[int.from_bytes(digest[:4], "little") % len(scores)] += 1.0
        else:
            raise KeyError(user_id)
        scores[list(excluded)] = -np.inf
        k = min(k, len(scores) - len(excluded))
        top = np.argpartition(-scores, k - 1)[:k] if k else np.array([], dtype=int)
        top = top[np.argsort(-scores[top], kind="stable")]
        return [
            {
                "item_id": self.item_list[j],
                "rank": rank,
                "score": float(scores[j]),
                "explanation": f"user -[rated]-> item -[genre]-> genre <-[genre]- {self.item_list[j]}"
                if explain
                else None,
            }
            for rank, j in enumerate(top.tolist(), start=1)
        ]


class FileVersionSource:
    """An ``EngineSource`` whose champion is whatever version the file says, so any process can move it.

    Loading a version whose name starts with ``broken`` fails, as a corrupt bundle would.
    """

    def __init__(self, version_file: Path, load_s: float = 0.0, **engine_kwargs: Any) -> None:
        """Watch ``version_file``; each load takes ``load_s`` seconds."""
        self.version_file = Path(version_file)
        self.load_s = load_s
        self.engine_kwargs = engine_kwargs
        self.loads: list[str] = []

    def set_version(self, version: str) -> None:
        """Move the champion alias."""
        tmp = self.version_file.with_suffix(".tmp")
        tmp.write_text(version)
        tmp.replace(self.version_file)  # atomic, so a poll never reads half a name

    def current_version(self) -> str | None:
        """The version in the file, None when the file is missing or empty."""
        try:
            return self.version_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def load(self, version: str) -> TableEngine:
        """Build the version's table after ``load_s`` seconds."""
        self.loads.append(version)
        time.sleep(self.load_s)
        if version.startswith("broken"):
            raise RuntimeError(f"bundle for {version} is corrupt")
        return TableEngine(version, **self.engine_kwargs)


def make_source(settings: ServeSettings) -> FileVersionSource:
    """``--source serving_support:make_source`` for server subprocesses; configured by environment."""
    n_users, n_items = (int(n) for n in os.environ.get(TABLE_SHAPE_ENV, "50x200").split("x"))
    return FileVersionSource(
        Path(os.environ[VERSION_FILE_ENV]),
        float(os.environ.get(LOAD_SECONDS_ENV, "0")),
        n_users=n_users,
        n_items=n_items,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def thread_server(app: FastAPI) -> Iterator[str]:
    """Run ``app`` under a real uvicorn server in a thread; yields its base URL."""
    port = free_port()
    # log_config=None leaves pytest's logging (and caplog) alone.
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


class ServerProcess:
    """``python -m components.serving.server`` in a subprocess, serving the file-driven table engine."""

    def __init__(
        self, tmp: Path, db: Path | str, version_file: Path, workers: int = 1, name: str = "server"
    ) -> None:
        """Prepare (not start) a server writing feedback to ``db``; its output goes to ``tmp/<name>.log``.

        ``db`` is a SQLite file, or a feedback store URL (``postgresql://...``) used as it is.
        """
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"{name}.log"
        self.workers = workers
        self.cmd = [
            sys.executable,
            "-m",
            "components.serving.server",
            "--source",
            "serving_support:make_source",
            "--port",
            str(self.port),
            "--workers",
            str(workers),
            "--feedback-url",
            db if isinstance(db, str) and "://" in db else f"sqlite:///{db}",
            "--poll-seconds",
            "0.1",
            "--log-level",
            "warning",
        ]
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(PROJECT_ROOT)]),
            "METAREC_API_KEY": API_KEY,
            VERSION_FILE_ENV: str(version_file),
        }
        self.env.pop("METAREC_API_KEY_FILE", None)
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> ServerProcess:
        """Start it and wait until /ready answers 200."""
        with self.log.open("ab") as out:
            # Own process group: SIGKILL/SIGTERM reach the uvicorn supervisor and its workers together.
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=PROJECT_ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        # Each fresh connection may reach any worker: with several, one ready answer proves little, so
        # wait for a run of them (every worker has loaded by then, short of a very unlucky draw).
        needed, streak = (1 if self.workers == 1 else 10 * self.workers), 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}"
                )
            try:
                streak = streak + 1 if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200 else 0
            except httpx.TransportError:
                streak = 0
            if streak >= needed:
                return self
            time.sleep(0.05 if streak == 0 else 0.01)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log.read_text()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL the whole process group: no shutdown code runs, as in a crash."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (graceful) and wait; SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()


def event(event_id: str, **change: Any) -> FeedbackEvent:
    """One click event with defaults; ``change`` overrides fields (the feedback-store tests' unit)."""
    fields: dict[str, Any] = {
        "event_id": event_id,
        "type": "click",
        "user_id": "u1",
        "item_id": "i1",
        "ts": 1.5,
    }
    return FeedbackEvent(**{**fields, **change})


def events(prefix: str, n: int, items: int = 200) -> list[dict[str, Any]]:
    """``n`` valid feedback events with ids ``<prefix>-<i>``, cycling through the three types."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        kind = ("impression", "click", "rating")[i % 3]
        event: dict[str, Any] = {
            "event_id": f"{prefix}-{i}",
            "type": kind,
            "user_id": f"u{i % 50 + 1}",
            "item_id": f"i{i % items + 1}",
            "ts": 1_700_000_000 + i,
        }
        if kind == "impression":
            event["model_version"] = "v1"
            event["position"] = i % 10 + 1
        if kind == "rating":
            event["value"] = float(i % 5 + 1)
        out.append(event)
    return out
