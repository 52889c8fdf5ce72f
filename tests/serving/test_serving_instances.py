"""Two serving instances side by side (issue 14, item 3): two `metarec serve` processes on different ports
share one registry and one PostgreSQL feedback store, both hot-swap on a promotion, and a `kill -9` of one
while clients post feedback to both loses no acknowledged event while the other keeps answering."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import METAREC, TrainedWorkspace, subprocess_env
from tests.serving_support import events, free_port

KEY = "instances-secret-key"
BATCH = 5


@dataclass
class Instance:
    """One `metarec serve` subprocess in its own process group (so SIGKILL reaches all of it)."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return f"--- {self.name} ---\n{self.log.read_text(errors='replace')[-3000:]}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()


def _version(instance: Instance) -> str | None:
    """The version /ready reports, None while not ready; fails if the process died."""
    if instance.proc.poll() is not None:
        raise AssertionError(f"{instance.name} exited with {instance.proc.returncode}\n{instance.tail()}")
    try:
        response = httpx.get(f"{instance.url}/ready", timeout=2)
    except httpx.TransportError:
        return None
    return str(response.json()["model_version"]) if response.status_code == 200 else None


def _wait_all(instances: list[Instance], version: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(instances)
    while pending and time.monotonic() < deadline:
        pending = [i for i in pending if _version(i) != version]
        if pending:
            time.sleep(0.1)
    assert not pending, f"not serving version {version} after {timeout}s:\n" + "\n".join(
        f"{i.name}: {_version(i)}\n{i.tail()}" for i in pending
    )


@pytest.fixture
def instances(
    metarec_workspace: TrainedWorkspace, postgres_db_url: str, tmp_path: Path
) -> Iterator[list[Instance]]:
    """Two servers of the workspace's champion, one PostgreSQL feedback store, one bundle cache."""
    metarec_workspace.check()
    env = {
        **subprocess_env(tmp_path),
        "METAREC_API_KEY": KEY,
        "METAREC_FEEDBACK_URL": postgres_db_url,
        # Shared, as two instances on one host share the user's cache: both download each version at once.
        "METAREC_CACHE_DIR": str(tmp_path / "cache"),
    }
    for name in ("METAREC_API_KEY_FILE", "METAREC_FEEDBACK_URL_FILE", "PROMETHEUS_MULTIPROC_DIR"):
        env.pop(name, None)
    started: list[Instance] = []
    try:
        for name in ("a", "b"):
            port = free_port()
            log = tmp_path / f"serve-{name}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [str(METAREC), "serve", "-w", str(metarec_workspace.path), "--port", str(port)],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            started.append(Instance(name, f"http://127.0.0.1:{port}", proc, log))
        yield started
    finally:
        for instance in started:
            instance.stop()


@dataclass
class Poster:
    """A client thread posting feedback batches; on a failed batch it fails over to the other server."""

    name: str
    targets: list[str]
    acked: set[str] = field(default_factory=set)
    sent: set[str] = field(default_factory=set)
    acks_by_target: dict[str, int] = field(default_factory=dict)
    failovers: int = 0
    errors: list[str] = field(default_factory=list)

    def run(self, stop: threading.Event) -> None:
        target = 0
        batch_no = 0
        with httpx.Client(headers={"X-API-Key": KEY}, timeout=10) as client:
            while not stop.is_set():
                batch = events(f"{self.name}-{batch_no}", BATCH, items=8)
                batch_no += 1
                ids = {event["event_id"] for event in batch}
                self.sent |= ids
                for _attempt in range(20):  # an unacknowledged batch is retried until acknowledged
                    url = self.targets[target]
                    try:
                        response = client.post(f"{url}/feedback", json={"events": batch})
                    except httpx.TransportError:
                        response = None
                    if response is not None and response.status_code == 200:
                        self.acked |= ids
                        self.acks_by_target[url] = self.acks_by_target.get(url, 0) + 1
                        break
                    if response is not None and response.status_code != 503:
                        self.errors.append(f"{url}: {response.status_code} {response.text[:200]}")
                        return
                    if response is None:  # that server is gone: the client fails over
                        target = (target + 1) % len(self.targets)
                        self.failovers += 1
                    time.sleep(0.05)
                else:
                    self.errors.append(f"batch {batch_no - 1} never acknowledged")
                    return


def test_two_instances_swap_together_and_survive_a_kill(
    instances: list[Instance], metarec_workspace: TrainedWorkspace, postgres_db_url: str
) -> None:
    """Both servers swap on one promotion; `kill -9` of one under feedback load loses no acked event."""
    from components.serving.feedback import open_store
    from registry.store import open_registry

    ws = metarec_workspace.path
    registry = open_registry(ws)
    old = registry.aliases()["champion"]
    _wait_all(instances, old, timeout=90)  # start-up: both load the champion from the shared cache

    new = str(registry.register(ws / "models" / "bundle").version)
    assert new != old
    move = registry.promote(new, reason="two-instance swap test", force=True)
    assert move.moved, move
    started = time.monotonic()
    _wait_all(instances, new, timeout=30)
    swap_s = time.monotonic() - started

    victim, survivor = instances
    stop_posting, stop_reading = threading.Event(), threading.Event()
    posters = [Poster("to-victim", [victim.url, survivor.url]), Poster("to-survivor", [survivor.url])]
    reads: dict[str, int] = {}
    read_failures: list[str] = []

    def read() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop_reading.is_set():
                try:
                    response = client.get(f"{survivor.url}/recommendations/u1", params={"k": 3})
                    key = f"{response.status_code}:{response.json().get('model_version')}"
                except (httpx.HTTPError, ValueError) as exc:
                    key = f"error:{type(exc).__name__}"
                reads[key] = reads.get(key, 0) + 1
                if key != f"200:{new}":
                    read_failures.append(key)

    threads = [threading.Thread(target=p.run, args=(stop_posting,), daemon=True) for p in posters]
    threads.append(threading.Thread(target=read, daemon=True))
    for thread in threads:
        thread.start()
    try:

        def acks(url: str) -> int:
            return sum(p.acks_by_target.get(url, 0) for p in posters)

        def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
            deadline = time.monotonic() + timeout
            while not condition() and time.monotonic() < deadline:
                assert not any(p.errors for p in posters), [p.errors for p in posters]
                time.sleep(0.02)
            assert condition(), f"{what} within {timeout}s: {[p.acks_by_target for p in posters]}"

        until(lambda: acks(victim.url) >= 20 and acks(survivor.url) >= 20, 20, "both servers acknowledge")
        victim.kill()  # mid-stream: the victim's poster has a batch in flight or about to be
        killed_at = acks(survivor.url)
        until(lambda: acks(survivor.url) >= killed_at + 40, 20, "the survivor keeps acknowledging")
    finally:
        stop_posting.set()
        stop_reading.set()
        for thread in threads:
            thread.join(15)
    assert not any(thread.is_alive() for thread in threads)
    assert not [p.errors for p in posters if p.errors]
    assert posters[0].failovers >= 1, "the victim's client never noticed the kill"
    assert not read_failures, f"survivor failed reads: {reads}"
    assert reads.get(f"200:{new}", 0) > 0
    assert _version(survivor) == new

    store = open_store(postgres_db_url)
    try:
        stored = [record.event.event_id for record in store.read_since(0, limit=1_000_000)]
    finally:
        store.close()
    acked = set().union(*(p.acked for p in posters))
    sent = set().union(*(p.sent for p in posters))
    assert len(stored) == len(set(stored)), "an event was stored twice"
    assert acked <= set(stored), f"{len(acked - set(stored))} acknowledged events lost"
    # Every batch was retried until acknowledged, so every event sent is stored, and nothing else.
    assert set(stored) == sent == acked
    print(f"swap {swap_s:.1f}s, {len(stored)} events, reads {reads}, failovers {posters[0].failovers}")
