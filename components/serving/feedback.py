"""Durable, idempotent feedback storage: the ``FeedbackStore`` interface, on SQLite (one host) or PostgreSQL.

Both backends keep one contract (tests/serving/test_feedback_contract.py runs the same tests on each): a
batch is stored whole or not at all; ``write`` returns only once the batch is committed durably; an
``event_id`` already stored is left as it is and counted as a duplicate, so a client may retry a batch
whose answer it lost; the table layout carries a schema version that is checked (and migrated) on open;
a store that cannot take a batch now raises ``StoreUnavailableError``, which the app answers with a 503
and ``Retry-After`` (a retry is safe).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from components.core.secrets import redact, redact_url

if TYPE_CHECKING:
    import psycopg

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
    """The store cannot take a batch right now (lock wait timed out, I/O error, database unreachable).

    Nothing was written, except when the connection broke while a commit was under way: then the batch
    may be stored. Either way a retry of the same batch is safe (``event_id`` is idempotent) and stores
    each event once.
    """


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
        """Insert the batch in one durable transaction; returns (inserted, duplicates).

        Raises:
            ValueError: A text field holds a NUL character (refused by both backends; nothing written).
            StoreUnavailableError: The write lock stayed taken for ``busy_timeout_ms`` or I/O failed.
        """
        if not events:
            return 0, 0
        rows = _rows(events, time.time())
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


# ---- PostgreSQL -----------------------------------------------------------------------------------------

# Migration to version N is _PG_MIGRATIONS[N - 1], as for SQLite; seq plays the SQLite rowid's part.
_PG_MIGRATIONS: list[list[str]] = [
    [
        """
        CREATE TABLE feedback (
            event_id TEXT PRIMARY KEY,
            seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
            type TEXT NOT NULL CHECK (type IN ('impression', 'click', 'rating')),
            user_id TEXT NOT NULL,
            item_id TEXT NOT NULL,
            value DOUBLE PRECISION,
            model_version TEXT,
            ts DOUBLE PRECISION NOT NULL,
            received_at DOUBLE PRECISION NOT NULL,
            request_id TEXT,
            position INTEGER
        )
        """,
        "CREATE INDEX feedback_user ON feedback (user_id)",
    ],
]
#: One-row table holding the schema version (SQLite keeps it in ``PRAGMA user_version``).
PG_VERSION_TABLE = "feedback_schema"
# pg_advisory_xact_lock keys (per database): schema checks and migrations of workers starting together
# take turns on the first, writers on the second. Advisory locks need no privilege on the table.
_PG_SCHEMA_LOCK = 0x6D657461_72656301  # "metarec" + 1
PG_WRITE_LOCK = 0x6D657461_72656302
_PG_INSERT = (
    f"INSERT INTO feedback ({', '.join(_COLUMNS)}) VALUES ({', '.join(['%s'] * len(_COLUMNS))}) "
    "ON CONFLICT (event_id) DO NOTHING"
)
_T = TypeVar("_T")


def _url_passwords(url: str) -> set[str]:
    """The password in a URL's user info as written (percent-encoded or not), read up to the first and up
    to the last ``@`` (libpq stops at the first; a raw ``@`` in a password is a common mistake)."""
    netloc = url.partition("://")[2].split("/", 1)[0]
    found = set()
    for userinfo, at, _ in (netloc.partition("@"), netloc.rpartition("@")):
        password = userinfo.partition(":")[2]
        if at and password:
            found.add(password)
    return found


class PostgresFeedbackStore:
    """Feedback in a PostgreSQL table: shared by any number of serving instances on any number of hosts.

    The URL is libpq's (``postgresql://user@host:port/dbname?sslmode=require``); the password comes from
    the URL, which then itself comes from the environment or a secret file (``METAREC_FEEDBACK_URL`` /
    ``METAREC_FEEDBACK_URL_FILE``, see ``components.core.secrets``), or from libpq's own ``PGPASSWORD`` /
    ``PGPASSFILE`` (``~/.pgpass``). No message, log line or exception of this class shows the password.

    Each process keeps a small pool of connections (``pool_size``); a request waits for a free one at
    most ``busy_timeout_ms``. A write is one transaction that first takes a lock only writers take (an
    advisory lock: readers never wait): writers commit one at a time, so ``seq`` grows in commit order and
    a reader paging with ``read_since`` never skips an event that commits later with a smaller ``seq``,
    as SQLite's single writer guarantees too. The lock wait is bounded by ``busy_timeout_ms``.
    Commits are durable on the server (``synchronous_commit`` is raised to ``on`` where a database sets
    it ``off``).
    """

    def __init__(
        self,
        url: str,
        busy_timeout_ms: int = 10_000,
        pool_size: int = 4,
        connect_timeout_s: int = 5,
        statement_timeout_ms: int = 30_000,
    ) -> None:
        """Connect (creating or migrating the schema) to the database ``url`` names.

        Args:
            url: ``postgresql://`` or ``postgres://`` URL (libpq syntax; ``postgresql+driver://`` accepted).
            busy_timeout_ms: How long a write waits for the write lock or a free pooled connection.
            pool_size: Most connections this process opens at once.
            connect_timeout_s: libpq's ``connect_timeout`` unless the URL sets one.
            statement_timeout_ms: Longest any one statement may run (a stuck server answers 503).

        Raises:
            ValueError: The URL cannot be parsed.
            StoreUnavailableError: The database cannot be reached or refused the login.
            RuntimeError: The schema is newer than this code's.
        """
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        scheme, _, rest = url.partition("://")
        if "+" in scheme:  # SQLAlchemy's postgresql+psycopg:// spelling; libpq knows only postgresql://
            url = f"postgresql://{rest}"
        self.url = url
        #: The URL fit to show: password masked.
        self.display_url = redact_url(url)
        self._secrets = sorted(_url_passwords(url))
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error as err:
            raise ValueError(f"feedback store URL {self.display_url}: {self._scrub(err)}") from None
        if params.get("password"):
            self._secrets.append(str(params["password"]))
        self._secrets.extend(urllib.parse.quote(s, safe="") for s in list(self._secrets))
        self._kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in params:
            self._kwargs["connect_timeout"] = connect_timeout_s
        if "application_name" not in params:
            self._kwargs["application_name"] = "metarec-feedback"
        self.busy_timeout_ms = busy_timeout_ms
        self.statement_timeout_ms = statement_timeout_ms
        self.pool_size = pool_size
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(pool_size)
        self._idle: list[psycopg.Connection[Any]] = []
        # Connections inherited over a fork: never used nor closed in the child (closing would end the
        # parent's sessions), only kept referenced so that garbage collection does not close them either.
        self._inherited: list[psycopg.Connection[Any]] = []
        self._pid = os.getpid()
        self._closed = False
        self._init_schema()

    def __repr__(self) -> str:
        return f"PostgresFeedbackStore({self.display_url!r})"

    # -- connections --

    def _scrub(self, err: BaseException | str) -> str:
        """``err`` as text with every form of the password masked (libpq quotes URL pieces in errors)."""
        text = redact(str(err).strip())
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    def _unavailable(self, err: BaseException, what: str = "") -> StoreUnavailableError:
        return StoreUnavailableError(f"feedback store {self.display_url}{what}: {self._scrub(err)}")

    def _connect(self) -> psycopg.Connection[Any]:
        import psycopg

        try:
            conn = psycopg.connect(self.url, **self._kwargs)
        except psycopg.Error as err:
            # from None: libpq's message is kept (scrubbed); the chained original could show the password.
            raise self._unavailable(err, ": cannot connect") from None
        try:
            if conn.execute("SHOW synchronous_commit").fetchone() == ("off",):
                # Acknowledged means committed: off would answer before the commit reaches the disk.
                conn.execute("SET synchronous_commit = on")
        except psycopg.Error as err:
            conn.close()
            raise self._unavailable(err) from None
        return conn

    def _acquire(self) -> tuple[psycopg.Connection[Any], bool]:
        """A pooled connection (and whether it was used before); wait at most ``busy_timeout_ms``."""
        if self._closed:
            raise RuntimeError(f"feedback store {self.display_url} is closed")
        if os.getpid() != self._pid:
            with self._lock:
                if os.getpid() != self._pid:
                    self._pid = os.getpid()
                    self._inherited.extend(self._idle)
                    self._idle = []
                    self._slots = threading.BoundedSemaphore(self.pool_size)
        slots = self._slots
        if not slots.acquire(timeout=self.busy_timeout_ms / 1000):
            raise StoreUnavailableError(
                f"feedback store {self.display_url}: all {self.pool_size} connections stayed busy for "
                f"{self.busy_timeout_ms} ms"
            )
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            return (conn, True) if conn is not None else (self._connect(), False)
        except BaseException:
            slots.release()
            raise

    def _release(self, conn: psycopg.Connection[Any]) -> None:
        from psycopg.pq import TransactionStatus

        keep = (
            not self._closed
            and not conn.closed
            and not conn.broken
            and conn.info.transaction_status == TransactionStatus.IDLE
            and os.getpid() == self._pid
        )
        if keep:
            with self._lock:
                self._idle.append(conn)
        elif os.getpid() == self._pid:
            conn.close()
        self._slots.release()

    def _run(self, work: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        """``work`` on a pooled connection; a pooled connection found dead (server restart) is replaced once.

        A rerun is safe for every caller: writes are idempotent and whole-batch, reads have no effect.
        """
        import psycopg
        from psycopg import errors

        for attempt in (1, 2):
            conn, reused = self._acquire()
            try:
                result = work(conn)
            except (psycopg.OperationalError, errors.ReadOnlySqlTransaction) as err:
                # Lock or statement timeout, lost connection, server shutting down, read-only failover.
                stale = reused and (conn.broken or conn.closed)
                self._release(conn)
                if stale and attempt == 1:
                    # The server went away since the connection was pooled (restart, failover): the other
                    # idle ones are most likely dead too, so the retry gets a new one.
                    with self._lock:
                        idle, self._idle = self._idle, []
                    for other in idle:
                        other.close()
                    continue
                raise self._unavailable(err) from None
            except BaseException:
                self._release(conn)
                raise
            self._release(conn)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    # -- schema --

    def _init_schema(self) -> None:
        def migrate(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                # Workers starting together check and migrate one at a time.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_SCHEMA_LOCK,))
                exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (PG_VERSION_TABLE,)).fetchone()
                if exists != (True,):
                    # Only a new database needs CREATE rights; a current one opens with plain read/write.
                    conn.execute(f"CREATE TABLE {PG_VERSION_TABLE} (version INTEGER NOT NULL)")
                    conn.execute(f"INSERT INTO {PG_VERSION_TABLE} (version) VALUES (0)")
                rows = conn.execute(f"SELECT version FROM {PG_VERSION_TABLE}").fetchall()
                if len(rows) != 1:
                    raise RuntimeError(
                        f"feedback store {self.display_url}: table {PG_VERSION_TABLE} must hold one row, "
                        f"holds {len(rows)}"
                    )
                version = int(rows[0][0])
                if version > SCHEMA_VERSION:
                    raise RuntimeError(
                        f"feedback store {self.display_url} has schema version {version}, newer than this "
                        f"code's {SCHEMA_VERSION}; upgrade metarec before serving from it"
                    )
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in _PG_MIGRATIONS[target - 1]:
                        conn.execute(statement)
                    conn.execute(f"UPDATE {PG_VERSION_TABLE} SET version = %s", (target,))

        self._run(migrate)

    @property
    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        row = self._run(lambda conn: conn.execute(f"SELECT version FROM {PG_VERSION_TABLE}").fetchone())
        return int(row[0]) if row else 0

    # -- the FeedbackStore interface --

    def write(self, events: Sequence[FeedbackEvent]) -> tuple[int, int]:
        """Insert the batch in one transaction, committed before this returns; returns (inserted, duplicates).

        Raises:
            ValueError: A text field holds a NUL character (nothing written).
            StoreUnavailableError: The database is unreachable, or the write lock or a connection stayed
                taken for ``busy_timeout_ms``; a retry of the batch is safe.
        """
        if not events:
            return 0, 0
        rows = _rows(events, time.time())

        def insert(conn: psycopg.Connection[Any]) -> int:
            with conn.transaction():
                conn.execute(
                    "SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true)",
                    (f"{int(self.busy_timeout_ms)}ms", f"{int(self.statement_timeout_ms)}ms"),
                )
                # Writers take turns (readers never wait): held until the commit, so seq values
                # become visible in increasing order. lock_timeout bounds the wait.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (PG_WRITE_LOCK,))
                with conn.cursor() as cursor:
                    cursor.executemany(_PG_INSERT, rows)  # one pipelined round trip
                    # ON CONFLICT DO NOTHING rows are not counted: this is exactly the rows added.
                    inserted = cursor.rowcount
            return inserted  # the block has committed: acknowledged means committed

        inserted = self._run(insert)
        return inserted, len(rows) - inserted

    def count(self) -> int:
        """Number of stored events."""
        row = self._run(lambda conn: conn.execute("SELECT count(*) FROM feedback").fetchone())
        return int(row[0]) if row else 0

    def read_since(self, after_seq: int = 0, limit: int = 10_000) -> list[FeedbackRecord]:
        """Stored events after ``after_seq`` (the ``seq`` column) in insertion order."""
        query = f"SELECT seq, {', '.join(_COLUMNS)} FROM feedback WHERE seq > %s ORDER BY seq LIMIT %s"
        rows = self._run(lambda conn: conn.execute(query, (after_seq, limit)).fetchall())
        return [_record(row) for row in rows]

    def close(self) -> None:
        """Close this process's pooled connections; connections in use close when released."""
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        if os.getpid() == self._pid:
            for conn in idle:
                conn.close()


