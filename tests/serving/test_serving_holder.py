"""Model holder: background loading, atomic swaps, failures keep the old engine; hot swap under HTTP load."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from serving_support import API_KEY, FileVersionSource, thread_server

from components.serving.app import create_app
from components.serving.auth import ApiKeyAuth
from components.serving.feedback import SQLiteFeedbackStore
from components.serving.holder import ModelHolder
from components.serving.protocol import Engine


@pytest.fixture
def source(tmp_path: Path) -> FileVersionSource:
    return FileVersionSource(tmp_path / "champion")


def test_refresh_swaps_only_when_the_alias_moves(source: FileVersionSource) -> None:
    holder = ModelHolder(source, poll_seconds=1)
    swaps: list[tuple[str | None, str]] = []
    holder.add_listener(lambda old, new: swaps.append((old, new)))
    assert not holder.refresh()  # no champion yet
    assert not holder.ready and holder.version is None
    source.set_version("v1")
    assert holder.refresh()
    assert holder.ready and holder.version == "v1"
    assert not holder.refresh()  # unchanged: nothing reloaded
    in_flight = holder.engine
    source.set_version("v2")
    assert holder.refresh()
    assert holder.version == "v2"
    # A request that took the reference before the swap keeps answering from the old engine.
    assert in_flight is not None and in_flight.version == "v1"
    assert swaps == [(None, "v1"), ("v1", "v2")]
    assert source.loads == ["v1", "v2"]


def test_failed_loads_keep_the_old_engine_and_back_off(source: FileVersionSource) -> None:
    holder = ModelHolder(source, poll_seconds=1, retry_seconds=3600)
    source.set_version("v1")
    holder.refresh()
    source.set_version("broken-2")
    assert not holder.refresh()
    assert holder.version == "v1" and holder.load_failures == 1
    assert not holder.refresh()  # within retry_seconds: not loaded again
    assert source.loads == ["v1", "broken-2"]
    holder.retry_seconds = 0
    assert not holder.refresh()
    assert source.loads == ["v1", "broken-2", "broken-2"]
    source.set_version("v3")
    assert holder.refresh() and holder.version == "v3"


def test_registry_outage_and_removed_alias_keep_serving(source: FileVersionSource) -> None:
    class Flaky:
        def __init__(self) -> None:
            self.fail = False

        def current_version(self) -> str | None:
            if self.fail:
                raise ConnectionError("registry down")
            return source.current_version()

        def load(self, version: str) -> Engine:
            return source.load(version)

    flaky = Flaky()
    holder = ModelHolder(flaky, poll_seconds=1)
    source.set_version("v1")
    holder.refresh()
    flaky.fail = True
    assert not holder.refresh() and holder.version == "v1"
    flaky.fail = False
    source.version_file.unlink()
    assert not holder.refresh() and holder.version == "v1"


def test_poller_loads_in_the_background(source: FileVersionSource) -> None:
    source.set_version("v1")
    holder = ModelHolder(source, poll_seconds=0.02)
    holder.start()
    try:
        assert holder.wait_ready(5) and holder.version == "v1"
        source.set_version("v2")
        deadline = time.monotonic() + 5
        while holder.version != "v2" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert holder.version == "v2"
    finally:
        holder.stop()
    with pytest.raises(ValueError, match="poll_seconds"):
        ModelHolder(source, poll_seconds=0)


def test_hot_swap_under_load_fails_no_request(tmp_path: Path) -> None:
    # Loading takes 1 s: long enough that a load on the request path would show in the latencies.
    source = FileVersionSource(tmp_path / "champion", load_s=1.0, slow_k=777, slow_s=1.8)
    source.set_version("v1")
    holder = ModelHolder(source, poll_seconds=0.05)
    swapped_at: list[float] = []
    holder.add_listener(lambda old, new: swapped_at.append(time.monotonic()))
    app = create_app(holder, SQLiteFeedbackStore(tmp_path / "feedback.db"), auth=ApiKeyAuth(API_KEY))
    stop = threading.Event()
    results: list[list[tuple[int, str, float]]] = [[] for _ in range(4)]
    errors: list[BaseException] = []

    with thread_server(app) as url:
        assert holder.wait_ready(10)

        def hammer(index: int) -> None:
            with httpx.Client(base_url=url, timeout=10) as client:
                while not stop.is_set():
                    start = time.monotonic()
                    try:
                        response = client.get(f"/recommendations/u{index + 1}", params={"k": 10})
                        version = response.json().get("model_version", "")
                    except BaseException as err:  # any transport error is a failed request
                        errors.append(err)
                        return
                    results[index].append((response.status_code, version, time.monotonic() - start))

        slow: dict[str, object] = {}

        def slow_request() -> None:
            response = httpx.get(f"{url}/recommendations/u9", params={"k": 777}, timeout=10)
            slow.update(status=response.status_code, version=response.json()["model_version"])
            slow["done"] = time.monotonic()

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        in_flight = threading.Thread(target=slow_request)
        in_flight.start()
        time.sleep(0.05)
        source.set_version("v2")  # the alias moves while requests (and the slow one) are running
        in_flight.join(10)
        time.sleep(0.3)
        stop.set()
        for thread in threads:
            thread.join(10)

    assert not errors
    for per_client in results:
        assert per_client and all(status == 200 for status, _, _ in per_client)
        versions = [version for _, version, _ in per_client]
        # Each client sees v1 then v2, never back: the switch is atomic.
        flip = versions.index("v2")
        assert versions[:flip] == ["v1"] * flip and set(versions[flip:]) == {"v2"}
        assert flip > 0
        # No request waited for the 1 s load (the margin absorbs a busy test machine).
        assert max(latency for _, _, latency in per_client) < 0.5
    # The request in flight during the swap finished, on the engine it started with.
    assert slow["status"] == 200 and slow["version"] == "v1"
    assert isinstance(slow["done"], float) and swapped_at[-1] < slow["done"]
