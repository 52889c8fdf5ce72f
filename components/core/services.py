"""A local PostgreSQL server for development and tests: found, initialised, started, health-checked, stopped.

Production runs PostgreSQL as a managed service; a developer (and the test suite) needs a real one on the
same machine, without Docker. ``start_postgres`` finds the PostgreSQL binaries (``initdb``, ``pg_ctl``:
``$METAREC_POSTGRES_BIN``, else ``PATH``, else Debian's ``/usr/lib/postgresql/<major>/bin``, newest first),
initialises a cluster under a home directory once, starts it on a free loopback port and waits until it
accepts connections. ``create_database`` adds a database and returns its URL; ``stop_postgres`` stops the
server (``pg_ctl stop -m fast``: open sessions are rolled back, committed data stays).

Everything about the server lives in the home directory (default ``$METAREC_SERVICES_HOME/postgres``, else
``~/.metarec/services/postgres``):

- ``postgres.json``: the running server's pid, port, data directory, log and binaries, so a later command
  (another process, ``python -m components.core.services postgres down``) can reuse or stop it;
- ``password``: the superuser's generated password (mode 0600), the secret file for clients;
- ``pgpass``: the same password in libpq's password-file format (0600), for ``PGPASSFILE``.

No URL this module builds carries a password: clients read it from ``PGPASSFILE`` (``PostgresServer.env()``)
or a secret file, so URLs can be printed and logged as they are. PostgreSQL refuses to run as root: as
root, ``initdb`` and ``pg_ctl`` run as the ``postgres`` user (``runuser``) and the data directory belongs to
that user; when the home directory is not reachable by it (``/root``, pytest's 0700 temporary
directories), the data directory goes to a fresh directory under the system temporary directory instead.

The server listens on 127.0.0.1 only (no Unix socket) and checks passwords with SCRAM (``auth="trust"``
skips them, for throwaway clusters). This module imports nothing else of the project's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from components.core import processes

log = logging.getLogger(__name__)

#: Overrides the directory holding ``initdb`` and ``pg_ctl``.
BIN_ENV = "METAREC_POSTGRES_BIN"
#: Root directory of the local services' state; PostgreSQL's is ``<it>/postgres``.
HOME_ENV = "METAREC_SERVICES_HOME"
#: Where Debian and Ubuntu install each major version's server binaries.
DEBIAN_ROOT = Path("/usr/lib/postgresql")
#: The superuser ``initdb`` creates.
SUPERUSER = "postgres"
#: The OS user that runs the server when this process is root.
OS_USER = "postgres"
HOST = "127.0.0.1"
STATE_FILE = "postgres.json"
PASSWORD_FILE = "password"
PGPASS_FILE = "pgpass"
#: Seconds to wait for the server to start or stop (a first start on a busy machine takes a few).
DEFAULT_TIMEOUT = 60.0

Auth = Literal["password", "trust"]
_DB_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
# Variables libpq and the server read that would point our commands at another cluster.
PG_ENV = ("PGDATA", "PGHOST", "PGHOSTADDR", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGPASSFILE")


class ServiceError(RuntimeError):
    """A local service cannot be found, started, reached or stopped; the message says what to do."""


class PostgresNotInstalledError(ServiceError):
    """No PostgreSQL server binaries on this machine."""


@dataclass
class PostgresServer:
    """A local PostgreSQL server this module started (the content of ``postgres.json``)."""

    pid: int
    port: int
    version: str
    bindir: str
    home: str
    datadir: str
    log: str
    started: float
    user: str = SUPERUSER
    host: str = HOST
    # Set when the server checks passwords: the 0600 files holding the superuser's password.
    password_file: str | None = None
    pgpass: str | None = None

    def url(self, database: str = "postgres") -> str:
        """``postgresql://postgres@127.0.0.1:<port>/<database>``: no password, see ``env()``."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def env(self) -> dict[str, str]:
        """Environment that lets libpq clients (psycopg, psql) log in: ``PGPASSFILE`` when passwords count."""
        return {"PGPASSFILE": self.pgpass} if self.pgpass else {}