def _rows(events: Sequence[FeedbackEvent], received_at: float) -> list[tuple[Any, ...]]:
    """The batch as rows in ``_COLUMNS`` order; refuses NUL characters, which PostgreSQL cannot store."""
    rows = []
    for i, e in enumerate(events):
        row = (
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
        bad = [c for c, v in zip(_COLUMNS, row, strict=True) if isinstance(v, str) and "\x00" in v]
        if bad:
            raise ValueError(f"events[{i}].{bad[0]} contains a NUL character, which the store cannot hold")
        rows.append(row)
    return rows


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
    ``SQLiteFeedbackStore``, which serves every worker and process on one host. ``postgresql://`` (also
    ``postgres://`` and ``postgresql+psycopg://``) opens a ``PostgresFeedbackStore``, which serves any
    number of instances on any number of hosts.

    Raises:
        ValueError: For any other scheme, an in-memory SQLite database (not durable, not shared), or a
            PostgreSQL URL that does not parse.
        StoreUnavailableError: The PostgreSQL database cannot be reached or refused the login.
    """
    scheme, sep, rest = url.partition("://")
    shown = redact_url(url)
    if not sep:
        # Not echoed: without a scheme nothing tells which part could be a password.
        raise ValueError(
            "the feedback store URL has no scheme; use sqlite:///path/to/feedback.db or postgresql://"
        )
    scheme = scheme.lower()
    if scheme == "sqlite":
        if not rest.startswith("/") or rest in ("/", "/:memory:"):
            raise ValueError(
                f"feedback store URL {shown!r} names no file; use sqlite:///relative.db or sqlite:////abs.db "
                "(an in-memory database would lose acknowledged events and is not shared between workers)"
            )
        return SQLiteFeedbackStore(rest[1:])
    if scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+"):
        return PostgresFeedbackStore(url)
    raise ValueError(
        f"unsupported feedback store URL scheme {scheme!r} in {shown!r}; use sqlite:///path or postgresql://"
    )
