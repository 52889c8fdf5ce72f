"""Feedback applied online: each user's clicks and ratings since training, read back from the feedback store.

A ``POST /feedback`` is acknowledged once the store has it; every serving worker and instance then sees it
by following the store (``read_since`` from the last sequence number it read), not only the process that
received it. The overlay keeps, per user, the items of the event types retraining would append
(``retrain.event_types``: clicks and ratings by default; impressions are not interactions), in the order
they arrived. The engine ranks a user with those items added to their history: they are excluded from the
next list and feed the history and metapath channels. A user the model never saw becomes known once they
gave feedback. ``metarec recommend --with-feedback`` builds the same overlay from the same store, so offline
and online lists stay comparable.

Both backends make sequence numbers visible in increasing order (SQLite's single writer; PostgreSQL's
writers take turns under an advisory lock until they commit), so following ``seq > last`` misses nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from components.serving.feedback import FeedbackRecord, FeedbackStore

log = logging.getLogger(__name__)

#: Event types that become history (the retrain flow appends the same ones as interactions).
DEFAULT_EVENT_TYPES = ("click", "rating")
#: Rows read per store round trip; a backlog is read in several.
READ_BATCH = 10_000


@dataclass
class FeedbackOverlay:
    """Per user, the items they interacted with through feedback, oldest first, each once.

    Updated by one follower thread and read by request threads: a user's history is replaced by a new
    tuple (an atomic rebind in CPython), so a reader sees either the old or the new one, never half.
    """

    event_types: frozenset[str] = frozenset(DEFAULT_EVENT_TYPES)
    #: The highest store sequence number applied.
    after_seq: int = 0
    #: Events applied, all types counted (a progress figure for logs and metrics).
    applied: int = 0
    _items: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def history(self, user_id: str | None) -> tuple[str, ...]:
        """The user's feedback items, oldest first; empty for None or a user without feedback."""
        if user_id is None:
            return ()
        return self._items.get(str(user_id), ())

    def histories(self) -> dict[str, tuple[str, ...]]:
        """A snapshot: user id -> feedback items, for every user with feedback history."""
        return dict(self._items)

    def apply(self, records: Iterable[FeedbackRecord]) -> int:
        """Add stored events (in ``seq`` order) to the overlay; returns the users whose history changed."""
        changed: dict[str, list[str]] = {}
        for record in records:
            self.after_seq = max(self.after_seq, int(record.seq))
            self.applied += 1
            event = record.event
            if event.type not in self.event_types:
                continue
            items = changed.get(event.user_id)
            if items is None:
                items = changed[event.user_id] = list(self._items.get(event.user_id, ()))
            if event.item_id not in items:
                items.append(event.item_id)
        for user, items in changed.items():
            self._items[user] = tuple(items)
        return len(changed)

    def load(self, store: FeedbackStore) -> int:
        """Apply everything the store holds after ``after_seq``; returns the events read."""
        total = 0
        while True:
            batch = store.read_since(self.after_seq, READ_BATCH)
            self.apply(batch)
            total += len(batch)
            if len(batch) < READ_BATCH:
                return total


def overlay_from_store(
    store: FeedbackStore, event_types: Sequence[str] = DEFAULT_EVENT_TYPES
) -> FeedbackOverlay:
    """The overlay of everything in ``store`` now (what ``metarec recommend --with-feedback`` ranks with)."""
    overlay = FeedbackOverlay(frozenset(event_types))
    overlay.load(store)
    return overlay


class FeedbackFollower:
    """A daemon thread that keeps an overlay up to date with the store, every ``poll_seconds``.

    A store outage is logged (once per outage) and retried on the next poll; requests keep the overlay
    they have, so serving never waits for the store.
    """

    def __init__(self, store: FeedbackStore, overlay: FeedbackOverlay, poll_seconds: float = 0.25) -> None:
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
        self.store = store
        self.overlay = overlay
        self.poll_seconds = poll_seconds
        self.failures = 0
        #: Whether the store has been read once since start (the backlog is applied): until then lists
        #: would ignore feedback, so ``/ready`` answers 503.
        self.synced = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def poll(self) -> int:
        """Read what arrived since the last poll; returns the events read (0 when the store failed)."""
        try:
            read = self.overlay.load(self.store)
        except Exception as err:
            self.failures += 1
            if not self._failing:
                log.warning("could not read the feedback store (%s); serving the last feedback read", err)
            self._failing = True
            return 0
        if self._failing:
            log.info("feedback store readable again at seq %d", self.overlay.after_seq)
        self._failing = False
        self.synced = True
        return read

    def start(self) -> None:
        """Read the backlog now (so the first request already sees it), then follow in the background.

        A store that cannot be read now is retried on every poll; ``synced`` stays False until it is.
        """
        if self._thread is not None and self._thread.is_alive():
            return
        start = time.perf_counter()
        read = self.poll()
        log.info(
            "feedback overlay: %d events read, %d users with history, in %.2fs",
            read,
            len(self.overlay.histories()),
            time.perf_counter() - start,
        )
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="feedback-follower", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop following; the overlay keeps what it has."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.poll()
