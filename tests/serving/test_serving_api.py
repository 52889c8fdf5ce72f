"""HTTP API of the serving app on a real uvicorn server: recommendations, validation, limits, ops routes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving_support import API_KEY, FileVersionSource, TableEngine, events, thread_server

from components.core.config import ServeSettings
from components.serving.app import create_app
from components.serving.auth import ApiKeyAuth
from components.serving.feedback import FeedbackEvent, SQLiteFeedbackStore, StoreUnavailableError
from components.serving.holder import ModelHolder

WRITE = {"X-API-Key": API_KEY}


@dataclass
class Served:
    """A running server and what it was built from."""

    client: httpx.Client
    holder: ModelHolder
    store: SQLiteFeedbackStore

    @property
    def engine(self) -> TableEngine:
        engine = self.holder.engine
        assert isinstance(engine, TableEngine)
        return engine


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("api")
    source = FileVersionSource(tmp / "champion")
    source.set_version("v1")
    holder = ModelHolder(source, poll_seconds=0.05)
    store = SQLiteFeedbackStore(tmp / "feedback.db")
    settings = ServeSettings(max_body_bytes=64 * 1024)
    app = create_app(holder, store, settings, auth=ApiKeyAuth(API_KEY))
    with thread_server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert holder.wait_ready(10)
        yield Served(client, holder, store)


def test_health_ready_and_not_ready(tmp_path: Path, served: Served) -> None:
    assert served.client.get("/health").json() == {"status": "ok"}
    assert served.client.get("/ready").json() == {"ready": True, "model_version": "v1", "warming": False}
    # No champion yet: the process is alive but not ready, and recommendations say why.
    holder = ModelHolder(FileVersionSource(tmp_path / "nothing"), poll_seconds=0.05)
    app = create_app(holder, SQLiteFeedbackStore(tmp_path / "f.db"), auth=ApiKeyAuth(API_KEY))
    with thread_server(app) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/ready").status_code == 503
        response = httpx.get(f"{url}/recommendations/u1")
        assert response.status_code == 503
        assert "no model loaded" in response.json()["detail"]


def test_recommendations_for_known_user(served: Served) -> None:
    response = served.client.get("/recommendations/u3", params={"k": 10})
    assert response.status_code == 200
    body = response.json()
    assert body["user_id"] == "u3"
    assert body["model_version"] == "v1"
    assert len(body["request_id"]) == 32
    items = body["items"]
    assert [item["rank"] for item in items] == list(range(1, 11))
    scores = [item["score"] for item in items]
    assert scores == sorted(scores, reverse=True)
    assert all(item["explanation"] for item in items)
    assert items == served.engine.recommend("u3", 10)
    # Items the user interacted with are never recommended, even when all items are asked for.
    everything = served.client.get("/recommendations/u3", params={"k": 1000}).json()["items"]
    assert len(everything) == 200 - 5
    assert not {item["item_id"] for item in everything} & served.engine.seen_items("u3")


def test_explanations_can_be_left_out(served: Served) -> None:
    items = served.client.get("/recommendations/u3", params={"k": 3, "explain": "false"}).json()["items"]
    assert [item["explanation"] for item in items] == [None, None, None]


def test_unknown_user_is_a_clear_404(served: Served) -> None:
    response = served.client.get("/recommendations/nobody")
    assert response.status_code == 404
    assert "unknown user 'nobody'" in response.json()["detail"]
    assert "profile or history" in response.json()["detail"]
    response = served.client.post("/recommendations", json={"user_id": "nobody"})
    assert response.status_code == 404


@pytest.mark.parametrize("k", ["0", "1001", "-3", "ten"])
def test_k_out_of_bounds_is_422_with_reason(served: Served, k: str) -> None:
    response = served.client.get("/recommendations/u1", params={"k": k})
    assert response.status_code == 422
    assert response.json()["reason"].startswith("query.k: ")


def test_k_bounds_are_inclusive(served: Served) -> None:
    assert len(served.client.get("/recommendations/u1", params={"k": 1}).json()["items"]) == 1
    assert served.client.get("/recommendations/u1", params={"k": 1000}).status_code == 200


def test_cold_user_with_profile_and_history(served: Served) -> None:
    body = {"profile": {"gender": "F", "age": 31, "occupation": "writer"}, "k": 5}
    response = served.client.post("/recommendations", json=body)
    assert response.status_code == 200
    assert response.json()["user_id"] is None
    expected = served.engine.recommend(None, 5, profile={"gender": "F", "age": "31", "occupation": "writer"})
    assert response.json()["items"] == expected
    history = ["i1", "i2", "i3"]
    items = served.client.post("/recommendations", json={"history": history, "k": 200}).json()["items"]
    assert len(items) == 197
    assert not {item["item_id"] for item in items} & set(history)
    # An unknown user with a profile is a cold user, not a 404.
    response = served.client.post(
        "/recommendations", json={"user_id": "new-user", "profile": {"gender": "M"}}
    )
    assert response.status_code == 200
    assert response.json()["user_id"] == "new-user"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({}, "give at least one of user_id, profile or history"),
        ({"history": ["i1"], "k": 0}, "body.k"),
        ({"history": ["i1"], "k": 1001}, "body.k"),
        ({"histroy": ["i1"]}, "body.histroy: Extra inputs are not permitted"),
        ({"history": ["i1"] * 1001}, "body.history"),
        ({"profile": {"gender": ["F"]}}, "body.profile.gender"),
    ],
)
def test_cold_request_validation(served: Served, body: dict[str, object], reason: str) -> None:
    response = served.client.post("/recommendations", json=body)
    assert response.status_code == 422
    assert reason in response.json()["reason"]


def test_unknown_history_items_are_422(served: Served) -> None:
    response = served.client.post("/recommendations", json={"history": ["i1", "no-such-item"]})
    assert response.status_code == 422
    assert "no-such-item" in response.json()["detail"]


def test_invalid_json_is_422(served: Served) -> None:
    response = served.client.post(
        "/recommendations", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert "JSON decode error" in response.json()["reason"]


def test_oversized_bodies_are_413(served: Served) -> None:
    big = {"history": ["i1"] * 20_000}
    response = served.client.post("/recommendations", json=big)
    assert response.status_code == 413
    # Without a Content-Length (chunked) the limit is enforced while reading.
    chunks = (b" " * 8192 for _ in range(20))
    response = served.client.post(
        "/feedback", content=chunks, headers={**WRITE, "content-type": "application/json"}
    )
    assert response.status_code == 413
    assert served.client.get("/health").status_code == 200


def test_feedback_is_idempotent(served: Served) -> None:
    batch = events("idem", 30)
    before = served.store.count()
    first = served.client.post("/feedback", json={"events": batch}, headers=WRITE)
    assert first.status_code == 200
    assert first.json() == {"inserted": 30, "duplicates": 0}
    # A retried batch, and a batch mixing old and new events, store each event once.
    assert served.client.post("/feedback", json={"events": batch}, headers=WRITE).json() == {
        "inserted": 0,
        "duplicates": 30,
    }
    mixed = batch[:10] + events("idem-more", 5)
    assert served.client.post("/feedback", json={"events": mixed}, headers=WRITE).json() == {
        "inserted": 5,
        "duplicates": 10,
    }
    # The same id twice in one batch also counts once.
    twice = events("idem-twice", 1) * 2
    assert served.client.post("/feedback", json={"events": twice}, headers=WRITE).json() == {
        "inserted": 1,
        "duplicates": 1,
    }
    assert served.store.count() == before + 36


def test_feedback_records_the_impressions_model_version(served: Served) -> None:
    before = served.store.read_since(0, limit=1_000_000)
    last = before[-1].seq if before else 0
    event = {
        "event_id": "imp-version",
        "type": "impression",
        "user_id": "u1",
        "item_id": "i5",
        "model_version": "v7",
        "request_id": "r1",
        "position": 3,
        "ts": "2026-01-02T03:04:05+00:00",
    }
    assert served.client.post("/feedback", json={"events": [event]}, headers=WRITE).status_code == 200
    (record,) = served.store.read_since(last)
    assert record.event.model_version == "v7"
    assert record.event.position == 3
    assert record.event.request_id == "r1"
    assert record.event.ts == 1767323045.0
    assert record.received_at > record.event.ts


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"type": "rating", "value": None}, "a rating event needs a value"),
        ({"type": "click", "value": 3.0}, "value is only for rating events, not click"),
        ({"type": "impression", "value": None}, "an impression needs the model_version"),
        ({"type": "like"}, "body.events.0.type"),
        ({"event_id": ""}, "body.events.0.event_id"),
        ({"ts": "2026-01-02T03:04:05"}, "body.events.0.ts"),
        ({"position": 0}, "body.events.0.position"),
        ({"extra": 1}, "body.events.0.extra"),
    ],
)
def test_feedback_validation(served: Served, change: dict[str, object], reason: str) -> None:
    event = {"event_id": "bad", "type": "rating", "user_id": "u1", "item_id": "i1", "value": 4.0, **change}
    response = served.client.post("/feedback", json={"events": [event]}, headers=WRITE)
    assert response.status_code == 422, response.text
    assert reason in response.json()["reason"]


def test_feedback_batch_bounds_and_unknown_items(served: Served) -> None:
    assert served.client.post("/feedback", json={"events": []}, headers=WRITE).status_code == 422
    big = {"events": events("too-many", 1001)}
    response = httpx.post(
        f"{served.client.base_url}/feedback", json=big, headers=WRITE, timeout=10
    )  # over 64 KiB too, so either limit may answer; both refuse
    assert response.status_code in (413, 422)
    bad = events("unknown-item", 3)
    bad[1]["item_id"] = "no-such-item"
    before = served.store.count()
    response = served.client.post("/feedback", json={"events": bad}, headers=WRITE)
    assert response.status_code == 422
    assert "events[1].item_id='no-such-item'" in response.json()["detail"]
    assert served.store.count() == before  # all or nothing


def test_metrics(served: Served) -> None:
    served.client.get("/recommendations/u1")
    served.client.get("/recommendations/nobody")
    served.client.post("/feedback", json={"events": events("metrics", 2)}, headers=WRITE)
    text = served.client.get("/metrics").text
    assert 'metarec_http_requests_total{method="GET",route="/recommendations/{user_id}",status="200"}' in text
    assert 'metarec_http_requests_total{method="GET",route="/recommendations/{user_id}",status="404"}' in text
    assert (
        'metarec_http_request_duration_seconds_bucket{le="0.01",method="GET",route="/recommendations/' in text
    )
    assert 'metarec_model_info{version="v1"} 1.0' in text
    assert 'metarec_feedback_events_total{result="inserted"}' in text
    assert "nobody" not in text  # route templates, never raw paths
    served.client.get("/no/such/route")
    assert 'route="<unmatched>",status="404"' in served.client.get("/metrics").text


class _DatedEngine(TableEngine):
    """An engine that knows when its version was registered, as the registry's engines do."""

    created_at = 1_700_000_000.0


