"""The registry's cross-host promotion lock: a PostgreSQL session advisory lock around every alias move.

Two hosts are simulated by two Python processes whose workspaces (and so whose lock files) differ but
which share one MLflow registry and one lock database: only the advisory lock can keep them apart. The
PostgreSQL tests are skipped where PostgreSQL is not installed, and fail under CI (``CI`` set).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from components.bundle.format import write_manifest
from components.core.config import (
    REGISTRY_LOCK_URL_ENV,
    Config,
    ConfigError,
    RegistryConfig,
    TrackingConfig,
    build_config,
)
from registry.store import (
    AUDIT_PREFIX,
    CHAMPION,
    LAST_MOVE,
    LoggedBundle,
    Registry,
    RegistryError,
    champion_history,
    lock_key,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Named bundles: A the first champion, B better, C best (so C must end champion, whoever goes first).
BUNDLES = {"A": 0.30, "B": 0.32, "C": 0.35}

# One "host": its own workspace (own lock file), the shared registry, the lock URL from params or env.
HOST = """
import json, sys, time
from pathlib import Path
from components.core.config import Config, RegistryConfig, TrackingConfig
from registry.store import Registry

ws, uri, name, version, barrier, lock_url = sys.argv[1:]
cfg = Config(tracking=TrackingConfig(uri=uri), registry=RegistryConfig(name=name, lock_url=lock_url or None))
reg = Registry(Path(ws), cfg)
reg.aliases()  # imports and connections done before the start line
Path(barrier, "ready-" + version).touch()
while not Path(barrier, "go").exists():
    time.sleep(0.005)
move = reg.promote(version, reason="host race")
print(json.dumps({"moved": move.moved, "version": move.version, "previous": move.previous}))
"""


def make_bundle(directory: Path, ndcg: float) -> Path:
    """A small bundle whose metrics pass the gate's floors, ``ndcg`` its primary metric."""
    directory.mkdir(parents=True)
    (directory / "scorer.onnx").write_bytes(os.urandom(128))
    write_manifest(
        directory,
        metrics={
            "warm": {"ndcg@10": ndcg, "recall@10": ndcg * 1.5},
            "cold": {"recall@20": 0.3},
            "parity": {"max_abs_diff": 1e-5, "int8_mean_cosine": 0.999, "ndcg_rel_diff": 0.001},
            "latency": {"scorer_p99_ms": 10.0},
        },
        config={"seed": 42},
        data_version={"data/split": "s1"},
        git_commit="0123abcd",
        model_card=f"# metarec bundle\n\nwarm ndcg@10 {ndcg}",
    )
    return directory


class Shared:
    """One sqlite MLflow registry (the shared store) and the bundles logged into it."""

    def __init__(self, ws: Path, logged: dict[str, LoggedBundle]) -> None:
        self.ws = ws
        self.logged = logged
        self.uri = Registry(ws).uri

    def registry(self, name: str, ws: Path | None = None, **registry: Any) -> Registry:
        """A registry on the shared store, for model ``name``, from workspace ``ws`` (its lock file)."""
        cfg = Config(tracking=TrackingConfig(uri=self.uri), registry=RegistryConfig(name=name, **registry))
        return Registry(ws or self.ws, cfg)

    def add(self, reg: Registry) -> dict[str, str]:
        """Register every bundle in order; return key -> version."""
        return {key: str(reg.add_version(self.logged[key]).version) for key in BUNDLES}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    from mlflow.tracking._tracking_service import utils as tracking_utils

    # Logging points MLflow's process-wide tracking URI at this store: put it back afterwards.
    previous = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    root = tmp_path_factory.mktemp("registry-lock")
    ws = root / "shared"
    reg = Registry(ws)
    logged = {key: reg.log_bundle(make_bundle(root / "bundles" / key, ndcg)) for key, ndcg in BUNDLES.items()}
    yield Shared(ws, logged)
    tracking_utils._tracking_uri = previous[0]
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if previous[1] is not None:
        os.environ["MLFLOW_TRACKING_URI"] = previous[1]


def _connect(url: str) -> Any:
    import psycopg

    return psycopg.connect(url, autocommit=True)


def _try_lock(conn: Any, key: int) -> bool:
    return bool(conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0])


def _check_audit(reg: Registry) -> list[dict[str, Any]]:
    """The audit trail is one sequence without gaps or duplicates, ending at the champion."""
    events = reg.audit()
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), events
    tag_keys = [k for mv in reg.versions() for k in (mv.tags or {}) if k.startswith(AUDIT_PREFIX)]
    assert len(tag_keys) == len(set(tag_keys)) == len(events)
    assert champion_history(events)[-1] == reg.aliases()[CHAMPION]
    assert json.loads(reg.model().tags[LAST_MOVE])["seq"] == events[-1]["seq"]
    return events


