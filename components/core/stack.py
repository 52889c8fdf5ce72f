"""The production stack on one machine, without Docker: PostgreSQL, MLflow, a Prefect server and a worker.

``stack_up`` starts, in order and each health-checked before the next one that depends on it:

1. **PostgreSQL** (``components.core.services``) with the databases ``mlflow``, ``prefect`` and ``feedback``;
2. an **MLflow tracking server** (``mlflow server``) on the ``mlflow`` database, proxying artifacts into
   ``<home>/mlflow/artifacts`` (``--serve-artifacts``); health: ``GET /health``;
3. a **Prefect server** (``prefect server start``) on the ``prefect`` database, with its own
   ``PREFECT_HOME`` (``<home>/prefect``); health: ``GET /api/health``. MLflow and Prefect do not depend on
   each other, so they start side by side and are waited for one after the other;
4. one **Prefect worker** for the process work pool ``metarec`` (the worker creates the pool when it is
   missing); health: the server lists the pool, of type ``process``, with this worker online.

Everything lives under the stack home (default ``$METAREC_SERVICES_HOME``, else ``~/.metarec/services``):
``stack.json`` (pids, ports, logs), ``logs/<service>.log``, ``postgres/`` (see ``services``), ``mlflow/``,
``prefect/``. Processes are detached (their own session): they outlive the command that started them and
stop with ``stack_down``, which stops them in reverse order. ``stack_up`` is idempotent: what runs and
answers is reused; a service whose dependency was restarted is restarted too.

Credentials: the PostgreSQL password stays in its 0600 files; the servers read it through ``PGPASSFILE``
(libpq for MLflow's psycopg, asyncpg for Prefect), so no command line (readable by anyone through ``ps``)
and no URL this module returns or prints holds it. This module imports nothing of the project's outside
``components.core``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from components.core import processes, services
from components.core.services import ServiceError

STATE_FILE = "stack.json"
#: The process work pool the worker serves (deployments target it).
POOL = "metarec"
#: The databases ``stack_up`` creates: MLflow's store, Prefect's, and the serving feedback store.
DATABASES = ("mlflow", "prefect", "feedback")
HOST = services.HOST
#: Seconds to wait for each service: a first Prefect start migrates its database (a minute on busy cores).
DEFAULT_TIMEOUT = 240.0
#: Overrides the default timeout (seconds).
TIMEOUT_ENV = "METAREC_STACK_TIMEOUT"
_ORDER = ("mlflow", "prefect", "worker")  # started in this order (after PostgreSQL), stopped in reverse
# Settings of the caller's own services that must not leak into the stack's processes.
_DROP_ENV = (
    *services.PG_ENV,
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "PREFECT_API_URL",
    "PREFECT_API_KEY",
    "PREFECT_PROFILE",
    "PREFECT_HOME",
    "PREFECT_SERVER_DATABASE_CONNECTION_URL",
    "PREFECT_API_DATABASE_CONNECTION_URL",
)


@dataclass
class Proc:
    """One detached process of the stack: what ``stack.json`` records about it."""

    pid: int
    log: str
    started: float
    port: int | None = None
    #: The worker's name, as the Prefect server lists it.
    name: str | None = None


@dataclass
class Stack:
    """The content of ``stack.json``."""

    home: str
    postgres_home: str
    postgres_port: int = 0
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def mlflow_url(self) -> str:
        proc = self.procs.get("mlflow")
        return f"http://{HOST}:{proc.port}" if proc else ""

    @property
    def prefect_api_url(self) -> str:
        proc = self.procs.get("prefect")
        return f"http://{HOST}:{proc.port}/api" if proc else ""


def default_home() -> Path:
    """``$METAREC_SERVICES_HOME``, else ``~/.metarec/services`` (PostgreSQL's home is ``<it>/postgres``)."""
    return services.default_home().parent


def _home(home: Path | None) -> Path:
    return (Path(home).expanduser() if home is not None else default_home()).resolve()


def read_state(home: Path | None = None) -> Stack | None:
    """The stack recorded in ``home``, running or not; None when none is recorded."""
    path = _home(home) / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        procs = {name: Proc(**value) for name, value in (data.pop("procs", None) or {}).items()}
        return Stack(**data, procs=procs)
    except (OSError, ValueError, TypeError):
        return None


def _write_state(stack: Stack) -> None:
    path = Path(stack.home) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(stack), indent=2), encoding="utf-8")
    tmp.replace(path)


