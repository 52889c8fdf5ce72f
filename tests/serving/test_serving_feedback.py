"""SQLite-specific feedback store checks (WAL, full fsync, integrity) and URL dispatch.

The contract every backend keeps (idempotent writes, whole batches, committed acknowledgements, schema
versions, retry-safe 503s, two instances, kill -9) is tested on SQLite and PostgreSQL alike in
test_feedback_contract.py.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from serving_support import event

from components.serving.feedback import (
    SCHEMA_VERSION,
    PostgresFeedbackStore,
    SQLiteFeedbackStore,
    StoreUnavailableError,
    open_store,
)


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
    assert reopened.integrity_check() == "ok"
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
    for bad in ("sqlite:///:memory:", "sqlite://", "feedback.db", "mysql://db/x"):
        with pytest.raises(ValueError):
            open_store(bad)
    # postgresql:// (and postgres://, postgresql+driver://) opens the PostgreSQL store: nothing listens on
    # port 1, so it says it cannot connect (test_feedback_contract.py has it on a real server).
    for url in (
        "postgresql://user@127.0.0.1:1/x",
        "postgres://127.0.0.1:1/x",
        "postgresql+psycopg://127.0.0.1:1/x",
    ):
        with pytest.raises(StoreUnavailableError, match="cannot connect"):
            open_store(url)
    with pytest.raises(ValueError, match="no scheme") as unschemed:
        open_store("user:pw@db/x")
    assert "pw" not in str(unschemed.value)


def test_postgres_store_normalises_sqlalchemy_urls_and_masks_passwords(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(PostgresFeedbackStore, "_init_schema", lambda self: None)  # no server needed
    store = PostgresFeedbackStore("postgresql+psycopg://metarec:s3cret@db:5432/feedback?sslmode=require")
    assert store.url == "postgresql://metarec:s3cret@db:5432/feedback?sslmode=require"
    assert store.display_url == "postgresql://metarec:***@db:5432/feedback?sslmode=require"
    assert "s3cret" not in repr(store)