def test_two_hosts_promoting_at_once_leave_one_champion(
    shared: Shared, postgres_url: str, tmp_path: Path
) -> None:
    reg = shared.registry("hosts", lock_url=postgres_url)
    v = shared.add(reg)
    assert reg.promote(v["A"]).moved
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {
        k: val for k, val in os.environ.items() if k not in ("METAREC_TRACKING_URI", REGISTRY_LOCK_URL_ENV)
    }
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    hosts = {
        # Host 1 reads the lock URL from its params, host 2 from the environment (as a secret would be).
        "B": (str(tmp_path / "host1"), postgres_url, env),
        "C": (str(tmp_path / "host2"), "", {**env, REGISTRY_LOCK_URL_ENV: postgres_url}),
    }
    procs = {
        key: subprocess.Popen(
            [sys.executable, "-c", HOST, ws, shared.uri, "hosts", v[key], str(barrier), lock_url],
            cwd=PROJECT_ROOT,
            env=host_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for key, (ws, lock_url, host_env) in hosts.items()
    }
    deadline = time.monotonic() + 120
    while len(list(barrier.glob("ready-*"))) < len(procs):
        assert all(p.poll() is None for p in procs.values()), {k: p.communicate() for k, p in procs.items()}
        assert time.monotonic() < deadline, "the host processes never got ready"
        time.sleep(0.05)
    (barrier / "go").touch()
    outputs = {key: p.communicate(timeout=120) for key, p in procs.items()}
    for key, p in procs.items():
        assert p.returncode == 0, outputs[key][1][-3000:]
    moves = {key: json.loads(out.strip().splitlines()[-1]) for key, (out, _) in outputs.items()}
    # C always moves (it beats A and B); B moves only if it went first, and then C replaced it.
    assert moves["C"]["moved"], moves
    assert moves["C"]["previous"] == (v["B"] if moves["B"]["moved"] else v["A"]), moves
    assert reg.aliases()[CHAMPION] == v["C"]
    events = _check_audit(reg)
    promoted = [e["version"] for e in events if e["action"] == "promote"]
    assert promoted == ([v["A"], v["B"], v["C"]] if moves["B"]["moved"] else [v["A"], v["C"]])
    # Neither host's lock file was the other's: the advisory lock alone kept them apart.
    assert (tmp_path / "host1" / "registry.lock").exists() and (tmp_path / "host2" / "registry.lock").exists()


def test_promotion_holds_the_advisory_lock_and_waits_for_it(
    shared: Shared, postgres_url: str, tmp_path: Path
) -> None:
    reg = shared.registry("held", lock_url=postgres_url)
    v = shared.add(reg)
    key = lock_key("held", shared.uri)
    assert key != lock_key("other", shared.uri) and key != lock_key("held", shared.uri + "x")

    # Another host holds the lock: the promotion waits lock_timeout, then fails clearly, changing nothing.
    impatient = shared.registry("held", ws=tmp_path / "other-host", lock_url=postgres_url, lock_timeout=0.5)
    before = reg.aliases(), reg.audit()
    with _connect(postgres_url) as other:
        assert _try_lock(other, key)
        started = time.monotonic()
        with pytest.raises(RegistryError, match="holds the promotion lock of 'held'") as err:
            impatient.promote(v["A"])
        assert time.monotonic() - started >= 0.45
        assert postgres_url.rsplit("@", 1)[-1] in str(err.value)
        with pytest.raises(RegistryError, match="holds the promotion lock"):
            impatient.rollback()
        assert (reg.aliases(), reg.audit()) == before
        other.execute("SELECT pg_advisory_unlock(%s)", (key,))

    # While a promotion runs, no other connection can take the lock; afterwards it is free again.
    seen: list[bool] = []
    verify = reg.verify

    def verify_while_locked(ref: str | int) -> dict[str, Any]:
        with _connect(postgres_url) as probe:
            seen.append(_try_lock(probe, key))
        return verify(ref)

    reg.verify = verify_while_locked  # type: ignore[method-assign]
    assert reg.promote(v["A"]).moved
    assert seen == [False]
    with _connect(postgres_url) as probe:
        assert _try_lock(probe, key)
    assert impatient.promote(v["B"]).moved  # the lock was released with the probe's connection
    _check_audit(reg)


def test_unreachable_or_wrong_lock_database_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, free_port: int, tmp_path: Path
) -> None:
    url = f"postgresql://metarec:s3cret@127.0.0.1:{free_port}/registry"
    monkeypatch.setenv(REGISTRY_LOCK_URL_ENV, url)
    reg = Registry(tmp_path / "ws", Config(registry=RegistryConfig(name="nowhere")))
    with pytest.raises(RegistryError) as err:
        reg.promote("1")
    message = str(err.value)
    assert (
        f"cannot connect to the registry lock database postgresql://metarec:***@127.0.0.1:{free_port}"
        in message
    )
    assert "s3cret" not in message and REGISTRY_LOCK_URL_ENV in message

    monkeypatch.setenv(REGISTRY_LOCK_URL_ENV, "mysql://db/registry")
    with pytest.raises(RegistryError, match="is not a postgresql:// URL"):
        Registry(tmp_path / "ws", Config(registry=RegistryConfig(name="nowhere"))).rollback()

    monkeypatch.delenv(REGISTRY_LOCK_URL_ENV)
    secret = tmp_path / "lock-url"
    secret.write_text("", encoding="utf-8")
    monkeypatch.setenv(f"{REGISTRY_LOCK_URL_ENV}_FILE", str(secret))
    with pytest.raises(RegistryError, match="is empty"):
        Registry(tmp_path / "ws", Config(registry=RegistryConfig(name="nowhere"))).rollback()


def test_lock_url_with_a_password_is_refused_in_params() -> None:
    with pytest.raises(ConfigError, match=f"registry.lock_url holds a password.*{REGISTRY_LOCK_URL_ENV}"):
        build_config({"registry": {"lock_url": "postgresql://metarec:s3cret@db/registry"}})
    assert build_config({"registry": {"lock_url": "postgresql://metarec@db/registry"}}).registry.lock_url