@contextlib.contextmanager
def _lock(home: Path, timeout: float) -> Iterator[None]:
    from filelock import FileLock, Timeout

    try:
        # Held while starting/stopping: two `up` commands start one stack, not two.
        with FileLock(str(home / "stack.lock")).acquire(timeout=timeout):
            yield
    except Timeout:
        raise ServiceError(f"another command holds {home / 'stack.lock'}; try again") from None


# ---- health -------------------------------------------------------------------------------------------


def _http(url: str, data: dict[str, Any] | None = None, timeout: float = 3.0) -> Any:
    """The JSON (or text) ``url`` answers with 200, or None when it does not answer so."""
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            if answer.status != 200:
                return None
            text = answer.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def mlflow_healthy(url: str) -> bool:
    """Whether the MLflow server at ``url`` answers ``/health``."""
    return _http(f"{url}/health") is not None


def prefect_healthy(api_url: str) -> bool:
    """Whether the Prefect API at ``api_url`` answers ``/health``."""
    return _http(f"{api_url}/health") is not None


def pool_workers(api_url: str, pool: str = POOL) -> list[dict[str, Any]] | None:
    """The workers the Prefect server lists for process pool ``pool``; None when there is no such pool."""
    found = _http(f"{api_url}/work_pools/{pool}")
    if not isinstance(found, dict) or found.get("type") != "process":
        return None
    workers = _http(f"{api_url}/work_pools/{pool}/workers/filter", data={})
    return workers if isinstance(workers, list) else []


def _worker_online(api_url: str, name: str | None) -> bool:
    workers = pool_workers(api_url) or []
    return any(w.get("name") == name and w.get("status", "ONLINE") == "ONLINE" for w in workers)


def _healthy(stack: Stack, name: str) -> bool:
    proc = stack.procs.get(name)
    if proc is None or not processes.alive(proc.pid):
        return False
    if name == "mlflow":
        return mlflow_healthy(stack.mlflow_url)
    if name == "prefect":
        return prefect_healthy(stack.prefect_api_url)
    return bool(stack.prefect_api_url) and _worker_online(stack.prefect_api_url, proc.name)


# ---- processes ----------------------------------------------------------------------------------------


def _port(preferred: int | None) -> int:
    """``preferred`` when it is free (stable URLs across restarts), else any free loopback port."""
    port = processes.free_port(HOST, preferred or 0)
    if port is None:
        raise ServiceError(f"no free TCP port on {HOST}")
    return port


def _base_env(pg: services.PostgresServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    env.update(pg.env())  # PGPASSFILE: the password reaches libpq and asyncpg without a command line
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return env


def _spawn(
    home: Path, name: str, cmd: list[str], env: dict[str, str], cwd: Path, port: int | None
) -> tuple[subprocess.Popen[bytes], Proc]:
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    log_file = logs / f"{name}.log"
    with open(log_file, "ab") as handle:
        handle.write(f"\n--- metarec: {' '.join(cmd)} at {time.ctime()}\n".encode())
        handle.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command; its own process group to stop
        )
    return proc, Proc(pid=proc.pid, log=str(log_file), started=time.time(), port=port)


def _wait(stack: Stack, name: str, popen: subprocess.Popen[bytes], deadline: float, what: str) -> None:
    proc = stack.procs[name]
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise ServiceError(
                f"{what} exited with code {popen.returncode} while starting; its log {proc.log} ends "
                f"with:\n{processes.log_tail(Path(proc.log))}"
            )
        if _healthy(stack, name):
            return
        time.sleep(0.5)
    processes.terminate_group(proc.pid)
    raise ServiceError(
        f"{what} did not become healthy in time (log {proc.log}); its log ends with:\n"
        f"{processes.log_tail(Path(proc.log))}\nRetry with a longer {TIMEOUT_ENV} (seconds)"
    )


def _pg_url(pg: services.PostgresServer, database: str, driver: str) -> str:
    return pg.url(database).replace("postgresql://", f"postgresql+{driver}://", 1)


