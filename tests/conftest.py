"""Shared fixtures: offline/quiet environment, the tiny dataset, a throwaway Prefect server, a PostgreSQL
server (started only for the tests that ask for it), free ports and one CLI-trained workspace shared by the
UI and CLI tests."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from components.core.services import PostgresServer

TESTS_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = TESTS_DIR.parent
TINY_DIR = TESTS_DIR / "fixtures" / "tiny"
METAREC = Path(sys.executable).parent / "metarec"

QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}

# The tiny dataset has 6 users x 5 interactions over 8 items. The default split (0.8/0.1) gives no
# user a validation interaction, and the default cut-offs (10, 20) exceed the 8 items, which ranking
# refuses; these overrides make it a valid, fast pipeline input.
TINY_OVERRIDES = [
    f"data.path={TINY_DIR}",
    "data.name=tiny",
    "split.train_ratio=0.6",
    "split.valid_ratio=0.2",
    "eval.ks=[2,5]",
    "eval.primary=ndcg@5",
    # Real MiniLM on 6 users: a few LoRA steps on small batches keep the encode stage to seconds.
    "text.finetune.steps=3",
    "text.finetune.batch_size=4",
    "text.finetune.checkpoint_every=2",
    "text.finetune.warmup_steps=1",
]


# The popularity model reads no text: fine-tuning the encoder for it would only cost time (~15 s a run).
POP_OVERRIDES = ["model.name=pop", "text.finetune.enabled=false"]


_SESSION_HOME: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Quiet offline environment and one Prefect server for the session, started as a new user's is.

    The session gets a fresh ``PREFECT_HOME`` (a developer's own server and database stay untouched),
    so every run starts and migrates a new server through ``metarec``'s own code path: the first-run
    failure a warm ``~/.prefect`` once hid cannot hide again. ``PREFECT_API_URL`` then reaches every
    in-process flow and every ``metarec`` subprocess.
    """
    global _SESSION_HOME
    os.environ.update(QUIET_ENV)
    if config.option.collectonly or os.environ.get("METAREC_TEST_PREFECT_API_URL"):
        os.environ["PREFECT_API_URL"] = os.environ.get("METAREC_TEST_PREFECT_API_URL", "")
        return
    from components.core.orchestration import ensure_api

    _SESSION_HOME = Path(tempfile.mkdtemp(prefix="metarec-test-prefect-"))
    os.environ["PREFECT_HOME"] = str(_SESSION_HOME)
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.pop("PREFECT_PROFILE", None)
    ensure_api(progress=lambda line: print(line, file=sys.stderr))


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_HOME is not None:
        from components.core.orchestration import stop

        if "prefect.logging.handlers" in sys.modules:
            # Ship the last flow logs while the server still listens, not into a closed port at exit.
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)

        stop(_SESSION_HOME)
        shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The committed tiny RecBole dataset (dataset name ``tiny``)."""
    return TINY_DIR


@pytest.fixture(scope="session")
def tiny_overrides() -> list[str]:
    """``-S`` overrides that run the pipeline on the tiny dataset (model not chosen)."""
    return list(TINY_OVERRIDES)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Flows in this process report to the session's Prefect server (see ``pytest_configure``)."""
    from prefect.logging.configuration import ensure_logging_setup

    # Configure Prefect's logging now, against pytest's streams. Left to the first `import prefect.main`,
    # which may happen inside a CliRunner.invoke (the CLI imports the flow lazily), its console handler
    # would keep the runner's stderr, closed once the invoke returns, and every later flow would fail.
    ensure_logging_setup()
    assert os.environ.get("PREFECT_API_URL"), "pytest_configure sets the session's Prefect API"
    yield


