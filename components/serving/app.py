"""The HTTP API: recommendations, feedback, health, readiness and Prometheus metrics."""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match

from components.core.config import ServeSettings
from components.serving.auth import ApiKeyAuth
from components.serving.feedback import FeedbackEvent, FeedbackStore, StoreUnavailableError
from components.serving.holder import ModelHolder
from components.serving.online import FeedbackFollower
from components.serving.protocol import Engine

log = logging.getLogger(__name__)

MAX_K = 1000
MAX_BATCH = 1000
MAX_HISTORY = 1000
MAX_PROFILE_FIELDS = 32
#: ``reason`` label values of ``metarec_feedback_write_failures_total``.
FEEDBACK_FAILURE_REASONS = ("unavailable", "error")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Ids are the dataset's original tokens; bounding them keeps a hostile client from storing megabytes per row.
# No NUL characters: PostgreSQL cannot store them, and they are a client mistake (422), not a store error.
NO_NUL = r"^[^\x00]*$"
Id = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=NO_NUL)]
ProfileKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
ProfileValue = Annotated[str, StringConstraints(max_length=256)] | int | float


class _Strict(BaseModel):
    # Unknown fields are most likely typos (e.g. "histroy"), which would silently change the answer.
    model_config = ConfigDict(extra="forbid")


class RecommendedItem(_Strict):
    """One recommended item."""

    item_id: str
    rank: int
    score: float
    explanation: str | None


class RecommendationResponse(_Strict):
    """A ranked list and the model version that produced it (send it back with impressions)."""

    user_id: str | None
    model_version: str
    # Quote it in feedback events (request_id) to tie them to this list.
    request_id: str
    items: list[RecommendedItem]


class RecommendRequest(_Strict):
    """Recommendations for a cold or partially known user, from a profile and/or an interaction history."""

    user_id: Id | None = None
    # Side information such as gender, age, occupation, zip_code; numbers are passed on as strings.
    profile: dict[ProfileKey, ProfileValue] | None = Field(default=None, max_length=MAX_PROFILE_FIELDS)
    history: list[Id] | None = Field(default=None, max_length=MAX_HISTORY)
    k: int = Field(default=10, ge=1, le=MAX_K)
    explain: bool = True

    @model_validator(mode="after")
    def _something_to_rank_for(self) -> RecommendRequest:
        if self.user_id is None and not self.profile and not self.history:
            raise ValueError("give at least one of user_id, profile or history")
        return self


class FeedbackIn(_Strict):
    """One client event; ``event_id`` makes retries safe (an id already stored is not stored again)."""

    event_id: Id
    type: Literal["impression", "click", "rating"]
    user_id: Id
    item_id: Id
    # Client event time: ISO 8601 with a timezone, or seconds since the epoch; the receive time if absent.
    ts: AwareDatetime | float | None = None
    # The rating; required for "rating" events and refused for the others.
    value: float | None = Field(default=None, allow_inf_nan=False)
    # The version that produced the list (response's model_version); required for impressions.
    model_version: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=NO_NUL)] | None = (
        None
    )
    request_id: Annotated[str, StringConstraints(max_length=128, pattern=NO_NUL)] | None = None
    # 1-based rank at which the item was shown.
    position: int | None = Field(default=None, ge=1, le=MAX_K)

    @model_validator(mode="after")
    def _consistent(self) -> FeedbackIn:
        if self.type == "rating" and self.value is None:
            raise ValueError("a rating event needs a value")
        if self.type != "rating" and self.value is not None:
            raise ValueError(f"value is only for rating events, not {self.type}")
        if self.type == "impression" and self.model_version is None:
            raise ValueError("an impression needs the model_version that produced it")
        if isinstance(self.ts, float) and not (math.isfinite(self.ts) and self.ts >= 0):
            raise ValueError("ts must be a finite, non-negative epoch time")
        return self

    def to_event(self, received_at: float) -> FeedbackEvent:
        """The store's form of this event."""
        if isinstance(self.ts, datetime):
            ts = self.ts.timestamp()
        else:
            ts = received_at if self.ts is None else float(self.ts)
        return FeedbackEvent(
            event_id=self.event_id,
            type=self.type,
            user_id=self.user_id,
            item_id=self.item_id,
            ts=ts,
            value=self.value,
            model_version=self.model_version,
            request_id=self.request_id,
            position=self.position,
        )


