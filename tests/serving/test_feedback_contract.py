"""The feedback store contract, run on every backend: SQLite (a file) and PostgreSQL (the session's server).

Both must: store a batch whole or not at all; return only once it is committed; keep the first write of an
``event_id`` and count retries as duplicates; record and check a schema version; answer a retry-safe 503
when the store cannot take a batch; lose no acknowledged event across two server instances, nor when one is
killed mid-stream. The PostgreSQL tests need PostgreSQL installed (skipped without it, failed under CI);
each gets a new database on one server per session. Backend-specific checks (SQLite's WAL and fsync
settings, URL dispatch) are in test_serving_feedback.py, PostgreSQL's at the end of this module.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving_support import API_KEY, FileVersionSource, ServerProcess, event, events, thread_server

from components.core.services import PostgresServer
from components.serving.app import create_app
from components.serving.auth import ApiKeyAuth
from components.serving.feedback import (
    _MIGRATIONS,
    _PG_MIGRATIONS,
    PG_VERSION_TABLE,
    PG_WRITE_LOCK,
    SCHEMA_VERSION,
    PostgresFeedbackStore,
    SQLiteFeedbackStore,
    StoreUnavailableError,
    open_store,
)
from components.serving.holder import ModelHolder

WRITE = {"X-API-Key": API_KEY}


@dataclass
class Backend:
    """One backend's store URL, plus the raw access a test needs behind the store's back."""

    url: str

    @property
    def name(self) -> str:
        return "sqlite" if self.url.startswith("sqlite:") else "postgresql"

    @property
    def path(self) -> Path:
        return Path(self.url.removeprefix("sqlite:///"))

    def open(self, **kwargs: Any) -> SQLiteFeedbackStore | PostgresFeedbackStore:
        """The backend's store class on this URL, with constructor options (``busy_timeout_ms``)."""
        if self.name == "sqlite":
            return SQLiteFeedbackStore(self.path, **kwargs)
        return PostgresFeedbackStore(self.url, **kwargs)

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement on a new connection of its own, committed; return its rows."""
        if self.name == "sqlite":
            with sqlite3.connect(self.path, isolation_level=None) as raw:
                rows = raw.execute(sql, params).fetchall()
            raw.close()
            return rows
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def stored_ids(self) -> set[str]:
        """The event ids stored, read over an independent connection."""
        return {row[0] for row in self.execute("SELECT event_id FROM feedback")}

    def set_schema_version(self, version: int) -> None:
        if self.name == "sqlite":
            self.execute(f"PRAGMA user_version = {int(version)}")
        else:
            self.execute(f"UPDATE {PG_VERSION_TABLE} SET version = %s", (version,))

    @contextmanager
    def write_lock_held(self) -> Iterator[None]:
        """Hold the lock a writer needs, from another connection, until the block ends."""
        if self.name == "sqlite":
            blocker = sqlite3.connect(self.path, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
            try:
                yield
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            return
        import psycopg

        with psycopg.connect(self.url) as conn:  # not autocommit: the lock lasts until the rollback
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (PG_WRITE_LOCK,))
            try:
                yield
            finally:
                conn.rollback()

    def check_integrity(self) -> None:
        if self.name == "sqlite":
            assert self.execute("PRAGMA integrity_check") == [("ok",)]
        else:
            (row,) = self.execute(
                "SELECT count(*), count(DISTINCT event_id), count(DISTINCT seq) FROM feedback"
            )
            assert row[0] == row[1] == row[2]


@pytest.fixture(params=["sqlite", "postgresql"])
def feedback_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty feedback store: a SQLite file, or a new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fb.db'}"
    return str(request.getfixturevalue("postgres_db_url"))


@pytest.fixture
def backend(feedback_store_url: str) -> Backend:
    return Backend(feedback_store_url)


def test_every_backend_migrates_to_the_same_schema_version() -> None:
    assert len(_MIGRATIONS) == len(_PG_MIGRATIONS) == SCHEMA_VERSION


def test_writes_are_idempotent_and_read_back_in_order(backend: Backend) -> None:
    store = open_store(backend.url)
    assert store.write([]) == (0, 0)
    assert store.write([event("a"), event("b"), event("a")]) == (2, 1)
    rating = event("c", type="rating", value=4.5, model_version="v3", request_id="r", position=2)
    assert store.write([event("b", user_id="someone-else"), rating]) == (1, 1)
    assert store.count() == 3
    records = store.read_since(0)
    assert [r.event.event_id for r in records] == ["a", "b", "c"]
    assert records[1].event.user_id == "u1"  # the first write wins
    assert records[2].event == rating
    assert records[0].event == event("a")
    assert all(r.received_at > 1e9 for r in records)
    assert [r.event.event_id for r in store.read_since(records[0].seq, limit=1)] == ["b"]
    assert store.read_since(records[-1].seq) == []
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.count()


def test_a_batch_is_stored_whole_or_not_at_all(backend: Backend) -> None:
    store = open_store(backend.url)
    store.write([event("before")])
    # The database refuses the third row (its CHECK constraint): the first two must not stay behind.
    with pytest.raises(Exception) as refused:
        store.write([event("x"), event("y"), event("z", type="bogus")])
    assert not isinstance(refused.value, StoreUnavailableError)  # not worth a retry: a 500, not a 503
    assert backend.stored_ids() == {"before"}
    # A NUL character is refused before anything is written, on every backend (PostgreSQL cannot hold it).
    with pytest.raises(ValueError, match="NUL"):
        store.write([event("x"), event("y", user_id="u\x00")])
    assert backend.stored_ids() == {"before"}
    assert store.write([event("x"), event("y")]) == (2, 0)  # the store is usable afterwards
    store.close()


def test_an_acknowledged_batch_is_committed(backend: Backend) -> None:
    store = open_store(backend.url)
    assert store.write([event(f"e{i}") for i in range(20)]) == (20, 0)
    # Visible at once to any other connection, with the store still open (no close, no checkpoint).
    assert backend.stored_ids() == {f"e{i}" for i in range(20)}
    other = open_store(backend.url)
    assert other.count() == 20
    other.close()
    store.close()


def test_schema_version_is_recorded_and_checked(backend: Backend) -> None:
    store = backend.open()
    assert store.schema_version == SCHEMA_VERSION
    store.write([event("a")])
    store.close()
    reopened = open_store(backend.url)  # an existing, current store opens as is
    assert reopened.count() == 1
    reopened.close()
    backend.set_schema_version(SCHEMA_VERSION + 1)
    with pytest.raises(RuntimeError, match="newer than this code"):
        open_store(backend.url)


def test_workers_opening_a_new_store_together_create_it_once(backend: Backend) -> None:
    opened: list[Any] = []
    failures: list[BaseException] = []

    def open_one() -> None:
        try:
            opened.append(open_store(backend.url))
        except BaseException as err:  # reported below
            failures.append(err)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not failures and len(opened) == 6
    for n, store in enumerate(opened):
        assert store.write([event("same"), event(f"own-{n}")])[0] >= 1
    assert opened[0].count() == 7
    for store in opened:
        store.close()


def test_a_reader_paging_during_writes_never_skips_an_event(backend: Backend) -> None:
    """``read_since(last seq)`` pages see every event: sequence numbers become visible in order."""
    store = open_store(backend.url)
    reader_store = open_store(backend.url)
    done = threading.Event()
    seen: list[str] = []

    def writer(index: int) -> None:
        for n in range(40):
            store.write([event(f"w{index}-{n}-{j}") for j in range(3)])

    def reader() -> None:
        last = 0
        while True:
            finished = done.is_set()  # read once more after the writers are done
            for record in reader_store.read_since(last, limit=50):
                seen.append(record.event.event_id)
                last = record.seq
            if finished:
                return

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    follower = threading.Thread(target=reader)
    follower.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    done.set()
    follower.join(60)
    assert len(seen) == len(set(seen)) == 4 * 40 * 3
    assert set(seen) == backend.stored_ids()
    store.close()
    reader_store.close()


def test_busy_store_answers_503_and_a_retry_succeeds(backend: Backend, tmp_path: Path) -> None:
    source = FileVersionSource(tmp_path / "champion")
    source.set_version("v1")
    holder = ModelHolder(source, poll_seconds=0.05)
    store = backend.open(busy_timeout_ms=100)
    app = create_app(holder, store, auth=ApiKeyAuth(API_KEY))
    batch = {"events": events("busy", 3)}
    with thread_server(app) as url:
        assert holder.wait_ready(10)
        with backend.write_lock_held():  # held longer than the store waits
            with pytest.raises(StoreUnavailableError):
                store.write([event("direct")])
            response = httpx.post(f"{url}/feedback", json=batch, headers=WRITE)
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "1"
        assert httpx.post(f"{url}/feedback", json=batch, headers=WRITE).json() == {
            "inserted": 3,
            "duplicates": 0,
        }
    assert backend.stored_ids() == {"busy-0", "busy-1", "busy-2"}
    store.close()


def test_concurrent_writers_on_two_instances_lose_nothing(backend: Backend, tmp_path: Path) -> None:
    source = FileVersionSource(tmp_path / "champion")
    source.set_version("v1")
    # Instance A runs in this process; instance B is a separate server with two uvicorn worker processes.
    holder = ModelHolder(source, poll_seconds=0.05)
    app = create_app(holder, open_store(backend.url), auth=ApiKeyAuth(API_KEY))
    target: Path | str = backend.path if backend.name == "sqlite" else backend.url
    other = ServerProcess(tmp_path, target, source.version_file, workers=2, name="instance-b").start()
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
    store = open_store(backend.url)
    assert store.count() == 8 * 500
    stored = {record.event.event_id for record in store.read_since(0, limit=10_000)}
    assert stored == {f"w{i}-{j}" for i in range(8) for j in range(500)}
    store.close()
    backend.check_integrity()


def test_kill_9_during_writes_loses_no_acknowledged_event(backend: Backend, tmp_path: Path) -> None:
    source = FileVersionSource(tmp_path / "champion")
    source.set_version("v1")
    target: Path | str = backend.path if backend.name == "sqlite" else backend.url
    server = ServerProcess(tmp_path, target, source.version_file, name="doomed").start()
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
        server.kill()  # SIGKILL mid-stream: no shutdown handler, no checkpoint, no clean disconnect
        stop.set()
        for thread in threads:
            thread.join(10)
    finally:
        stop.set()
        server.stop()
    assert len(acked) >= 400
    backend.check_integrity()
    assert {e["event_id"] for e in acked} <= backend.stored_ids()

    # A restarted server opens the store cleanly and recognises every acknowledged event as stored.
    restarted = ServerProcess(tmp_path, target, source.version_file, name="restarted").start()
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
    store = open_store(backend.url)
    assert store.count() == len({e["event_id"] for e in acked + unacked})
    store.close()
    backend.check_integrity()


# ---- PostgreSQL only: what a network database adds (unreachable server, credentials, server settings) ----


def test_unreachable_database_is_a_clear_error_without_the_password(
    postgres_server: PostgresServer, free_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"postgresql://metarec:hunter2@127.0.0.1:{free_port}/feedback"
    with pytest.raises(StoreUnavailableError) as refused:
        open_store(url)
    message = str(refused.value)
    assert f"postgresql://metarec:***@127.0.0.1:{free_port}/feedback: cannot connect" in message
    assert "Connection refused" in message
    # A wrong password: refused at login, named as such, and shown masked (also percent-encoded forms).
    assert postgres_server.password_file
    password = Path(postgres_server.password_file).read_text().strip()
    wrong = f"postgresql://postgres:hunter%32@127.0.0.1:{postgres_server.port}/postgres"
    with pytest.raises(StoreUnavailableError, match="password authentication failed") as rejected:
        open_store(wrong)
    # A URL that does not parse is a configuration error, and libpq quotes the bad piece: masked too.
    with pytest.raises(ValueError, match="percent-encoded") as unparsed:
        open_store("postgresql://postgres:hunt%zzer2@127.0.0.1/postgres")
    # The right password in the URL works, and nothing shows it.
    good = open_store(f"postgresql://postgres:{password}@127.0.0.1:{postgres_server.port}/postgres")
    shown = [message, str(rejected.value), str(unparsed.value), repr(good), caplog.text]
    good.close()
    for text in shown:
        for secret in ("hunter2", "hunter%32", "hunt%zzer2", password):
            assert secret not in text
    for err in (refused.value, rejected.value, unparsed.value):
        assert err.__cause__ is None and err.__suppress_context__  # no chained original to leak it


def test_lost_connections_are_replaced_and_a_refusing_database_answers_503(
    postgres_db_url: str, postgres_url: str, tmp_path: Path
) -> None:
    backend = Backend(postgres_db_url)
    database = backend.url.rsplit("/", 1)[1]
    admin = Backend(postgres_url)

    def drop_connections() -> None:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> "
            "pg_backend_pid()",
            (database,),
        )

    store = backend.open(busy_timeout_ms=2000)
    assert store.write([event("first")]) == (1, 0)
    drop_connections()  # as a server restart or a failover would
    assert store.write([event("after-restart")]) == (1, 0)  # the dead pooled connection is replaced

    source = FileVersionSource(tmp_path / "champion")
    source.set_version("v1")
    holder = ModelHolder(source, poll_seconds=0.05)
    app = create_app(holder, store, auth=ApiKeyAuth(API_KEY))
    batch = {"events": events("down", 3)}
    with thread_server(app) as url:
        assert holder.wait_ready(10)
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        drop_connections()
        try:
            response = httpx.post(f"{url}/feedback", json=batch, headers=WRITE)
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "1"
            with pytest.raises(StoreUnavailableError, match="cannot connect"):
                store.count()
        finally:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        response = httpx.post(f"{url}/feedback", json=batch, headers=WRITE)
        assert response.json() == {"inserted": 3, "duplicates": 0}
    assert backend.stored_ids() == {"first", "after-restart", "down-0", "down-1", "down-2"}
    store.close()


def test_commits_wait_for_the_disk_even_where_the_database_says_not_to(postgres_db_url: str) -> None:
    """SQLite's equivalent (``synchronous = FULL``) is checked in test_serving_feedback.py."""
    backend = Backend(postgres_db_url)
    database = backend.url.rsplit("/", 1)[1]
    backend.execute(f'ALTER DATABASE "{database}" SET synchronous_commit = off')
    assert backend.execute("SHOW synchronous_commit") == [("off",)]
    store = PostgresFeedbackStore(postgres_db_url)
    store.write([event("a")])
    conn, _ = store._acquire()
    try:
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
    finally:
        store._release(conn)
    store.close()


def test_a_role_with_only_select_and_insert_can_serve(postgres_db_url: str) -> None:
    """Once the owner has created the tables, servers can log in as a narrow role (docs/production.md)."""
    owner = Backend(postgres_db_url)
    open_store(postgres_db_url).close()  # the owner creates the schema
    role = f"writer_{uuid.uuid4().hex[:12]}"
    owner.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pass:word'")
    try:
        owner.execute(f"GRANT SELECT, INSERT ON feedback TO {role}")
        owner.execute(f"GRANT SELECT ON {PG_VERSION_TABLE} TO {role}")
        owner.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        store = open_store(postgres_db_url.replace("://postgres@", f"://{role}:pass%3Aword@"))
        assert store.write([event("a"), event("a")]) == (1, 1)
        assert [r.event.event_id for r in store.read_since(0)] == ["a"]
        store.close()
    finally:
        owner.execute(f"DROP OWNED BY {role}")
        owner.execute(f"DROP ROLE {role}")