@pytest.fixture(scope="session")
def postgres_bin() -> Path:
    """The PostgreSQL server binaries' directory; without PostgreSQL the test is skipped, or fails under CI.

    CI (``CI`` set) must test the PostgreSQL paths: there a missing server is a failure, and the fix is
    ``apt-get install postgresql`` (Debian's package).
    """
    from components.core import services

    try:
        return services.find_postgres()[0]
    except services.PostgresNotInstalledError as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs PostgreSQL: {err}")
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def postgres_server(postgres_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session, started on first use and stopped (and deleted) at its end.

    Started with ``components.core.services`` as ``postgres up`` starts one, password checks included:
    its password reaches libpq clients (this process, server subprocesses) through ``PGPASSFILE``, set
    for the session.
    """
    from components.core import services

    home = tmp_path_factory.mktemp("postgres")
    # fsync off: the cluster is deleted at the end, and the many small databases are quicker to create.
    # Commits still go through the same code path; only the server's own flush to disk is skipped.
    server, _ = services.start_postgres(home, fsync=False, progress=lambda line: print(line, file=sys.stderr))
    saved = os.environ.get("PGPASSFILE")
    os.environ.update(server.env())
    try:
        yield server
    finally:
        if saved is None:
            os.environ.pop("PGPASSFILE", None)
        else:
            os.environ["PGPASSFILE"] = saved
        services.stop_postgres(home, remove=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """URL of the session's PostgreSQL server, its ``postgres`` database (password: in ``PGPASSFILE``)."""
    return postgres_server.url()


@pytest.fixture
def postgres_db_url(postgres_server: PostgresServer) -> str:
    """URL of a new, empty database on the session's PostgreSQL server, for this test alone."""
    from components.core.services import create_database

    return create_database(postgres_server, f"test_{uuid.uuid4().hex[:16]}", exist_ok=False)


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def subprocess_env(tmp: Path) -> dict[str, str]:
    """Environment for a ``metarec`` subprocess: quiet, offline, reporting to the session's Prefect server."""
    env = {**os.environ, **QUIET_ENV, "NO_COLOR": "1", "COLUMNS": "200"}
    env.pop("METAREC_WORKSPACE", None)
    return env


@dataclass
class TrainedWorkspace:
    """A workspace trained by ``metarec run`` (subprocess), with what the command printed."""

    path: Path
    returncode: int
    stdout: str
    stderr: str

    @property
    def run_id(self) -> str:
        found = re.search(r"MLflow run id:\s*([0-9a-f]{32})", self.stdout)
        assert found, f"no run id in stdout:\n{self.stdout}"
        return found.group(1)

    def check(self) -> None:
        assert self.returncode == 0, (
            f"metarec run failed ({self.returncode}):\n{self.stdout}\n{self.stderr[-4000:]}"
        )


@pytest.fixture(scope="session")
def trained_workspace(tmp_path_factory: pytest.TempPathFactory) -> TrainedWorkspace:
    """One ``metarec run`` of the pop model on the tiny dataset, end to end through the CLI."""
    tmp = tmp_path_factory.mktemp("trained")
    ws = tmp / "ws"
    cmd = [str(METAREC), "run", "-w", str(ws)]
    for override in [*TINY_OVERRIDES, *POP_OVERRIDES]:
        cmd += ["-S", override]
    proc = subprocess.run(cmd, cwd=tmp, env=subprocess_env(tmp), capture_output=True, text=True, timeout=600)
    return TrainedWorkspace(ws, proc.returncode, proc.stdout, proc.stderr)


# The fusion model on the tiny dataset, registered and gated: its cut-offs are @2/@5, so the gate reads
# those; a quarter of the 8 items go cold so the cold-item protocol has users to rank for.
METAREC_OVERRIDES = [
    *TINY_OVERRIDES,
    "model.name=metarec",
    "eval.cold_fraction=0.25",
    "registry.primary=warm.ndcg@5",
    "registry.cold_metric=cold.recall@5",
    "serve.poll_seconds=0.5",
]


@pytest.fixture(scope="session")
def metarec_workspace(tmp_path_factory: pytest.TempPathFactory) -> TrainedWorkspace:
    """One ``metarec run`` of the fusion model on the tiny dataset: trained, exported, registered."""
    tmp = tmp_path_factory.mktemp("metarec")
    ws = tmp / "ws"
    cmd = [str(METAREC), "run", "-w", str(ws)]
    for override in METAREC_OVERRIDES:
        cmd += ["-S", override]
    proc = subprocess.run(cmd, cwd=tmp, env=subprocess_env(tmp), capture_output=True, text=True, timeout=900)
    return TrainedWorkspace(ws, proc.returncode, proc.stdout, proc.stderr)