class FeedbackBatch(_Strict):
    """A batch of events, stored all together or not at all."""

    events: list[FeedbackIn] = Field(min_length=1, max_length=MAX_BATCH)


class FeedbackResult(_Strict):
    """How many events were new and how many were already stored (retries)."""

    inserted: int
    duplicates: int


class ServingMetrics:
    """The app's Prometheus metrics, on a registry of its own so several apps can live in one process.

    Under several worker processes, set ``PROMETHEUS_MULTIPROC_DIR`` (``serve`` does) before
    prometheus_client is imported: values then go to files there and /metrics aggregates all workers.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        """Register the metrics on ``registry``."""
        self.registry = registry
        labels = ["method", "route", "status"]
        self.requests = Counter(
            "metarec_http_requests", "HTTP requests by route template and status.", labels, registry=registry
        )
        self.latency = Histogram(
            "metarec_http_request_duration_seconds",
            "HTTP request latency by route template and status.",
            labels,
            registry=registry,
            # Finer below 10 ms, where the latency goal (p99 <= 10 ms) sits.
            buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
        )
        self.model_info = Gauge(
            "metarec_model_info",
            "1 for the model version being served, 0 for versions served before.",
            ["version"],
            registry=registry,
            multiprocess_mode="liveall",
        )
        self.model_swaps = Counter(
            "metarec_model_swaps", "Model versions installed, the first load included.", registry=registry
        )
        self.feedback = Counter(
            "metarec_feedback_events",
            "Feedback events written (inserted) or recognised as retries (duplicate).",
            ["result"],
            registry=registry,
        )
        # The three below back alerts (deploy/prometheus/alerts.yml, docs/alerts.md).
        # livemin over workers: an instance counts as loaded only when every live worker is.
        self.model_loaded = Gauge(
            "metarec_model_loaded",
            "1 while a model is loaded and requests can be answered, 0 before the first load.",
            registry=registry,
            multiprocess_mode="livemin",
        )
        # livemin: during a swap the oldest version still served is the one that counts for staleness.
        self.model_created = Gauge(
            "metarec_model_created_timestamp_seconds",
            "When the served model version was registered (seconds since the epoch); 0 when unknown.",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.feedback_failures = Counter(
            "metarec_feedback_write_failures",
            "Feedback batches not stored: store busy or unreachable (unavailable, answered 503) "
            "or any other store error (error, answered 500).",
            ["reason"],
            registry=registry,
        )
        for reason in FEEDBACK_FAILURE_REASONS:
            # Present at 0 from the start, so rate() and increase() see the first failure.
            self.feedback_failures.labels(reason=reason)

    def on_swap(self, old: str | None, new: str) -> None:
        """Holder listener: move the model_info gauge to the new version."""
        if old is not None:
            self.model_info.labels(version=old).set(0)
        self.model_info.labels(version=new).set(1)
        self.model_swaps.inc()

    def observe_engine(self, engine: Engine | None) -> None:
        """Set the loaded flag and the served version's registration time from ``engine``."""
        self.model_loaded.set(0 if engine is None else 1)
        self.model_created.set(created_at(engine) or 0.0)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The metrics in the format the scraper asked for, aggregated over workers in multiprocess mode."""
        registry = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        encoder, content_type = choose_encoder(accept or "")
        return encoder(registry), content_type


def created_at(engine: Engine | None) -> float | None:
    """The engine's optional ``created_at`` (registration time, epoch seconds); None when absent or invalid.

    Not a member of the ``Engine`` protocol: test engines and older sources do not know it, and the
    model-age alert then stays quiet rather than guessing.
    """
    value = getattr(engine, "created_at", None)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body larger than {limit} bytes")


class ObserveMiddleware:
    """Pure ASGI middleware: enforces the body size limit and records request metrics.

    Pure ASGI rather than ``BaseHTTPMiddleware`` because the latter adds a task and a stream per request,
    a measurable share of a millisecond-scale latency budget.
    """

    def __init__(self, app: ASGIApp, metrics: ServingMetrics, max_body_bytes: int, routes: list[Any]) -> None:
        """Wrap ``app``; ``routes`` resolve the route template of requests refused before routing."""
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        started = False

        async def send_observed(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = int(message["status"])
                started = True
            await send(message)

        try:
            declared = _content_length(scope)
            if declared is not None and declared > self.max_body_bytes:
                # Refuse before reading: a client announcing 1 GB must not make us buffer it.
                await _send_json(send_observed, 413, {"detail": _BodyTooLarge(self.max_body_bytes).detail})
                return
            received = 0

            async def receive_limited() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        # Chunked bodies announce no length; FastAPI re-raises HTTPExceptions from here.
                        raise _BodyTooLarge(self.max_body_bytes)
                return message

            await self.app(scope, receive_limited, send_observed)
        except _BodyTooLarge as err:
            if started:
                raise
            await _send_json(send_observed, 413, {"detail": err.detail})
        finally:
            elapsed = time.perf_counter() - start
            labels = (scope["method"], self._route(scope), str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(elapsed)

    def _route(self, scope: Scope) -> str:
        # The template, never the raw path: one time series per user id would swamp Prometheus.
        route = scope.get("route")
        if route is None:
            for candidate in self.routes:
                if candidate.matches(scope)[0] is Match.FULL:
                    route = candidate
                    break
        path = getattr(route, "path", None)
        return path if isinstance(path, str) else "<unmatched>"


# How pydantic (and so FastAPI's Query) reads a bool from a query string.
_BOOLS = {
    b"1": True, b"on": True, b"t": True, b"true": True, b"y": True, b"yes": True,
    b"0": False, b"off": False, b"f": False, b"false": False, b"n": False, b"no": False,
}  # fmt: skip
#: Remembered-list lookup for the shortcut: (user id, k, explain) -> the response body, or None.
Lookup = Callable[[str, int, bool], bytes | None]


class RememberedLists:
    """Pure ASGI shortcut for the hottest request, ``GET /recommendations/{user_id}`` of a remembered list.

    Such a request is a dictionary lookup, yet FastAPI's parameter solving and pydantic's response model
    cost several times that. This layer answers it with the list's cached JSON. Everything else, any
    parameter it does not read exactly as FastAPI would (percent-encoded, repeated, unknown, out of range),
    and every miss pass through to the app, which validates, computes and answers errors as documented;
    the body is the same either way (tests/serving/test_serving_e2e.py compares them).
    """

    PREFIX = "/recommendations/"

    def __init__(self, app: ASGIApp, lookup: Lookup, route: Any) -> None:
        """Wrap ``app``; ``route`` is the app's route for this path (metrics label requests by it)."""
        self.app = app
        self.lookup = lookup
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a remembered list, else hand the request on."""
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"].startswith(self.PREFIX):
            body = self._remembered(scope)
            if body is not None:
                scope["route"] = self.route
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body)),
                    (b"x-metarec-list", b"remembered"),  # for operators: this answer was a lookup
                ]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def _remembered(self, scope: Scope) -> bytes | None:
        user_id: str = scope["path"][len(self.PREFIX) :]
        if not user_id or len(user_id) > 128 or "/" in user_id:
            return None
        k, explain, seen = 10, True, set()
        query: bytes = scope.get("query_string", b"")
        for part in query.split(b"&") if query else ():
            name, _, value = part.partition(b"=")
            if name in seen:
                return None
            seen.add(name)
            # At most 4 digits (MAX_K is 1000): int() of a 5000-digit value raises; FastAPI answers 422.
            if name == b"k" and len(value) <= 4 and value.isdigit() and 1 <= int(value) <= MAX_K:
                k = int(value)
            elif name == b"explain" and value.lower() in _BOOLS:
                explain = _BOOLS[value.lower()]
            else:
                return None
        return self.lookup(user_id, k, explain)


def _item_json(entries: list[tuple[str, float, str | None]], explain: bool) -> list[bytes]:
    """Each item of a remembered list as ``RecommendedItem`` JSON (rank = position), for joining."""
    return [
        RecommendedItem(item_id=item, rank=rank, score=score, explanation=note if explain else None)
        .model_dump_json()
        .encode()
        for rank, (item, score, note) in enumerate(entries, start=1)
    ]


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    response = JSONResponse(body, status_code=status)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def _unknown_user(user_id: str | None) -> str:
    return f"unknown user {user_id!r}; POST /recommendations with a profile or history for new users"


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, str | int | float | bool) else str(value)


def _reason(errors: list[dict[str, Any]]) -> str:
    parts = []
    for error in errors:
        where = ".".join(str(part) for part in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg", "invalid")))
    return "; ".join(parts)


def create_app(
    holder: ModelHolder,
    store: FeedbackStore,
    settings: ServeSettings | None = None,
    auth: ApiKeyAuth | None = None,
    manage: bool = True,
    follower: FeedbackFollower | None = None,
) -> FastAPI:
    """Build the serving app around a model holder and a feedback store.

    Args:
        holder: Supplies the current engine; its poller is started with the app when ``manage``.
        store: Where feedback goes.
        settings: Body limit and auth options; defaults when None.
        auth: Key checks; built from the environment and ``settings`` when None.
        manage: Start the holder's poller and the follower on startup, stop them and close the store on
            shutdown.
        follower: Follows ``store`` into an overlay of users' feedback histories, which requests rank
            with (components.serving.online); None: feedback changes nothing until a retrain.
    """
    settings = settings or ServeSettings()
    if auth is None:
        auth = ApiKeyAuth.from_env(settings.require_key_for_reads, settings.allow_anonymous_writes)
    metrics = ServingMetrics(CollectorRegistry(auto_describe=True))
    holder.add_listener(metrics.on_swap)
    # Listeners run after the new engine is installed, so holder.engine is the one just swapped in.
    holder.add_listener(lambda _old, _new: metrics.observe_engine(holder.engine))
    if holder.version is not None:
        metrics.model_info.labels(version=holder.version).set(1)
    metrics.observe_engine(holder.engine)

    overlay = follower.overlay if follower is not None else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage:
            if follower is not None:
                follower.start()
            holder.start()
        try:
            yield
        finally:
            if manage:
                holder.stop()
                if follower is not None:
                    follower.stop()
                store.close()

    app = FastAPI(
        title="metarec serving",
        summary="Knowledge-graph metapath recommendations from the registry's champion model.",
        lifespan=lifespan,
    )
    app.state.holder = holder
    app.state.store = store
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def validation_failed(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [dict(error) for error in exc.errors()]
        for error in errors:
            # Echoing the input back can return a whole (up to 1 MiB) body; the location says enough.
            error.pop("input", None)
            if isinstance(error.get("ctx"), dict):
                # A validator's exception object would serialise as {}; its message is what helps.
                error["ctx"] = {key: _plain(value) for key, value in error["ctx"].items()}
        return JSONResponse(
            status_code=422, content={"detail": jsonable_encoder(errors), "reason": _reason(errors)}
        )

    def current_engine() -> Engine:
        engine = holder.engine
        if engine is None:
            raise HTTPException(
                status_code=503, detail="no model loaded yet; retry shortly", headers={"Retry-After": "1"}
            )
        return engine

    def feedback_history(engine: Engine, user_id: str | None) -> list[str]:
        """The user's items from feedback that this engine can rank (the store may predate its catalogue)."""
        if overlay is None:
            return []
        items = engine.item_ids
        return [i for i in overlay.history(user_id) if i in items]

    def known_history(engine: Engine, user_id: str) -> list[str] | None:
        """The feedback items a ``GET`` for this user ranks with, or None when the user is unknown to both
        the model and the feedback store (a 404)."""
        extra = feedback_history(engine, user_id)
        return None if not extra and not engine.known_user(user_id) else extra

    def respond(engine: Engine, user_id: str | None, items: list[Any]) -> Response:
        body = RecommendationResponse(
            user_id=user_id,
            model_version=engine.version,
            request_id=uuid.uuid4().hex,
            items=[RecommendedItem(**item) for item in items],
        )
        # Serialised here, once: returned as a model, FastAPI would validate and encode it again, a
        # noticeable share of a sub-millisecond request.
        return Response(content=body.model_dump_json(), media_type="application/json")

    async def answer_async(
        engine: Engine,
        user_id: str | None,
        k: int,
        profile: dict[str, str] | None,
        history: list[str] | None,
        explain: bool,
        remember: bool = True,
    ) -> Response:
        """A remembered list on the event loop (a lookup); anything to compute on the thread pool.

        ``remember``: whether a computed list may be kept. Only histories from the feedback store are;
        one a client posts is computed each time, so clients cannot fill the server's memory with lists.
        """
        cached = getattr(engine, "cached", None)
        if cached is not None:
            found = cached(user_id, k, profile=profile, history=history, explain=explain)
            if found is not None:
                return respond(engine, user_id, found)
        return await run_in_threadpool(answer, engine, user_id, k, profile, history, explain, remember)

    def answer(
        engine: Engine,
        user_id: str | None,
        k: int,
        profile: dict[str, str] | None,
        history: list[str] | None,
        explain: bool,
        remember: bool = True,
    ) -> Response:
        rank = engine.recommend if remember else getattr(engine, "rank", engine.recommend)
        try:
            items = rank(user_id, k, profile=profile, history=history, explain=explain)
        except KeyError as err:
            if user_id is not None and not engine.known_user(user_id):
                raise HTTPException(status_code=404, detail=_unknown_user(user_id)) from err
            raise  # a KeyError for a known user is an engine bug: a 500, not a misleading 404
        except ValueError as err:
            raise HTTPException(status_code=422, detail=str(err)) from err
        return respond(engine, user_id, items)

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        """The process is up (liveness); says nothing about the model."""
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], responses={503: {"description": "No model loaded yet"}})
    async def ready() -> JSONResponse:
        """200 once a model is loaded and requests can be answered, 503 before."""
        version = holder.version
        if version is None:
            return JSONResponse(status_code=503, content={"ready": False, "detail": "no model loaded yet"})
        if follower is not None and not follower.synced:
            # Lists would ignore every user's feedback (and repeat items they already clicked).
            detail = "feedback store not read yet; lists would ignore users' feedback"
            return JSONResponse(status_code=503, content={"ready": False, "detail": detail})
        return JSONResponse(content={"ready": True, "model_version": version, "warming": holder.warming})

    @app.get("/metrics", tags=["ops"])
    async def prometheus(request: Request) -> Response:
        """Prometheus metrics: requests and latency by route and status, model version and age, feedback."""
        body, content_type = metrics.exposition(request.headers.get("accept"))
        return Response(content=body, media_type=content_type)

    # Open reads skip the dependency altogether: resolving even a no-op one costs per request.
    read_checks = [Depends(auth.check_read)] if auth.require_key_for_reads else []

    @app.get(
        "/recommendations/{user_id}",
        tags=["recommendations"],
        response_model=RecommendationResponse,
        dependencies=read_checks,
        responses={404: {"description": "Unknown user"}, 503: {"description": "No model loaded yet"}},
    )
    async def recommend_known(
        user_id: Annotated[str, Path(min_length=1, max_length=128, description="Dataset's original user id")],
        k: Annotated[int, Query(ge=1, le=MAX_K, description="Number of items")] = 10,
        explain: Annotated[bool, Query(description="Include each item's top metapath explanation")] = True,
    ) -> Response:
        """Top-k items for a user the model knows or who gave feedback, excluding items they interacted with.

        Clicks and ratings posted to ``/feedback`` (by this or any other server on the same store) join
        the user's history within about ``serve.feedback_poll_seconds``.
        """
        # Read the engine once: a swap during this request must not mix two models in one answer.
        engine = current_engine()
        extra = known_history(engine, user_id)
        if extra is None:
            raise HTTPException(status_code=404, detail=_unknown_user(user_id))
        return await answer_async(engine, user_id, k, None, extra or None, explain)

    @app.post(
        "/recommendations",
        tags=["recommendations"],
        response_model=RecommendationResponse,
        dependencies=read_checks,
        responses={404: {"description": "Unknown user and nothing else to go on"}},
    )
    async def recommend_cold(body: RecommendRequest) -> Response:
        """Top-k items from a profile and/or history (cold users), optionally for a known user id.

        With a ``user_id``, the user's feedback since training is added to the given history.
        """
        engine = current_engine()
        profile = {key: str(value) for key, value in body.profile.items()} if body.profile else None
        history = list(dict.fromkeys([*feedback_history(engine, body.user_id), *(body.history or [])]))
        return await answer_async(
            engine, body.user_id, body.k, profile, history or None, body.explain, remember=not body.history
        )

    @app.post(
        "/feedback",
        tags=["feedback"],
        dependencies=[Depends(auth.check_write)],
        responses={
            401: {"description": "Missing API key"},
            403: {"description": "Wrong API key"},
            503: {"description": "Store busy or no model loaded; retry (events are idempotent)"},
        },
    )
    def feedback(body: FeedbackBatch) -> FeedbackResult:
        """Store impressions, clicks and ratings; answered only after the batch is durable."""
        engine = current_engine()
        unknown = [
            f"events[{i}].item_id={event.item_id!r}"
            for i, event in enumerate(body.events)
            if event.item_id not in engine.item_ids
        ]
        if unknown:
            shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            raise HTTPException(status_code=422, detail=f"unknown items: {shown}")
        received_at = time.time()
        try:
            inserted, duplicates = store.write([event.to_event(received_at) for event in body.events])
        except StoreUnavailableError as err:
            metrics.feedback_failures.labels(reason="unavailable").inc()
            # Nothing was written, so a retry of the same batch is safe and stores it once.
            log.warning("feedback store busy: %s", err)
            raise HTTPException(
                status_code=503, detail="feedback store busy; retry the batch", headers={"Retry-After": "1"}
            ) from err
        except Exception:
            # Answered 500 by the framework; counted so that a broken store pages someone.
            metrics.feedback_failures.labels(reason="error").inc()
            raise
        metrics.feedback.labels(result="inserted").inc(inserted)
        metrics.feedback.labels(result="duplicate").inc(duplicates)
        return FeedbackResult(inserted=inserted, duplicates=duplicates)

    def remembered(user_id: str, k: int, explain: bool) -> bytes | None:
        """``recommend_known``'s body when the engine remembers the list; None for anything else."""
        engine = holder.engine
        cached_top = getattr(engine, "cached_top", None)
        if engine is None or cached_top is None:
            return None
        extra = known_history(engine, user_id)
        if extra is None:
            return None
        top = cached_top(user_id, extra or None, k)
        if top is None:
            return None
        if top.encoded is None:
            # Once per list; two threads racing here compute the same value.
            top.encoded = (_item_json(top.entries, True), _item_json(top.entries, False))
        items = b",".join(top.encoded[0 if explain else 1][:k])
        head = json.dumps(
            {"user_id": user_id, "model_version": engine.version}, ensure_ascii=False, separators=(",", ":")
        )
        return b'%s,"request_id":"%s","items":[%s]}' % (head[:-1].encode(), uuid.uuid4().hex.encode(), items)

    # Innermost first: the shortcut sits inside ObserveMiddleware, so its answers are measured too. With
    # keys required for reads, every read goes through the app's auth dependency instead.
    if not auth.require_key_for_reads:
        route = next(r for r in app.router.routes if getattr(r, "path", None) == "/recommendations/{user_id}")
        app.add_middleware(RememberedLists, lookup=remembered, route=route)
    app.add_middleware(
        ObserveMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        routes=app.router.routes,
    )
    return app
