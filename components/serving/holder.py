"""Keeps the current engine and swaps in the champion's new version in the background."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from components.serving.protocol import Engine, EngineSource

log = logging.getLogger(__name__)

#: Called after every successful swap with (old version or None, new version).
SwapListener = Callable[[str | None, str], None]


class ModelHolder:
    """The engine requests use, replaced atomically when the registry alias moves.

    A request reads ``holder.engine`` once and keeps that reference until it answers, so a swap never
    changes the model under a running request: in-flight requests finish on the old engine, which is freed
    when the last of them drops it. Rebinding one attribute is atomic in CPython, so readers need no lock.

    Loading happens on a daemon thread that polls ``source.current_version()``; a version that fails to load
    is logged, the old engine keeps serving, and the version is retried after ``retry_seconds`` rather than
    on every poll, since a broken bundle would otherwise be downloaded again every few seconds.
    """

    def __init__(
        self,
        source: EngineSource,
        poll_seconds: float = 5.0,
        retry_seconds: float = 60.0,
        warm_users: int | None = 0,
    ) -> None:
        """Create a holder; nothing is loaded until ``start`` or ``refresh`` is called.

        Args:
            source: Says which version is the champion and loads it.
            poll_seconds: How often the alias is checked.
            retry_seconds: How long a version that failed to load is left alone before another try.
            warm_users: Known users whose lists an engine with ``warm`` computes before it takes traffic
                (None: all; 0: none), so a swap brings no burst of first-time computations.
        """
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
        self.source = source
        self.warm_users = warm_users
        self.poll_seconds = poll_seconds
        self.retry_seconds = retry_seconds
        self._engine: Engine | None = None
        self._failed: dict[str, float] = {}
        self._listeners: list[SwapListener] = []
        # Serialises refreshes (the poller and an explicit refresh()); readers never take it.
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.swaps = 0
        self.load_failures = 0
        #: True while a loaded version's lists are being precomputed (``/ready`` reports it).
        self.warming = False

    @property
    def engine(self) -> Engine | None:
        """The engine to answer with, or None before the first successful load."""
        return self._engine

    @property
    def ready(self) -> bool:
        """Whether an engine is loaded."""
        return self._engine is not None

    @property
    def version(self) -> str | None:
        """Version of the current engine, or None before the first load."""
        engine = self._engine
        return engine.version if engine is not None else None

    def add_listener(self, listener: SwapListener) -> None:
        """Call ``listener(old, new)`` after each swap (used for metrics)."""
        self._listeners.append(listener)

    def set_engine(self, engine: Engine) -> None:
        """Install an already loaded engine (tests, or a server that loads before binding)."""
        old = self.version
        self._engine = engine
        self.swaps += 1
        log.info("serving model version %s (was %s)", engine.version, old)
        for listener in self._listeners:
            try:
                listener(old, engine.version)
            except Exception:  # a broken metrics hook must not undo a good swap
                log.exception("swap listener failed")

    def refresh(self) -> bool:
        """Check the alias once and load its version if it changed; True when a swap happened."""
        with self._refresh_lock:
            try:
                wanted = self.source.current_version()
            except Exception:
                # A registry outage must not take down a serving process: keep what we have.
                log.exception("could not read the champion version; keeping %s", self.version)
                return False
            if wanted is None:
                if self._engine is not None:
                    log.debug("champion alias points nowhere; keeping %s", self.version)
                return False
            if wanted == self.version:
                return False
            failed_at = self._failed.get(wanted)
            if failed_at is not None and time.monotonic() - failed_at < self.retry_seconds:
                return False
            log.info("champion moved to %s; loading it in the background", wanted)
            with _collection_off():
                start = time.perf_counter()
                try:
                    engine = self.source.load(wanted)
                except Exception:
                    self._failed[wanted] = time.monotonic()
                    self.load_failures += 1
                    log.exception("loading model version %s failed; keeping %s", wanted, self.version)
                    return False
                self._failed.pop(wanted, None)
                log.info("loaded model version %s in %.2fs", wanted, time.perf_counter() - start)
                if self._engine is None:
                    # Nothing serves yet: answer now (misses are computed exactly) and warm in place.
                    self.set_engine(engine)
                    self._warm(engine, wanted)
                else:
                    # The old engine answers until the new one is warm, so a swap brings no burst of misses.
                    self._warm(engine, wanted)
                    self.set_engine(engine)
                # Out of later collections: what survived the load lives until the next swap.
                gc.freeze()
                return True

    def _warm(self, engine: Engine, version: str) -> None:
        warm = getattr(engine, "warm", None)
        if not callable(warm) or self.warm_users == 0:
            return
        begun = time.perf_counter()
        self.warming = True
        try:
            count = warm(self.warm_users)
        except Exception:  # a failed warm-up costs speed, not correctness
            log.exception("warming model version %s failed; serving it cold", version)
        else:
            log.info("warmed %s users of version %s in %.2fs", count, version, time.perf_counter() - begun)
        finally:
            self.warming = False

    def start(self) -> None:
        """Start the background poller (idempotent); the first load happens on it, not here."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="model-holder", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the poller; the current engine keeps answering until the process ends."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wait_ready(self, timeout: float) -> bool:
        """Block until an engine is loaded or ``timeout`` seconds passed; returns ``ready``."""
        deadline = time.monotonic() + timeout
        while not self.ready and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.ready

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.poll_seconds)


@contextmanager
def _collection_off() -> Iterator[None]:
    """Load and warm a model without stopping the requests for the garbage collector.

    Loading allocates hundreds of thousands of long-lived objects, which set off collections, each
    holding the GIL while requests wait (one ml-100k promotion: 35 collections, up to 3.8 ms; a full
    collection in a started process: 77-200 ms). So collection is off while loading, and after a
    successful load :meth:`ModelHolder.refresh` freezes everything that survived out of later collections
    (``gc.freeze``): those objects live until the next swap, and serving itself allocates almost nothing
    that outlives a request. The cost: reference cycles made during that load (by any thread) and those
    in a replaced engine are never collected. For the bundle engine the latter are a few hundred small
    objects (its metapath schema graph) per swap, however many lists it served
    (tests/serving/test_online_feedback.py checks). A failed load freezes nothing, so retries of a
    broken version cannot accumulate frozen garbage.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
