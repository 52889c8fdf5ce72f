"""Detached service processes on this machine: alive, stop a process group, a free port, a log's tail.

Shared by the local Prefect server (orchestration.py), PostgreSQL (services.py) and the production stack
(stack.py), each of which starts its servers in their own session so a stop takes their children too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not: a daemonised server is reaped by whoever is init)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or someone else's process reusing the pid
        return False
    with contextlib.suppress(OSError, IndexError):
        # /proc/<pid>/stat: "pid (comm) STATE ..."; comm may hold spaces, so split after the last ")".
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def terminate_group(pid: int, grace: float = 20.0) -> None:
    """SIGTERM the process group of ``pid`` (its own session), SIGKILL it after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it when it is our child
            if not alive(pid):
                break
            time.sleep(0.2)
        else:
            continue
        # The leader is gone; its children (uvicorn workers, flow runs) may linger a moment.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL if sig == signal.SIGKILL else signal.SIGTERM)
        return


def free_port(host: str = "127.0.0.1", preferred: int = 0) -> int | None:
    """``preferred`` when it is free on ``host``, else any free port; None when neither can be bound."""
    for port in dict.fromkeys((preferred, 0)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    return None


def log_tail(path: Path, lines: int = 8, missing: str = "(no log)") -> str:
    """The last ``lines`` lines of a log, for an error message."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return missing
    return "\n".join(text[-lines:])


def tree_rss(root: int) -> int | None:
    """Resident bytes of process ``root`` and all its live descendants (Linux ``/proc``; None elsewhere)."""
    proc = Path("/proc")
    if not (proc / "self" / "statm").exists():
        return None
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    page = os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int((proc / str(pid) / "statm").read_text().split()[1]) * page
    return total


class TreePeak:
    """Peak resident memory of a process and its descendants while it runs, sampled from a thread.

    A spike shorter than ``interval`` can be missed; pages that forked processes share count once per
    process, so the figure is an upper bound. ``peak_bytes`` stays None where ``/proc`` is missing.
    """

    def __init__(self, root: int, interval: float = 0.25) -> None:
        self.root = root
        self.interval = interval
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="tree-peak-rss", daemon=True)

    def _sample(self) -> None:
        while True:
            rss = tree_rss(self.root)
            if rss is None:
                return
            self.peak_bytes = max(self.peak_bytes or 0, rss)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