class _FlakyStore(SQLiteFeedbackStore):
    """A store whose writes raise ``error`` while it is set."""

    error: Exception | None = None

    def write(self, events: Sequence[FeedbackEvent]) -> tuple[int, int]:
        if self.error is not None:
            raise self.error
        return super().write(events)


def _sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"{name}{labels} not in /metrics")


def test_alert_metrics(tmp_path: Path) -> None:
    # The metrics behind deploy/prometheus/alerts.yml: loaded flag, model age, failed feedback writes.
    holder = ModelHolder(FileVersionSource(tmp_path / "no-champion"), poll_seconds=0.05)
    store = _FlakyStore(tmp_path / "feedback.db")
    app = create_app(holder, store, auth=ApiKeyAuth(API_KEY), manage=False)
    failures = "metarec_feedback_write_failures_total"
    with thread_server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        text = client.get("/metrics").text
        assert _sample(text, "metarec_model_loaded") == 0.0
        assert _sample(text, "metarec_model_created_timestamp_seconds") == 0.0
        # Both reasons are exported at 0 before the first failure, so rate() sees the first one.
        assert _sample(text, failures, reason="unavailable") == _sample(text, failures, reason="error") == 0.0

        holder.set_engine(TableEngine("v1"))  # an engine that does not say when it was registered
        text = client.get("/metrics").text
        assert _sample(text, "metarec_model_loaded") == 1.0
        assert _sample(text, "metarec_model_created_timestamp_seconds") == 0.0
        holder.set_engine(_DatedEngine("v2"))
        text = client.get("/metrics").text
        assert _sample(text, "metarec_model_created_timestamp_seconds") == 1_700_000_000.0
        assert _sample(text, "metarec_model_info", version="v2") == 1.0

        batch = {"events": events("alert", 2)}
        store.error = StoreUnavailableError("database is locked")
        assert client.post("/feedback", json=batch, headers=WRITE).status_code == 503
        store.error = RuntimeError("disk I/O error")
        for _ in range(2):
            # A fresh connection each: uvicorn closes the connection after an unhandled exception.
            assert httpx.post(f"{url}/feedback", json=batch, headers=WRITE, timeout=10).status_code == 500
        store.error = None
        assert client.post("/feedback", json=batch, headers=WRITE).json() == {"inserted": 2, "duplicates": 0}
        text = client.get("/metrics").text
        assert _sample(text, failures, reason="unavailable") == 1.0
        assert _sample(text, failures, reason="error") == 2.0
        assert _sample(text, "metarec_feedback_events_total", result="inserted") == 2.0
    store.close()
