"""Feedback store: idempotent durable writes, schema versioning, URL dispatch; concurrent writers over two
server instances lose nothing; kill -9 during writes loses no acknowledged event."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving_support import API_KEY, FileVersionSource, ServerProcess, events, thread_server

from components.serving.app import create_app
from components.serving.auth import ApiKeyAuth
from components.serving.feedback import (
    SCHEMA_VERSION,
    FeedbackEvent,
    SQLiteFeedbackStore,
    StoreUnavailableError,
    open_store,
)
from components.serving.holder import ModelHolder

WRITE = {"X-API-Key": API_KEY}


def event(event_id: str, **change: Any) -> FeedbackEvent:
    fields: dict[str, Any] = {
        "event_id": event_id,
        "type": "click",
        "user_id": "u1",
        "item_id": "i1",
        "ts": 1.5,
    }
    return FeedbackEvent(**{**fields, **change})


def test_writes_are_idempotent_and_read_back_in_order(tmp_path: Path) -> None:
    store = SQLiteFeedbackStore(tmp_path / "fb.db")
    assert store.write([]) == (0, 0)
    assert store.write([event("a"), event("b"), event("a")]) == (2, 1)
    rating = event("c", type="rating", value=4.5, model_version="v3", request_id="r", position=2)
    assert store.write([event("b", user_id="someone-else"), rating]) == (1, 1)
    assert store.count() == 3
    records = store.read_since(0)
    assert [r.event.event_id for r in records] == ["a", "b", "c"]
    assert records[1].event.user_id == "u1"  # the first write wins
    assert records[2].event == rating
    assert [r.event.event_id for r in store.read_since(records[0].seq, limit=1)] == ["b"]
    assert store.read_since(records[-1].seq) == []
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.count()


def test_store_is_wal_full_sync_and_versioned(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "fb.db"
    store = SQLiteFeedbackStore(path)
    assert store.schema_version == SCHEMA_VERSION
    conn = store._conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.write([event("a")])
    store.close()
    reopened = SQLiteFeedbackStore(path)  # an existing, current store opens as is
    assert reopened.count() == 1
    reopened.close()
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer than this code"):
        SQLiteFeedbackStore(path)


def test_open_store_dispatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absolute = open_store(f"sqlite:///{tmp_path}/abs.db")
    assert isinstance(absolute, SQLiteFeedbackStore) and absolute.path == tmp_path / "abs.db"
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///rel/fb.db")
    assert isinstance(relative, SQLiteFeedbackStore) and relative.path == Path("rel/fb.db")
    with pytest.raises(NotImplementedError, match="FeedbackStore"):
        open_store("postgresql://user@db/metarec")
    with pytest.raises(NotImplementedError):
        open_store("postgresql+psycopg://db/metarec")
    for bad in ("sqlite:///:memory:", "sqlite://", "feedback.db", "mysql://db/x"):
        with pytest.raises(ValueError):
            open_store(bad)


def test_busy_store_answers_503_and_a_retry_succeeds(tmp_path: Path) -> None:
    source = FileVersionSource(tmp_path / "champion")
    source.set_version("v1")
    holder = ModelHolder(source, poll_seconds=0.05)
    store = SQLiteFeedbackStore(tmp_path / "fb.db", busy_timeout_ms=100)
    blocker = sqlite3.connect(tmp_path / "fb.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock longer than the store waits
    with pytest.raises(StoreUnavailableError):
        store.write([event("direct")])
    app = create_app(holder, store, auth=ApiKeyAuth(API_KEY))
    batch = {"events": events("busy", 3)}
    with thread_server(app) as url:
        assert holder.wait_ready(10)
        response = httpx.post(f"{url}/feedback", json=batch, headers=WRITE)
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        blocker.execute("ROLLBACK")
        assert httpx.post(f"{url}/feedback", json=batch, headers=WRITE).json() == {
            "inserted": 3,
            "duplicates": 0,
        }
    blocker.close()


def test_concurrent_writers_on_two_instances_lose_nothing(tmp_path: Path) -> None:
    db = tmp_path / "fb.db"
    source = FileVersionSource(tmp_path / "champion")
    source.set_version("v1")
    # Instance A runs in this process; instance B is a separate server with two uvicorn worker processes.
    holder = ModelHolder(source, poll_seconds=0.05)
    app = create_app(holder, SQLiteFeedbackStore(db), auth=ApiKeyAuth(API_KEY))
    other = ServerProcess(tmp_path, db, source.version_file, workers=2, name="instance-b").start()
    totals: list[tuple[int, int]] = []
    failures: list[str] = []
    lock = threading.Lock()
    try:
        with thread_server(app) as url_a:
            assert holder.wait_ready(10)

            def writer(index: int) -> None:
                url = url_a if index % 2 == 0 else other.url
                mine = events(f"w{index}", 500)
                batches = [mine[i : i + 5] for i in range(0, 500, 5)]
                inserted = duplicates = 0
                with httpx.Client(base_url=url, timeout=30, headers=WRITE) as client:
                    for n, batch in enumerate(batches):
                        sends = [batch, batches[n - 1]] if n % 10 == 9 else [batch]  # every 10th: a retry
                        for payload in sends:
                            response = client.post("/feedback", json={"events": payload})
                            if response.status_code != 200:
                                failures.append(f"{response.status_code} {response.text}")
                                return
                            inserted += response.json()["inserted"]
                            duplicates += response.json()["duplicates"]
                with lock:
                    totals.append((inserted, duplicates))

            threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        # Instance B's two workers count into shared files, so its /metrics adds up both.
        metrics = httpx.get(f"{other.url}/metrics").text
        # Keep-alive requests to the workers must not wait ~40 ms on Nagle + delayed ACK (TCP_NODELAY).
        with httpx.Client(base_url=other.url) as client:
            latencies = []
            for _ in range(21):
                start = time.perf_counter()
                client.get("/health")
                latencies.append(time.perf_counter() - start)
        assert sorted(latencies)[10] < 0.02
    finally:
        other.stop()
    assert not failures
    assert sorted(totals) == [(500, 50)] * 8
    assert 'metarec_feedback_events_total{result="inserted"} 2000.0' in metrics
    assert 'metarec_feedback_events_total{result="duplicate"} 200.0' in metrics
    store = SQLiteFeedbackStore(db)
    assert store.count() == 8 * 500
    stored = {record.event.event_id for record in store.read_since(0, limit=10_000)}
    assert stored == {f"w{i}-{j}" for i in range(8) for j in range(500)}
    assert store.integrity_check() == "ok"


def test_kill_9_during_writes_loses_no_acknowledged_event(tmp_path: Path) -> None:
    db = tmp_path / "fb.db"
    source = FileVersionSource(tmp_path / "champion")
    source.set_version("v1")
    server = ServerProcess(tmp_path, db, source.version_file, name="doomed").start()
    acked: list[dict[str, Any]] = []
    unacked: list[dict[str, Any]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(index: int) -> None:
        with httpx.Client(base_url=server.url, timeout=5, headers=WRITE) as client:
            n = 0
            while not stop.is_set():
                batch = events(f"k{index}-{n}", 4)
                n += 1
                try:
                    response = client.post("/feedback", json={"events": batch})
                except httpx.TransportError:
                    with lock:
                        unacked.extend(batch)  # in flight at the kill: may or may not be stored
                    return
                with lock:
                    (acked if response.status_code == 200 else unacked).extend(batch)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while len(acked) < 400 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill()  # SIGKILL mid-stream: no shutdown handler, no checkpoint, WAL left behind
        stop.set()
        for thread in threads:
            thread.join(10)
    finally:
        stop.set()
        server.stop()
    assert len(acked) >= 400

    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {row[0] for row in raw.execute("SELECT event_id FROM feedback")}
    raw.close()
    assert {e["event_id"] for e in acked} <= stored

    # A restarted server opens the store cleanly and recognises every acknowledged event as stored.
    restarted = ServerProcess(tmp_path, db, source.version_file, name="restarted").start()
    try:
        with httpx.Client(base_url=restarted.url, timeout=10, headers=WRITE) as client:
            for i in range(0, len(acked), 500):
                response = client.post("/feedback", json={"events": acked[i : i + 500]})
                assert response.status_code == 200
                assert response.json()["inserted"] == 0
            for i in range(0, len(unacked), 500):
                assert client.post("/feedback", json={"events": unacked[i : i + 500]}).status_code == 200
    finally:
        restarted.stop()
    store = SQLiteFeedbackStore(db)
    assert store.count() == len({e["event_id"] for e in acked + unacked})
    assert store.integrity_check() == "ok"