def stack_up(
    home: Path | None = None,
    *,
    timeout: float | None = None,
    fsync: bool = True,
    workdir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Stack, list[str]]:
    """Start the stack of ``home`` (what runs and answers is reused); return it and the services started.

    Args:
        home: The stack home (default ``default_home()``); created when missing.
        timeout: Seconds to wait for each service (default ``$METAREC_STACK_TIMEOUT`` or 240).
        fsync: False starts a new PostgreSQL cluster without crash safety (throwaway test stacks only).
        workdir: The worker's working directory, where its flow runs start (default: the current one).
        progress: Called with one line per step.

    Raises:
        PostgresNotInstalledError: No PostgreSQL binaries.
        ServiceError: A service did not start or answer; the message quotes its log.
    """
    root = _home(home)
    root.mkdir(parents=True, exist_ok=True)
    wait = float(timeout or os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT)
    say = progress or (lambda line: None)
    cwd = (workdir or Path.cwd()).resolve()
    with _lock(root, 3 * wait + 60):
        old = read_state(root)
        stack = Stack(home=str(root), postgres_home=str(root / "postgres"))
        if old is not None:
            stack.procs = dict(old.procs)
        pg, pg_new = services.start_postgres(
            Path(stack.postgres_home),
            port=old.postgres_port if old else None,
            fsync=fsync,
            timeout=min(wait, services.DEFAULT_TIMEOUT),
            progress=say,
        )
        for database in DATABASES:
            services.create_database(pg, database)
        say(
            ("started " if pg_new else "reusing ") + f"PostgreSQL {pg.version} at {pg.url()} (databases "
            f"{', '.join(DATABASES)})"
        )
        stack.postgres_port = pg.port
        started: list[str] = ["postgres"] if pg_new else []
        env = _base_env(pg)
        restart = pg_new  # MLflow and Prefect hold connections to the old server: restart them
        popens: dict[str, subprocess.Popen[bytes]] = {}
        for name in _ORDER:
            if name == "worker":
                for other, popen in popens.items():
                    _wait(stack, other, popen, time.monotonic() + wait, _WHAT[other])
                    say(f"{_WHAT[other]} answers at {_url(stack, other)} (log {stack.procs[other].log})")
                # Its flow runs inherit the MLflow and Prefect URLs: a new server may have a new port.
                restart = restart or "prefect" in started or "mlflow" in started
            if not restart and _healthy(stack, name):
                say(f"reusing {_WHAT[name]} (pid {stack.procs[name].pid})")
                continue
            stale = stack.procs.pop(name, None)
            if stale is not None and processes.alive(stale.pid):
                processes.terminate_group(stale.pid)
            port = _port(stale.port if stale else None) if name != "worker" else None
            worker = (
                f"{POOL}-{socket.gethostname()}-{time.time_ns() // 1_000_000}" if name == "worker" else None
            )
            cmd, proc_env = _command(name, root, pg, stack, port, env, worker)
            popen, proc = _spawn(root, name, cmd, proc_env, cwd, port)
            proc.name = worker
            stack.procs[name] = proc
            popens[name] = popen
            _write_state(stack)  # recorded at once: `down` stops it even if a later step fails
            started.append(name)
            say(f"starting {_WHAT[name]}" + (f" on port {port}" if port else ""))
        if "worker" in popens:
            _wait(stack, "worker", popens["worker"], time.monotonic() + wait, _WHAT["worker"])
            say(f"{_WHAT['worker']} is online (log {stack.procs['worker'].log})")
        _write_state(stack)
        return stack, started


_WHAT = {
    "mlflow": "the MLflow tracking server",
    "prefect": "the Prefect server",
    "worker": f"the Prefect worker of pool '{POOL}'",
}


def _url(stack: Stack, name: str) -> str:
    return stack.mlflow_url if name == "mlflow" else stack.prefect_api_url


