"""Serving settings: one pydantic model, passed to worker processes as JSON in the environment."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

#: Environment variable carrying ``ServeSettings`` as JSON to uvicorn worker processes.
SETTINGS_ENV = "METAREC_SERVE_SETTINGS"


class ServeSettings(BaseModel):
    """How ``metarec serve`` runs: what it loads, where it listens, where feedback goes, who may write."""

    # A typo in a setting must fail loudly instead of silently using a default.
    model_config = ConfigDict(extra="forbid")

    # Registered model served: models:/<model_name>@<alias>.
    model_name: str = "metarec"
    alias: str = "champion"
    # MLflow tracking/registry URI for the engine source; None means the workspace default.
    tracking_uri: str | None = None
    # "module:callable" called with these settings to build the EngineSource (the registry source).
    source: str | None = None
    # Loopback by default: exposing the server is a decision, not an accident.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    # ONNX Runtime intra-op threads per worker: one keeps a request's latency predictable while
    # other requests run; scale with workers, not threads.
    threads: int = Field(default=1, ge=1)
    # sqlite:///relative.db or sqlite:////absolute.db; postgresql:// is the multi-host plan (not yet).
    feedback_url: str = "sqlite:///feedback/feedback.db"
    # How often the alias is checked, and how long a version that failed to load is left alone.
    poll_seconds: float = Field(default=5.0, gt=0)
    retry_seconds: float = Field(default=60.0, ge=0)
    require_key_for_reads: bool = False
    # Accept feedback without a key when none is configured; for local demos only.
    allow_anonymous_writes: bool = False
    # Larger request bodies are refused with 413 before they are read.
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    log_level: str = "info"
    # One log line per request costs latency at hundreds of requests per second; /metrics counts them.
    access_log: bool = False

    @classmethod
    def from_env(cls) -> ServeSettings:
        """Settings from ``METAREC_SERVE_SETTINGS`` (JSON), or the defaults when it is unset."""
        raw = os.environ.get(SETTINGS_ENV)
        return cls.model_validate_json(raw) if raw else cls()
