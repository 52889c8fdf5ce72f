"""Feedback applied online (components/serving/online.py) and the engine's remembered lists.

The overlay and follower run on a real SQLite store; the engine checks run on the session's tiny fusion
bundle (``metarec_workspace``): every remembered list must equal a fresh computation for the same input.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from components.serving.feedback import FeedbackEvent, SQLiteFeedbackStore
from components.serving.online import FeedbackFollower, FeedbackOverlay, overlay_from_store
from tests.conftest import TrainedWorkspace


def _event(n: int, type_: str, user: str, item: str) -> FeedbackEvent:
    return FeedbackEvent(event_id=f"e{n}", type=type_, user_id=user, item_id=item, ts=1e9 + n)  # type: ignore[arg-type]


def test_overlay_keeps_clicks_and_ratings_once_in_arrival_order(tmp_path: Path) -> None:
    store = SQLiteFeedbackStore(tmp_path / "f.db")
    store.write(
        [
            _event(1, "click", "a", "i3"),
            _event(2, "impression", "a", "i9"),
            _event(3, "rating", "a", "i1"),
            _event(4, "click", "a", "i3"),
            _event(5, "impression", "b", "i2"),
            _event(6, "rating", "c", "i2"),
        ]
    )
    overlay = overlay_from_store(store)
    assert overlay.histories() == {"a": ("i3", "i1"), "c": ("i2",)}
    assert overlay.history("b") == () and overlay.history(None) == ()
    assert overlay.after_seq == 6 and overlay.applied == 6
    clicks_only = overlay_from_store(store, ["click"])
    assert clicks_only.histories() == {"a": ("i3",)}
    store.close()


def test_overlay_reads_a_backlog_larger_than_one_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from components.serving import online

    monkeypatch.setattr(online, "READ_BATCH", 4)
    store = SQLiteFeedbackStore(tmp_path / "f.db")
    store.write([_event(n, "click", f"u{n % 3}", f"i{n}") for n in range(11)])
    overlay = FeedbackOverlay()
    assert overlay.load(store) == 11
    assert sum(len(items) for items in overlay.histories().values()) == 11
    assert overlay.histories()["u0"] == ("i0", "i3", "i6", "i9")
    store.close()


def test_follower_sees_events_written_by_another_connection_within_a_poll(tmp_path: Path) -> None:
    """Another process's store object (a second connection) writes; the follower picks it up."""
    reader, writer = SQLiteFeedbackStore(tmp_path / "f.db"), SQLiteFeedbackStore(tmp_path / "f.db")
    writer.write([_event(1, "click", "a", "i1")])
    follower = FeedbackFollower(reader, FeedbackOverlay(), poll_seconds=0.05)
    follower.start()  # reads the backlog before returning
    try:
        assert follower.overlay.history("a") == ("i1",)
        writer.write([_event(2, "rating", "a", "i2")])
        written = time.monotonic()
        while follower.overlay.history("a") != ("i1", "i2"):
            assert time.monotonic() - written < 1.0, follower.overlay.histories()
            time.sleep(0.01)
    finally:
        follower.stop()
        reader.close()
        writer.close()


def test_follower_keeps_serving_through_a_store_failure(tmp_path: Path) -> None:
    class Broken:
        calls = 0

        def read_since(self, after_seq: int = 0, limit: int = 10_000) -> list:
            Broken.calls += 1
            raise OSError("store down")

    overlay = FeedbackOverlay()
    follower = FeedbackFollower(Broken(), overlay, poll_seconds=0.05)  # type: ignore[arg-type]
    assert follower.poll() == 0 and follower.failures == 1
    assert overlay.histories() == {}
    with pytest.raises(ValueError, match="poll_seconds"):
        FeedbackFollower(Broken(), overlay, poll_seconds=0)  # type: ignore[arg-type]