def _command(
    name: str,
    root: Path,
    pg: services.PostgresServer,
    stack: Stack,
    port: int | None,
    env: dict[str, str],
    worker: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of service ``name`` (no credentials on the command line)."""
    proc_env = dict(env)
    if name == "mlflow":
        artifacts = root / "mlflow" / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            _pg_url(pg, "mlflow", "psycopg"),
            "--artifacts-destination",
            artifacts.as_uri(),
            "--serve-artifacts",
        ]
        return cmd, proc_env
    prefect_home = root / "prefect"
    prefect_home.mkdir(exist_ok=True)
    proc_env["PREFECT_HOME"] = str(prefect_home)
    if name == "prefect":
        proc_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = _pg_url(pg, "prefect", "asyncpg")
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]
        return cmd, proc_env
    # The worker's flow runs inherit its environment: they track to MLflow and write feedback here too.
    proc_env.update(_env_of(stack, pg))
    cmd = [
        sys.executable,
        "-m",
        "prefect",
        "worker",
        "start",
        "--pool",
        POOL,
        "--type",
        "process",
        "--name",
        worker or POOL,
    ]
    return cmd, proc_env


def _env_of(stack: Stack, pg: services.PostgresServer) -> dict[str, str]:
    env = {
        "MLFLOW_TRACKING_URI": stack.mlflow_url,
        "METAREC_TRACKING_URI": stack.mlflow_url,
        "PREFECT_API_URL": stack.prefect_api_url,
        "METAREC_FEEDBACK_URL": pg.url("feedback"),
    }
    env.update(pg.env())
    return env


def stack_env(home: Path | None = None) -> dict[str, str]:
    """What a user exports to use the running stack: the tracking, Prefect and feedback URLs, ``PGPASSFILE``.

    No value holds a password (``PGPASSFILE`` names the 0600 file that does).

    Raises:
        ServiceError: The stack is not running.
    """
    root = _home(home)
    stack = read_state(root)
    pg = services.running(root / "postgres")
    if stack is None or pg is None or not all(name in stack.procs for name in _ORDER):
        raise ServiceError(f"the stack in {root} is not running; start it with: metarec services up")
    return _env_of(stack, pg)


@dataclass
class ServiceStatus:
    """One service's state, as ``stack_status`` reports it."""

    name: str
    running: bool
    detail: str


def stack_status(home: Path | None = None) -> list[ServiceStatus]:
    """Each service of the stack in ``home``: whether it runs and answers, where, and its log."""
    root = _home(home)
    stack = read_state(root) or Stack(home=str(root), postgres_home=str(root / "postgres"))
    pg = services.running(Path(stack.postgres_home))
    recorded_pg = services.read_state(Path(stack.postgres_home))
    report = [
        ServiceStatus(
            "postgres",
            pg is not None,
            f"{pg.url()} (log {pg.log})" if pg else ("not answering" if recorded_pg else "not started"),
        )
    ]
    for name in _ORDER:
        proc = stack.procs.get(name)
        ok = proc is not None and _healthy(stack, name)
        if proc is None:
            detail = "not started"
        else:
            where = f"{_url(stack, name)}, " if name != "worker" else f"pool {POOL}, "
            state = "" if ok else ("NOT answering, " if processes.alive(proc.pid) else "stopped, ")
            detail = f"{state}{where}pid {proc.pid}, log {proc.log}"
        report.append(ServiceStatus(name, ok, detail))
    return report


def stack_down(home: Path | None = None, *, purge: bool = False, timeout: float = 60.0) -> list[str]:
    """Stop the stack of ``home`` in reverse order; return the services that were running.

    Args:
        purge: Also delete its data: the PostgreSQL cluster and password files, MLflow's artifacts,
            Prefect's home, the logs.
    """
    root = _home(home)
    if not root.is_dir():
        return []
    stopped: list[str] = []
    with _lock(root, timeout + 60):
        stack = read_state(root)
        if stack is not None:
            for name in reversed(_ORDER):
                proc = stack.procs.pop(name, None)
                if proc is not None and processes.alive(proc.pid):
                    processes.terminate_group(proc.pid)
                    stopped.append(name)
                _write_state(stack)
        pg_home = Path(stack.postgres_home) if stack else root / "postgres"
        was = services.running(pg_home)
        services.stop_postgres(pg_home, remove=purge, timeout=timeout)
        if was is not None:
            stopped.append("postgres")
        if purge:
            for path in (root / "mlflow", root / "prefect", root / "logs"):
                shutil.rmtree(path, ignore_errors=True)
            (root / STATE_FILE).unlink(missing_ok=True)
    return stopped