def default_home() -> Path:
    """``$METAREC_SERVICES_HOME/postgres``, else ``~/.metarec/services/postgres``."""
    root = os.environ.get(HOME_ENV) or Path.home() / ".metarec" / "services"
    return Path(root).expanduser().resolve() / "postgres"


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


def _version(bindir: Path) -> str:
    """``15.18`` from ``initdb --version`` (``initdb (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)``)."""
    try:
        out = subprocess.run(
            [str(bindir / "initdb"), "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise ServiceError(f"{bindir / 'initdb'} --version failed: {err}") from None
    found = re.search(r"\(PostgreSQL\)\s+(\d+(?:\.\d+)?)", out)
    return found.group(1) if found else out.strip()


def _has_server(bindir: Path) -> bool:
    return all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres"))


def find_postgres() -> tuple[Path, str]:
    """The directory of the PostgreSQL server binaries and their version.

    Looks at ``$METAREC_POSTGRES_BIN``, then ``PATH`` (``initdb`` next to ``pg_ctl``), then Debian's
    ``/usr/lib/postgresql/*/bin``, highest major version first.

    Raises:
        PostgresNotInstalledError: None found; the message names the package to install.
    """
    candidates: list[Path] = []
    if os.environ.get(BIN_ENV):
        bindir = Path(os.environ[BIN_ENV]).expanduser()
        if not _has_server(bindir):
            raise PostgresNotInstalledError(
                f"{BIN_ENV}={bindir} holds no PostgreSQL server (initdb, pg_ctl, postgres); point it at the "
                "bin directory of a PostgreSQL installation, or unset it"
            )
        return bindir, _version(bindir)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    with contextlib.suppress(OSError):
        versions = [d for d in DEBIAN_ROOT.iterdir() if d.name.split(".")[0].isdigit()]
        for d in sorted(versions, key=lambda d: _major(d.name), reverse=True):
            candidates.append(d / "bin")
    for bindir in candidates:
        if _has_server(bindir):
            return bindir, _version(bindir)
    raise PostgresNotInstalledError(
        "PostgreSQL is not installed: no initdb/pg_ctl on PATH or in "
        f"{DEBIAN_ROOT}/*/bin. On Debian or Ubuntu install the package `postgresql` "
        "(`sudo apt-get install -y postgresql`, PostgreSQL 15 on Debian 12); elsewhere install PostgreSQL "
        f"15 or newer and put its bin directory on PATH or in {BIN_ENV}"
    )


# ---- running as root ------------------------------------------------------------------------------------


def _as_root() -> bool:
    return os.geteuid() == 0


def _os_user() -> tuple[int, int, list[int]]:
    """uid, gid and groups of the ``postgres`` OS user (root only)."""
    import pwd

    try:
        entry = pwd.getpwnam(OS_USER)
    except KeyError:
        raise ServiceError(
            f"PostgreSQL refuses to run as root and there is no '{OS_USER}' user to run it as; the Debian "
            f"package `postgresql` creates one (or: useradd --system {OS_USER}), or run as a normal user"
        ) from None
    return entry.pw_uid, entry.pw_gid, os.getgrouplist(OS_USER, entry.pw_gid)


def _server_cmd(cmd: list[str]) -> list[str]:
    """``cmd`` as the ``postgres`` user when we are root (initdb and the server refuse root), else as is."""
    if not _as_root():
        return cmd
    runuser = shutil.which("runuser")
    if runuser is None:
        raise ServiceError("running as root needs `runuser` (util-linux) to start PostgreSQL as 'postgres'")
    return [runuser, "-u", OS_USER, "--", *cmd]


def _reachable(path: Path, uid: int, gids: Sequence[int]) -> bool:
    """Whether user ``uid`` (groups ``gids``) can traverse each existing directory from / to ``path``."""
    for directory in [path, *path.parents]:
        try:
            st = directory.stat()
        except FileNotFoundError:
            continue
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid in gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _runtime_dir(home: Path) -> Path:
    """A new directory for the data directory and the server log, owned by the user that runs the server."""
    if not _as_root():
        runtime = home / "server"
        runtime.mkdir(mode=0o700, exist_ok=True)
        return runtime
    uid, gid, gids = _os_user()
    if _reachable(home, uid, gids):
        runtime = home / "server"
        runtime.mkdir(mode=0o700, exist_ok=True)
    else:
        # The postgres user cannot reach the home (e.g. under /root): put the cluster where it can. TMPDIR
        # may be private too (CI keeps it in a 0700 state directory), so fall back to the system ones.
        bases = [Path(tempfile.gettempdir()), Path("/tmp"), Path("/var/tmp")]
        base = next((b for b in bases if b.is_dir() and _reachable(b, uid, gids)), bases[1])
        runtime = Path(tempfile.mkdtemp(prefix="metarec-postgres-", dir=base))
    os.chown(runtime, uid, gid)
    runtime.chmod(0o700)
    return runtime


# ---- state ----------------------------------------------------------------------------------------------


def read_state(home: Path | None = None) -> PostgresServer | None:
    """The server recorded in ``home`` (default ``default_home()``), running or not; None if none."""
    path = (home or default_home()) / STATE_FILE
    try:
        return PostgresServer(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def _write_state(server: PostgresServer) -> None:
    path = Path(server.home) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(server), indent=2), encoding="utf-8")
    tmp.replace(path)


def free_port() -> int:
    """A free TCP port on the loopback address PostgreSQL binds to."""
    port = processes.free_port(HOST)
    if port is None:
        raise ServiceError(f"no free TCP port on {HOST}")
    return port


def _server_alive(server: PostgresServer) -> bool:
    """Whether the recorded postmaster still runs: its pid lives and is the one in ``postmaster.pid``."""
    return processes.alive(server.pid) and _postmaster_pid(Path(server.datadir)) == server.pid


def _client_env(server: PostgresServer | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PG_ENV}
    env["PGCONNECT_TIMEOUT"] = "5"
    if server is not None:
        env.update(server.env())
    return env


def is_ready(server: PostgresServer, timeout: float = 3.0) -> bool:
    """Whether the server accepts connections (``pg_isready``; no login needed)."""
    cmd = [
        str(Path(server.bindir) / "pg_isready"),
        "-q",
        "-h",
        server.host,
        "-p",
        str(server.port),
        "-t",
        str(max(1, int(timeout))),
    ]
    try:
        return subprocess.run(cmd, env=_client_env(), timeout=timeout + 5, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def running(home: Path | None = None) -> PostgresServer | None:
    """The recorded server if its process lives and it accepts connections, else None."""
    server = read_state(home)
    if server is not None and _server_alive(server) and is_ready(server):
        return server
    return None


# ---- start / stop ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _lock(home: Path, timeout: float) -> Iterator[None]:
    from filelock import FileLock, Timeout

    lock = FileLock(str(home / "postgres.lock"))
    try:
        # Held while checking/starting/stopping: concurrent commands start one server, not several.
        with lock.acquire(timeout=timeout):
            yield
    except Timeout:
        raise ServiceError(f"another command holds {home / 'postgres.lock'}; try again") from None


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (libpq ignores a more open password file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    path.chmod(0o600)


def _pgpass_line(host: str, port: int, user: str, password: str) -> str:
    def esc(value: str) -> str:
        return value.replace("\\", "\\\\").replace(":", "\\:")

    return f"{esc(host)}:{port}:*:{esc(user)}:{esc(password)}\n"


def _run(
    cmd: list[str], what: str, timeout: float, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            cmd,
            cwd=cwd,
            env=_client_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            start_new_session=True,  # a ^C in the caller's terminal must not reach the server
        )
    except subprocess.TimeoutExpired:
        raise ServiceError(f"{what} did not finish within {timeout:.0f} s") from None
    except OSError as err:
        raise ServiceError(f"{what} could not run: {err}") from None


def _initdb(bindir: Path, runtime: Path, auth: Auth, fsync: bool, timeout: float) -> str | None:
    """Initialise ``runtime/data``; return the generated superuser password (None with ``trust``)."""
    datadir = runtime / "data"
    cmd = [
        str(bindir / "initdb"),
        "-D",
        str(datadir),
        "-U",
        SUPERUSER,
        "-E",
        "UTF8",
        "--no-locale",
        "--auth-local=trust",  # no Unix socket is opened (see _start_server); TCP is what counts
        f"--auth-host={'scram-sha-256' if auth == 'password' else 'trust'}",
    ]
    if not fsync:
        cmd.append("--no-sync")
    password = None
    pwfile = runtime / "initdb-password"
    if auth == "password":
        password = secrets.token_urlsafe(24)
        _write_private(pwfile, password + "\n")
        if _as_root():
            uid, gid, _ = _os_user()
            os.chown(pwfile, uid, gid)
        cmd.append(f"--pwfile={pwfile}")
    try:
        result = _run(_server_cmd(cmd), "initdb", timeout, cwd=runtime)
    finally:
        pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        raise ServiceError(
            f"initdb failed ({result.returncode}):\n{(result.stderr or result.stdout).strip()}"
        )
    return password


def _postmaster_pid(datadir: Path) -> int | None:
    try:
        return int((datadir / "postmaster.pid").read_text(encoding="utf-8").splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def _start_server(
    bindir: Path, datadir: Path, log_file: Path, port: int, fsync: bool, timeout: float
) -> tuple[bool, str]:
    """``pg_ctl start`` on ``port``; (started, why not)."""
    options = f"-p {port} -h {HOST} -k ''"  # loopback TCP only, no Unix socket
    if not fsync:
        options += " -c fsync=off -c full_page_writes=off"
    cmd = [
        str(bindir / "pg_ctl"),
        "-D",
        str(datadir),
        "-l",
        str(log_file),
        "-w",
        "-t",
        str(int(timeout)),
        "-o",
        options,
        "start",
    ]
    result = _run(_server_cmd(cmd), "pg_ctl start", timeout + 10, cwd=datadir.parent)
    if result.returncode == 0:
        return True, ""
    return False, (result.stderr or result.stdout).strip()


def start_postgres(
    home: Path | None = None,
    *,
    port: int | None = None,
    auth: Auth = "password",
    fsync: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[str], None] | None = None,
) -> tuple[PostgresServer, bool]:
    """Start the server of ``home`` unless it runs; return it and whether this call started it.

    The first call initialises a cluster (``initdb``); later ones restart that cluster, with its data
    and password, on a free port (``port`` when given and free).

    Args:
        home: The state directory (default ``default_home()``); created when missing.
        port: The port to listen on; a free one when None.
        auth: ``password``: SCRAM with a generated superuser password (``PostgresServer.env()``);
            ``trust``: no password checks (a throwaway cluster). Used when the cluster is created only.
        fsync: False trades crash safety of the whole cluster for speed (``fsync=off``): test clusters
            only, never data you keep.
        timeout: Seconds to wait for the server to accept connections.
        progress: Called with one line per step worth telling a person about.

    Raises:
        PostgresNotInstalledError: No PostgreSQL binaries.
        ServiceError: The server could not be initialised or started; the message quotes its log.
    """
    home = (home or default_home()).resolve()
    home.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda line: log.info("%s", line))
    with _lock(home, timeout + 30):
        found = running(home)
        if found is not None:
            return found, False
        bindir, version = find_postgres()
        stale = read_state(home)
        if stale is not None and _server_alive(stale):
            _stop_server(stale, timeout)  # recorded but not answering: restart it
        password_file = home / PASSWORD_FILE
        if stale is not None and (Path(stale.datadir) / "PG_VERSION").is_file():
            datadir = Path(stale.datadir)
            cluster_major = (datadir / "PG_VERSION").read_text(encoding="utf-8").strip()
            if cluster_major != str(_major(version)):
                raise ServiceError(
                    f"the cluster in {datadir} is PostgreSQL {cluster_major} but the binaries found are "
                    f"{version} ({bindir}); set {BIN_ENV} to PostgreSQL {cluster_major}'s bin directory, or "
                    "remove the old cluster (postgres down --purge)"
                )
            password = password_file.read_text(encoding="utf-8").strip() if password_file.is_file() else None
        else:
            runtime = _runtime_dir(home)
            datadir = runtime / "data"
            say(f"initialising a PostgreSQL {version} cluster in {datadir}")
            password = _initdb(bindir, runtime, auth, fsync, timeout)
            if password is not None:
                _write_private(password_file, password + "\n")
            else:
                password_file.unlink(missing_ok=True)
        log_file = datadir.parent / "postgres.log"
        for attempt in range(3):
            # A free port can be taken between the check and the bind: then try another one.
            chosen = port if (port and attempt == 0) else free_port()
            ok, why = _start_server(bindir, datadir, log_file, chosen, fsync, timeout)
            if ok or "could not bind" not in processes.log_tail(log_file, 20):
                break
        if not ok:
            raise ServiceError(
                f"PostgreSQL did not start: {why}\nits log {log_file} ends with:\n"
                f"{processes.log_tail(log_file)}"
            )
        pgpass = None
        if password is not None:
            pgpass = home / PGPASS_FILE
            _write_private(pgpass, _pgpass_line(HOST, chosen, SUPERUSER, password))
        pid = _postmaster_pid(datadir)
        if pid is None:
            raise ServiceError(f"PostgreSQL started but {datadir / 'postmaster.pid'} is unreadable")
        server = PostgresServer(
            pid=pid,
            port=chosen,
            version=version,
            bindir=str(bindir),
            home=str(home),
            datadir=str(datadir),
            log=str(log_file),
            started=time.time(),
            password_file=str(password_file) if password is not None else None,
            pgpass=str(pgpass) if pgpass else None,
        )
        deadline = time.monotonic() + timeout
        while not is_ready(server, timeout=2):
            if time.monotonic() > deadline or not _server_alive(server):
                raise ServiceError(
                    f"PostgreSQL on {HOST}:{chosen} does not accept connections; its log {log_file} ends "
                    f"with:\n{processes.log_tail(log_file)}"
                )
            time.sleep(0.2)
        _write_state(server)
        say(f"PostgreSQL {version} accepts connections at {server.url()} (data {datadir}, log {log_file})")
        return server, True


def _stop_server(server: PostgresServer, timeout: float, mode: str = "fast") -> None:
    cmd = [str(Path(server.bindir) / "pg_ctl"), "-D", server.datadir, "-m", mode, "-w"]
    result = _run(_server_cmd([*cmd, "-t", str(int(timeout)), "stop"]), "pg_ctl stop", timeout + 10)
    if result.returncode == 0 or not _server_alive(server):
        return
    log.warning("pg_ctl stop failed (%s); sending SIGQUIT to %d", result.stderr.strip(), server.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(server.pid, signal.SIGQUIT)  # immediate shutdown; recovery replays the WAL at next start
    deadline = time.monotonic() + 10
    while _server_alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _server_alive(server):
        raise ServiceError(f"PostgreSQL (pid {server.pid}) did not stop; see {server.log}")


def stop_postgres(
    home: Path | None = None, *, remove: bool = False, timeout: float = DEFAULT_TIMEOUT
) -> PostgresServer | None:
    """Stop the recorded server (``pg_ctl stop -m fast``); return it, or None when none was recorded.

    Args:
        home: The state directory (default ``default_home()``).
        remove: Also delete the cluster (data directory, log) and its password files; the server then
            stops at once (``-m immediate``), skipping the shutdown checkpoint of data about to go.
        timeout: Seconds to wait for a clean shutdown before an immediate one.
    """
    home = (home or default_home()).resolve()
    if not home.is_dir():
        return None
    with _lock(home, timeout + 30):
        server = read_state(home)
        if server is None:
            return None
        if _server_alive(server):
            _stop_server(server, timeout, "immediate" if remove else "fast")
        if remove:
            shutil.rmtree(Path(server.datadir).parent, ignore_errors=True)
            for name in (STATE_FILE, PASSWORD_FILE, PGPASS_FILE):
                (home / name).unlink(missing_ok=True)
        return server


def create_database(server: PostgresServer, name: str, *, exist_ok: bool = True) -> str:
    """Create database ``name`` (owned by the superuser) and return its URL (without the password).

    Raises:
        ValueError: ``name`` is not a plain identifier.
        ServiceError: The server refused; the message quotes it.
    """
    if not _DB_NAME.fullmatch(name):
        raise ValueError(f"database name {name!r} must be a plain identifier ([A-Za-z_][A-Za-z0-9_]*, ≤63)")
    cmd = [
        str(Path(server.bindir) / "createdb"),
        "-h",
        server.host,
        "-p",
        str(server.port),
        "-U",
        server.user,
        name,
    ]
    try:
        result = subprocess.run(
            cmd, env=_client_env(server), capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError) as err:
        raise ServiceError(f"createdb {name} could not run: {err}") from None
    if result.returncode != 0 and not (exist_ok and "already exists" in result.stderr):
        raise ServiceError(f"createdb {name} on {server.url()} failed: {result.stderr.strip()}")
    return server.url(name)


# ---- command line ---------------------------------------------------------------------------------------


def _describe(server: PostgresServer) -> str:
    lines = [
        f"PostgreSQL {server.version}, pid {server.pid}",
        f"url:  {server.url()}",
        f"data: {server.datadir}",
        f"log:  {server.log}",
    ]
    if server.pgpass:
        lines.append(
            f"password: in {server.password_file}; for libpq clients: export PGPASSFILE={server.pgpass}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m components.core.services postgres up|down|status|createdb``; errors without traceback."""
    parser = argparse.ArgumentParser(
        prog="python -m components.core.services", description=__doc__.split("\n")[0]
    )
    services = parser.add_subparsers(dest="service", required=True)
    pg = services.add_parser("postgres", help="a local PostgreSQL server for development and tests")
    pg.add_argument("--home", type=Path, default=None, help=f"state directory (default {default_home()})")
    actions = pg.add_subparsers(dest="action", required=True)
    up = actions.add_parser(
        "up", help="start (initialising on first use) and wait until it accepts connections"
    )
    up.add_argument("--port", type=int, default=None)
    up.add_argument("--trust", action="store_true", help="no password checks (throwaway clusters)")
    down = actions.add_parser("down", help="stop it (pg_ctl stop -m fast)")
    down.add_argument("--purge", action="store_true", help="also delete its data and password files")
    actions.add_parser("status", help="whether it runs; exit status 1 when it does not")
    createdb = actions.add_parser("createdb", help="create a database and print its URL")
    createdb.add_argument("name")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            server, new = start_postgres(
                args.home, port=args.port, auth="trust" if args.trust else "password", progress=print
            )
            print(("started " if new else "already running: ") + _describe(server))
        elif args.action == "down":
            stopped = stop_postgres(args.home, remove=args.purge)
            print(f"stopped PostgreSQL (pid {stopped.pid})" if stopped else "no PostgreSQL server recorded")
        elif args.action == "status":
            found = running(args.home)
            print(_describe(found) if found else "not running")
            return 0 if found else 1
        else:
            found = running(args.home)
            if found is None:
                raise ServiceError("PostgreSQL is not running; start it with: postgres up")
            print(create_database(found, args.name))
    except (ServiceError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