def test_remembered_lists_equal_fresh_rankings(metarec_workspace: TrainedWorkspace) -> None:
    """Every lookup (warm or remembered after a first computation) equals ``rank`` for the same input."""
    from components.bundle.engine import TOP_DEPTH, load_bundle

    metarec_workspace.check()
    engine = load_bundle(metarec_workspace.path / "models" / "bundle")
    users = sorted(engine.users.user_id.astype(str))
    assert engine.cached(users[0], 3) is None  # nothing computed before warm()
    assert engine.warm(2) == 2
    assert engine.cached(users[0], 3) is not None and engine.cached(users[2], 3) is None
    assert engine.warm() == len(users)
    items = sorted(engine.item_ids)
    for user in users:
        for k in (1, 3, TOP_DEPTH):
            for explain in (True, False):
                assert engine.recommend(user, k, explain=explain) == engine.rank(user, k, explain=explain)
        # With history added (feedback): computed once, then remembered under the new history.
        history = [engine.rank(user, 1)[0]["item_id"]]
        assert engine.cached(user, 3, history=history) is None
        fresh = engine.rank(user, 3, history=history)
        assert engine.recommend(user, 3, history=history) == fresh
        assert engine.cached(user, 3, history=history) == fresh
        assert history[0] not in [r["item_id"] for r in fresh]
    # Feedback on an item already in the user's training history changes nothing: the warm list serves.
    user = users[0]
    index = engine._user_index[user]
    trained = engine._item_ids[int(engine.history[index].indices[0])]
    assert engine.cached(user, 3, history=[trained]) == engine.cached(user, 3) == engine.rank(user, 3)
    assert engine.rank(user, 3, history=[trained]) == engine.rank(user, 3)
    # A user known only from feedback, and the cases that are never remembered.
    assert engine.recommend("newcomer", 2, history=items[:1]) == engine.rank(None, 2, history=items[:1])
    assert engine.cached(users[0], TOP_DEPTH + 1) is None
    assert engine.cached(None, 3, profile={"occupation": "writer"}) is None
    with pytest.raises(KeyError):
        engine.recommend("nobody", 3)
    with pytest.raises(ValueError, match="unknown item ids"):
        engine.recommend(users[0], 3, history=["no-such-item"])


def test_a_dropped_engine_leaves_almost_nothing_to_the_collector(metarec_workspace: TrainedWorkspace) -> None:
    """The holder freezes each loaded engine out of garbage collection (components/serving/holder.py), so
    reference cycles in a replaced engine are never collected: there must be almost none."""
    import gc

    from components.bundle.engine import load_bundle

    metarec_workspace.check()
    bundle = metarec_workspace.path / "models" / "bundle"

    def collected_after_drop(lists: bool) -> int:
        engine = load_bundle(bundle)
        if lists:
            engine.warm()
            items = sorted(engine.item_ids)
            engine.recommend(None, 3, profile={"occupation": "writer"}, history=items[:1])
            for user in sorted(engine.users.user_id.astype(str)):
                engine.recommend(user, 3, history=items[:2])
        del engine
        return gc.collect()

    enabled = gc.isenabled()
    gc.disable()  # an automatic collection in between would hide what a drop leaves
    try:
        gc.collect()
        collected_after_drop(False)  # the first load also leaves one-off import garbage
        bare = collected_after_drop(False)  # the metapath schema graph: hundreds of small objects
        served = collected_after_drop(True)
    finally:
        if enabled:
            gc.enable()
    # Lists, profiles and users must add none: a per-list or per-user cycle would show here.
    assert bare < 2000 and served <= bare + 10, (bare, served)


def test_ready_waits_for_the_first_feedback_read(tmp_path: Path) -> None:
    """A worker that has not read the store yet would ignore everyone's feedback: /ready says 503."""
    import httpx

    from components.serving.app import create_app
    from components.serving.auth import ApiKeyAuth
    from components.serving.holder import ModelHolder
    from tests.serving_support import FileVersionSource, thread_server

    class Flaky:
        """The store a follower reads: unreadable until ``up`` is set."""

        up = False

        def __init__(self, path: Path) -> None:
            self.real = SQLiteFeedbackStore(path)

        def read_since(self, after_seq: int = 0, limit: int = 10_000) -> list:
            if not Flaky.up:
                raise OSError("store down")
            return self.real.read_since(after_seq, limit)

        def __getattr__(self, name: str) -> object:
            return getattr(self.real, name)

    source = FileVersionSource(tmp_path / "champion")
    source.set_version("v1")
    holder = ModelHolder(source, poll_seconds=0.05)
    store = Flaky(tmp_path / "f.db")
    follower = FeedbackFollower(store, FeedbackOverlay(), poll_seconds=0.05)  # type: ignore[arg-type]
    app = create_app(holder, store, auth=ApiKeyAuth("k" * 16), follower=follower)  # type: ignore[arg-type]
    with thread_server(app) as url:
        assert holder.wait_ready(10)
        answer = httpx.get(f"{url}/ready")
        assert answer.status_code == 503 and "feedback store not read yet" in answer.json()["detail"]
        Flaky.up = True
        deadline = time.monotonic() + 5
        while httpx.get(f"{url}/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert follower.synced and follower.failures >= 1
