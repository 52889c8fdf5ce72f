"""Durable, idempotent feedback storage: the ``FeedbackStore`` interface and its SQLite implementation."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

EventType = Literal["impression", "click", "rating"]

#: Version of the table layout, kept in ``PRAGMA user_version``; bump it and add a migration on change.
SCHEMA_VERSION = 1

# Migration to version N is _MIGRATIONS[N - 1]; each runs inside the schema transaction.
_MIGRATIONS: list[list[str]] = [
    [
        """
        CREATE TABLE IF NOT EXISTS feedback (
            event_id TEXT PRIMARY KEY,
            type TEXT NOT NULL CHECK (type IN ('impression', 'click', 'rating')),
            user_id TEXT NOT NULL,
            item_id TEXT NOT NULL,
            value REAL,
            model_version TEXT,
            ts REAL NOT NULL,
            received_at REAL NOT NULL,
            request_id TEXT,
            position INTEGER
        )
        """,
        "CREATE INDEX IF NOT EXISTS feedback_user ON feedback (user_id)",
    ],
]

_COLUMNS = (
    "event_id",
    "type",
    "user_id",
    "item_id",
    "value",
    "model_version",
    "ts",
    "received_at",
    "request_id",
    "position",
)
_INSERT = (
    f"INSERT INTO feedback ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
    "ON CONFLICT (event_id) DO NOTHING"
)


class StoreUnavailableError(RuntimeError):
    """The store could not take a batch right now (lock wait timed out, I/O error); nothing was written."""


@dataclass(frozen=True)
class FeedbackEvent:
    """One client event; ``event_id`` is the client's idempotency key."""

    event_id: str
    type: EventType
    user_id: str
    item_id: str
    # Client event time, seconds since the epoch (UTC).
    ts: float
    # The rating for ``rating`` events, None otherwise.
    value: float | None = None
    # Version that produced the impression (from the recommendation response).
    model_version: str | None = None
    # Id of the recommendation response the event refers to.
    request_id: str | None = None
    # 1-based rank at which the item was shown.
    position: int | None = None


@dataclass(frozen=True)
class FeedbackRecord:
    """A stored event: the event plus where it sits in the store and when the server received it."""

    seq: int
    event: FeedbackEvent
    received_at: float


class FeedbackStore(Protocol):
    """Where acknowledged feedback goes. ``write`` must be durable before it returns, and idempotent."""

    def write(self, events: Sequence[FeedbackEvent]) -> tuple[int, int]:
        """Store a batch atomically; returns (inserted, duplicates) where duplicates were already stored.

        An event whose id is already stored is not changed (the first write wins), so a client can retry
        a batch whose acknowledgement it lost without double counting.

        Raises:
            StoreUnavailableError: Nothing was written; the caller may retry.
        """
        ...

    def count(self) -> int:
        """Number of stored events."""
        ...

    def read_since(self, after_seq: int = 0, limit: int = 10_000) -> list[FeedbackRecord]:
        """Stored events with ``seq > after_seq`` in insertion order, at most ``limit`` of them."""
        ...

    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""
        ...


