"""Running the app under uvicorn: one process, or several workers built by ``app_factory``.

``python -m components.serving.server --source module:callable`` runs it directly; ``metarec serve`` is
meant to call ``serve`` with settings taken from the project configuration.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from typing import Any, cast

import uvicorn
from fastapi import FastAPI
from uvicorn.supervisors import Multiprocess

from components.core import secrets
from components.core.config import SETTINGS_ENV, ServeSettings
from components.serving import privacy
from components.serving.app import create_app
from components.serving.auth import ApiKeyAuth
from components.serving.feedback import open_store
from components.serving.holder import ModelHolder
from components.serving.online import FeedbackFollower, FeedbackOverlay
from components.serving.protocol import EngineSource

log = logging.getLogger(__name__)

#: What uvicorn imports in each worker process when ``workers > 1``.
APP_FACTORY = "components.serving.server:app_factory"
LOG_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"


class TcpNoDelayConfig(uvicorn.Config):
    """uvicorn's Config, except that the socket it binds for workers says it is TCP.

    uvicorn (0.54, Kludex/uvicorn#3149) binds the shared worker socket with ``proto`` 0; accepted
    connections inherit it and asyncio then skips ``TCP_NODELAY``, so every keep-alive response after the
    first waits ~40 ms on the client's delayed ACK. Measured here: 44 ms per request with 2 workers
    against 1-2 ms with one.
    """

    def bind_socket(self) -> socket.socket:
        """Bind as uvicorn does, then re-wrap the descriptor with ``IPPROTO_TCP``."""
        sock = super().bind_socket()
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.proto == socket.IPPROTO_TCP:
            return sock
        fixed = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
        fixed.set_inheritable(True)
        return fixed


def load_source(settings: ServeSettings) -> EngineSource:
    """Build the engine source named by ``settings.source`` (``"module:callable"``, called with settings).

    Raises:
        ValueError: No source is configured or the name is malformed.
    """
    if not settings.source:
        raise ValueError(
            "no engine source configured: set serve.source to 'module:callable', a callable taking "
            "ServeSettings and returning an EngineSource (the registry source for models:/<name>@champion)"
        )
    module_name, sep, attr = settings.source.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"serve.source must look like 'package.module:callable', got {settings.source!r}")
    factory = getattr(importlib.import_module(module_name), attr)
    return cast(Callable[[ServeSettings], EngineSource], factory)(settings)


def build_app(settings: ServeSettings, source: EngineSource | None = None) -> FastAPI:
    """The app for ``settings``: its engine source, the feedback store its URL names, the env's API key.

    The feedback store URL is ``METAREC_FEEDBACK_URL[_FILE]`` when set (credentials live there), else
    ``settings.feedback_url``. The serving loggers get the privacy filter first (``privacy.install``):
    URL passwords masked, user ids hashed with ``settings.hash_user_ids``.
    """
    # Log filter and auth first: a misconfigured key must stop the server before anything is opened.
    privacy.install(settings)
    sys.setswitchinterval(settings.gil_switch_ms / 1000)
    auth = ApiKeyAuth.from_env(settings.require_key_for_reads, settings.allow_anonymous_writes)
    feedback_url = secrets.feedback_url(settings.feedback_url)
    source = source if source is not None else load_source(settings)
    log.info("feedback store %s", secrets.redact_url(feedback_url))
    store = open_store(feedback_url)
    holder = ModelHolder(
        source, settings.poll_seconds, settings.retry_seconds, warm_users=settings.precompute_users
    )
    follower = None
    if settings.online_feedback:
        overlay = FeedbackOverlay(frozenset(settings.online_event_types))
        follower = FeedbackFollower(store, overlay, settings.feedback_poll_seconds)
    return create_app(holder, store, settings, auth=auth, follower=follower)


def app_factory() -> FastAPI:
    """Uvicorn factory for worker processes: settings come from ``METAREC_SERVE_SETTINGS`` (JSON)."""
    settings = ServeSettings.from_env()
    if not logging.getLogger().handlers:
        # A spawned worker starts with bare logging; without this, swaps and load failures go unlogged.
        logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    return build_app(settings)


def serve(settings: ServeSettings) -> None:
    """Serve until interrupted, with ``settings.workers`` processes sharing one port.

    Every worker polls the registry and swaps on its own; they share nothing but the registry and the
    feedback store, which is what lets them (and other instances) run side by side.

    Raises:
        privacy.UserIdSaltError: ``hash_user_ids`` without a key (checked before any worker starts).
    """
    privacy.install(settings)
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": settings.access_log,
        # SIGTERM gives in-flight requests this long to finish before the workers exit.
        "timeout_graceful_shutdown": 10,
    }
    if settings.workers == 1:
        uvicorn.run(build_app(settings), **common)
        return
    # Workers are spawned processes: they rebuild the app from an import string and the environment.
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    own_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Without it each worker would report only its own counters, whichever one the scrape reached.
        own_dir = tempfile.mkdtemp(prefix="metarec-prometheus-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir
    try:
        # What uvicorn.run does for workers > 1, with the socket fix above.
        config = TcpNoDelayConfig(APP_FACTORY, factory=True, workers=settings.workers, **common)
        Multiprocess(config, sockets=[config.bind_socket()]).run()
    except KeyboardInterrupt:
        pass
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """Command line for running the server without the project CLI (benchmarks, tests, debugging)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", help="'module:callable' building the EngineSource from the settings")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--feedback-url", default=ServeSettings().feedback_url)
    parser.add_argument("--poll-seconds", type=float, default=ServeSettings().poll_seconds)
    parser.add_argument("--require-key-for-reads", action="store_true")
    parser.add_argument("--allow-anonymous-writes", action="store_true")
    parser.add_argument("--precompute-users", type=int, default=ServeSettings().precompute_users)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--access-log", action="store_true", help="Log one line per request.")
    parser.add_argument(
        "--hash-user-ids", action="store_true", help="Log user ids as keyed hashes (METAREC_USER_ID_SALT)."
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    serve(
        ServeSettings(
            source=args.source,
            host=args.host,
            port=args.port,
            workers=args.workers,
            feedback_url=args.feedback_url,
            poll_seconds=args.poll_seconds,
            precompute_users=args.precompute_users,
            require_key_for_reads=args.require_key_for_reads,
            allow_anonymous_writes=args.allow_anonymous_writes,
            log_level=args.log_level,
            access_log=args.access_log,
            hash_user_ids=args.hash_user_ids,
        )
    )


if __name__ == "__main__":
    main()
