"""The Prefect API that metarec's flows report to: the user's own, or one local server metarec keeps.

Prefect's fallback, a temporary server started inside each process, must start and (on first use)
migrate its database within 20 s: on a machine that never ran Prefect, on 2 busy cores, it does not,
and several processes at once each start their own. So, unless ``PREFECT_API_URL`` (environment or the
active Prefect profile) names a server, metarec starts one ``prefect server start`` per ``PREFECT_HOME``,
detached, waits for it as long as a first migration takes, and reuses it from every later process: the
flow runs stay visible in its UI. Its port, pid and log are in ``$PREFECT_HOME/metarec-server.json``.

This module imports no Prefect: the API URL must be in the environment before Prefect is imported
(Prefect reads its settings once, at import).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from components.core import processes

# A first start migrates ~100 revisions into a new sqlite database: 20-40 s on 2 idle cores, more when
# the machine is busy. Override with METAREC_SERVER_TIMEOUT (seconds).
DEFAULT_TIMEOUT = 240.0
DEFAULT_PORT = 4200
STATE_FILE = "metarec-server.json"


class OrchestrationError(RuntimeError):
    """The Prefect API cannot be reached or started; the message says what to do."""


@dataclass
class ServerInfo:
    """A local Prefect server that metarec started."""

    pid: int
    port: int
    home: str
    log: str
    started: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"


def prefect_home() -> Path:
    """``$PREFECT_HOME`` or Prefect's default, ``~/.prefect``."""
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser().resolve()


def configured_api_url() -> str:
    """``PREFECT_API_URL`` from the environment, else from the active profile in ``profiles.toml``."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or prefect_home() / "profiles.toml")
    try:
        data = tomllib.loads(profiles.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return ""
    active = os.environ.get("PREFECT_PROFILE") or data.get("active") or "ephemeral"
    return str(((data.get("profiles") or {}).get(active) or {}).get("PREFECT_API_URL") or "")


def healthy(api_url: str, timeout: float = 3.0) -> bool:
    """Whether ``<api_url>/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _state_path(home: Path) -> Path:
    return home / STATE_FILE


def read_state(home: Path | None = None) -> ServerInfo | None:
    """The recorded server of ``home`` (default: this ``PREFECT_HOME``), or None."""
    path = _state_path(home or prefect_home())
    try:
        return ServerInfo(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def running(home: Path | None = None) -> ServerInfo | None:
    """The recorded server if its process lives and its API answers."""
    info = read_state(home)
    if info is not None and processes.alive(info.pid) and healthy(info.api_url):
        return info
    return None


def _lock(home: Path) -> contextlib.AbstractContextManager[object]:
    from filelock import FileLock

    # Held only while checking/starting: concurrent metarec processes start one server, not several.
    return FileLock(str(home / "metarec-server.lock"), timeout=DEFAULT_TIMEOUT + 60)


def start(
    port: int | None = None,
    timeout: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[ServerInfo, bool]:
    """Start the local server of this ``PREFECT_HOME`` unless it runs; return it and whether it is new."""
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    wait = float(timeout or os.environ.get("METAREC_SERVER_TIMEOUT") or DEFAULT_TIMEOUT)
    with _lock(home):
        found = running(home)
        if found is not None:
            return found, False
        stale = read_state(home)
        if stale is not None and processes.alive(stale.pid):
            processes.terminate_group(stale.pid)  # recorded but not answering: replace it
        chosen = processes.free_port(
            preferred=port or int(os.environ.get("METAREC_PREFECT_PORT") or DEFAULT_PORT)
        )
        if chosen is None:
            raise OrchestrationError("no free TCP port on 127.0.0.1 for the local Prefect server")
        log = home / "metarec-server.log"
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env.update(
            PREFECT_HOME=str(home),
            # No route to Prefect's telemetry endpoint from most servers; the attempt only adds noise.
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
        )
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
        with open(log, "ab") as handle:
            handle.write(f"\n--- metarec: {' '.join(cmd)} --port {chosen} at {time.ctime()}\n".encode())
            handle.flush()
            proc = subprocess.Popen(
                [*cmd, "--port", str(chosen)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives this command; its own process group to stop
            )
        info = ServerInfo(proc.pid, chosen, str(home), str(log), time.time())
        if progress:
            progress(
                f"starting the local Prefect server on {info.url} (PREFECT_HOME={home}); "
                "a first start migrates its database and can take a minute"
            )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise OrchestrationError(
                    f"the local Prefect server exited with code {proc.returncode} while starting; "
                    f"its log {log} ends with:\n{processes.log_tail(log, 5, '')}"
                )
            if healthy(info.api_url, timeout=2):
                _state_path(home).write_text(json.dumps(asdict(info)), encoding="utf-8")
                return info, True
            time.sleep(0.5)
        processes.terminate_group(proc.pid)
        raise OrchestrationError(
            f"the local Prefect server did not answer within {wait:.0f} s (log: {log}). "
            "Retry with a longer METAREC_SERVER_TIMEOUT, or point PREFECT_API_URL at a running server."
        )


def stop(home: Path | None = None) -> ServerInfo | None:
    """Stop the recorded server (its whole process group); return what was stopped, None if nothing."""
    home = home or prefect_home()
    info = read_state(home)
    if info is None:
        return None
    if processes.alive(info.pid):
        processes.terminate_group(info.pid)
    _state_path(home).unlink(missing_ok=True)
    return info


def ensure_api(progress: Callable[[str], None] | None = None) -> str:
    """Make sure flows have a Prefect API and export it as ``PREFECT_API_URL``; return the API URL.

    A configured API must answer; otherwise this ``PREFECT_HOME``'s local server is reused or started.
    """
    configured = configured_api_url()
    if configured:
        if not healthy(configured):
            raise OrchestrationError(
                f"the Prefect API at {configured} (PREFECT_API_URL) does not answer. Start that server, "
                "or unset PREFECT_API_URL to let metarec run its own local server."
            )
        os.environ["PREFECT_API_URL"] = configured
        return configured
    info, _ = start(progress=progress)
    os.environ["PREFECT_API_URL"] = info.api_url
    return info.api_url