class SQLiteFeedbackStore:
    """Feedback in one SQLite file in WAL mode, safe for several threads and processes on one host.

    Each thread (and each process: uvicorn workers are processes) gets its own connection, since an
    sqlite3 connection must not be shared across threads mid-transaction nor inherited across a fork.
    Writers serialise on SQLite's write lock; ``busy_timeout`` makes them wait for it instead of failing.
    """

    def __init__(self, path: str | os.PathLike[str], busy_timeout_ms: int = 10_000) -> None:
        """Open (creating or migrating) the store at ``path``.

        Args:
            path: The database file; its directory is created when missing.
            busy_timeout_ms: How long a writer waits for another's lock before giving up.
        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False
        self._init_schema()

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE below), nothing implicit.
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        # In WAL mode synchronous=NORMAL fsyncs only at checkpoints: a commit survives a process crash
        # (kill -9) but the last commits can vanish on power loss or an OS crash. FULL fsyncs the WAL on
        # every commit, so an event we acknowledged is on disk, which is the promise the API makes.
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError(f"feedback store {self.path} is closed")
        if os.getpid() != self._pid:
            # A forked child must not touch the parent's connections (SQLite forbids it): start afresh.
            self._pid = os.getpid()
            self._local = threading.local()
            with self._all_lock:
                self._all = []
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def _init_schema(self) -> None:
        conn = self._conn()
        # Persistent per database file; switching needs a moment alone with it, which busy_timeout gives.
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"could not put feedback store {self.path} in WAL mode (got {mode!r})")
        # IMMEDIATE takes the write lock first, so workers starting together migrate one at a time.
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"feedback store {self.path} has schema version {version}, newer than this code's "
                    f"{SCHEMA_VERSION}; upgrade metarec before serving from it"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[target - 1]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @property
    def schema_version(self) -> int:
        """The schema version recorded in the file."""
        return int(self._conn().execute("PRAGMA user_version").fetchone()[0])

    def write(self, events: Sequence[FeedbackEvent]) -> tuple[int, int]:
        """Insert the batch in one durable transaction; returns (inserted, duplicates)."""
        if not events:
            return 0, 0
        received_at = time.time()
        rows = [
            (
                e.event_id,
                e.type,
                e.user_id,
                e.item_id,
                e.value,
                e.model_version,
                e.ts,
                received_at,
                e.request_id,
                e.position,
            )
            for e in events
        ]
        conn = self._conn()
        before = conn.total_changes
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:  # the write lock stayed taken for busy_timeout
            raise StoreUnavailableError(f"feedback store {self.path}: {err}") from err
        try:
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        except BaseException as err:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(err, sqlite3.OperationalError):
                raise StoreUnavailableError(f"feedback store {self.path}: {err}") from err
            raise
        # ON CONFLICT DO NOTHING rows do not count as changes, so this is exactly the rows added.
        inserted = conn.total_changes - before
        return inserted, len(rows) - inserted

    def count(self) -> int:
        """Number of stored events."""
        return int(self._conn().execute("SELECT count(*) FROM feedback").fetchone()[0])

    def read_since(self, after_seq: int = 0, limit: int = 10_000) -> list[FeedbackRecord]:
        """Stored events after ``after_seq`` (the SQLite rowid) in insertion order."""
        cursor = self._conn().execute(
            f"SELECT rowid, {', '.join(_COLUMNS)} FROM feedback WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (after_seq, limit),
        )
        return [_record(row) for row in cursor.fetchall()]

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` verdict: ``"ok"`` for a sound file."""
        rows = self._conn().execute("PRAGMA integrity_check").fetchall()
        return "\n".join(str(row[0]) for row in rows)

    def close(self) -> None:
        """Close every connection this process opened."""
        self._closed = True
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


def _record(row: tuple[Any, ...]) -> FeedbackRecord:
    seq, event_id, type_, user_id, item_id, value, model_version, ts, received_at, request_id, position = row
    event = FeedbackEvent(
        event_id=event_id,
        type=type_,
        user_id=user_id,
        item_id=item_id,
        ts=ts,
        value=value,
        model_version=model_version,
        request_id=request_id,
        position=position,
    )
    return FeedbackRecord(seq=seq, event=event, received_at=received_at)


def open_store(url: str) -> FeedbackStore:
    """Open the feedback store a URL names.

    ``sqlite:///relative/path.db`` and ``sqlite:////absolute/path.db`` (SQLAlchemy's spelling) open a
    ``SQLiteFeedbackStore``, which serves every worker and process on one host. ``postgresql://`` is the
    interface's intended multi-host backend but is not implemented yet, and says so.

    Raises:
        NotImplementedError: For a PostgreSQL URL.
        ValueError: For any other scheme, or an in-memory SQLite database (not durable, not shared).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"feedback store URL {url!r} has no scheme; use sqlite:///path/to/feedback.db")
    scheme = scheme.lower()
    if scheme == "sqlite":
        if not rest.startswith("/") or rest in ("/", "/:memory:"):
            raise ValueError(
                f"feedback store URL {url!r} names no file; use sqlite:///relative.db or sqlite:////abs.db "
                "(an in-memory database would lose acknowledged events and is not shared between workers)"
            )
        return SQLiteFeedbackStore(rest[1:])
    if scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+"):
        raise NotImplementedError(
            "a PostgreSQL feedback store is not implemented yet. It needs a class implementing "
            "components.serving.feedback.FeedbackStore (write/count/read_since/close) over a table with the "
            "SQLite schema's columns, event_id as PRIMARY KEY and seq as BIGSERIAL, where write() runs "
            "INSERT ... ON CONFLICT (event_id) DO NOTHING for the whole batch in one transaction and "
            "commits before returning (e.g. with psycopg 3), registered here in open_store. Until then use "
            "sqlite:///path/to/feedback.db, which serves any number of workers on one host."
        )
    raise ValueError(f"unsupported feedback store URL scheme {scheme!r} in {url!r}; use sqlite:///path")
