"""Workspace set-up and DVC invocation: the glue between the Prefect flow and ``dvc.yaml``.

A workspace is a directory that is its own DVC project (``dvc init --no-scm``) holding a copy of the
project's ``dvc.yaml``, its own ``params.yaml``, the MLflow store and every stage output. Runs never
write into the code checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from components.core import tracking
from components.core.config import Config, apply_overrides, build_config, read_params
from components.core.processes import TreePeak
from components.core.secrets import redact, redact_url
from components.core.storage import atomic_file
from components.core.workspace import Paths, workspace_config
from components.data import fetch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
WORKSPACE_ENV = "METAREC_WORKSPACE"
# A file `metarec stage` writes its error message to, so the flow reports that message, not DVC's log.
STAGE_ERROR_ENV = "METAREC_STAGE_ERROR_FILE"
#: The DVC remote ``data.remote`` configures in a workspace, as its default remote.
REMOTE_NAME = "metarec"
# Remote schemes DVC supports through a plugin package of its own (``pip install "dvc[s3]"`` etc.).
_REMOTE_PLUGINS = {
    "s3": "dvc_s3",
    "gs": "dvc_gs",
    "azure": "dvc_azure",
    "ssh": "dvc_ssh",
    "webdav": "dvc_webdav",
    "webdavs": "dvc_webdav",
    "oss": "dvc_oss",
    "hdfs": "dvc_hdfs",
    "gdrive": "dvc_gdrive",
}


class PipelineError(RuntimeError):
    """A DVC stage failed: the message says why (the stage's own error); ``log`` is DVC's whole output."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(message)
        self.log = log

    def __reduce__(self) -> tuple[type[PipelineError], tuple[str, str]]:
        return type(self), (str(self), self.log)  # keep the log across Prefect's result pickling


def default_workspace() -> Path:
    """``$METAREC_WORKSPACE`` if set, else ``./workspace`` under the current directory."""
    return Path(os.environ.get(WORKSPACE_ENV) or Path.cwd() / "workspace").resolve()


def _stage_env(parent_run_id: str | None = None, error_file: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # DVC runs each stage's `metarec stage ...` through a shell: make it find this interpreter's scripts
    # even when the virtual environment is not activated.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    if parent_run_id:
        env[tracking.PARENT_ENV] = parent_run_id
    if error_file is not None:
        env[STAGE_ERROR_ENV] = str(error_file)
    return env


def _dvc(
    workspace: Path, *args: str, parent_run_id: str | None = None, error_file: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=workspace,
        capture_output=True,
        text=True,
        env=_stage_env(parent_run_id, error_file),
    )


def _dvc_measured(
    workspace: Path, *args: str, parent_run_id: str | None = None, error_file: Path | None = None
) -> tuple[subprocess.CompletedProcess[str], int | None]:
    """:func:`_dvc`, plus the peak RSS in bytes of DVC's process tree (None where unmeasurable)."""
    cmd = [sys.executable, "-m", "dvc", *args]
    env = _stage_env(parent_run_id, error_file)
    with (
        subprocess.Popen(
            cmd, cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        ) as proc,
        TreePeak(proc.pid) as peak,
    ):
        out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), peak.peak_bytes


def prepare_workspace(workspace: Path, overrides: list[str] | None = None) -> Config:
    """Create or update a workspace: DVC project, pipeline file and params with overrides applied.

    Overrides are written into the workspace's ``params.yaml`` (as ``dvc exp run -S`` does), so the
    workspace always states the configuration its outputs were made with.
    """
    workspace = Path(workspace).resolve()
    paths = Paths(workspace)
    # Validate before touching the disk: a bad override must not leave a half-made workspace.
    base = read_params(paths.params) if paths.params.exists() else read_params(PROJECT_ROOT / "params.yaml")
    tree = apply_overrides(base, overrides or [])
    cfg = build_config(tree, source=f"{paths.params} with overrides {overrides or []}")
    remote = remote_url(cfg.data.remote)
    check_remote(remote)
    workspace.mkdir(parents=True, exist_ok=True)
    if not (workspace / ".dvc").is_dir():
        proc = _dvc(workspace, "init", "--no-scm", "-q")
        if proc.returncode != 0:
            raise PipelineError(f"dvc init failed in {workspace}:\n{proc.stderr.strip()}")
        _dvc(workspace, "config", "core.analytics", "false")
    configure_remote(workspace, remote)
    tree.setdefault("data", {})["remote"] = remote
    # dvc.yaml is the project's single pipeline definition; the workspace always gets the current one.
    shutil.copyfile(PROJECT_ROOT / "dvc.yaml", workspace / "dvc.yaml")
    if cfg.data.path is not None:
        # Stages run with the workspace as their directory: store the path absolute.
        source = Path(cfg.data.path).expanduser().resolve()
        if not fetch.dataset_files(source, cfg.data.name):
            raise PipelineError(f"data.path {source}: no RecBole atomic files named {cfg.data.name}.* found")
        tree["data"]["path"] = str(source)
    tree.setdefault("data", {})["fingerprint"] = fetch.fingerprint(tree["data"].get("path"), cfg.data.name)
    cfg = build_config(tree)
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    if not paths.params.exists() or paths.params.read_text(encoding="utf-8") != text:
        with atomic_file(paths.params) as handle:
            handle.write(text)
    return cfg


def remote_url(remote: str | None) -> str | None:
    """``data.remote`` as DVC is given it: a URL unchanged, a directory absolute (relative to the cwd)."""
    if not remote:
        return None
    if "://" in remote:
        return remote
    return str(Path(remote).expanduser().resolve())


def check_remote(url: str | None) -> None:
    """Refuse a remote whose scheme needs a DVC plugin that is not installed (before any push fails)."""
    if not url or "://" not in url:
        return
    import importlib.util

    scheme = url.partition("://")[0].lower()
    plugin = _REMOTE_PLUGINS.get(scheme)
    if plugin and importlib.util.find_spec(plugin) is None:
        extra = plugin.removeprefix("dvc_")
        raise PipelineError(
            f"data.remote {redact_url(url)}: DVC needs the {plugin.replace('_', '-')} package for "
            f'{scheme}:// remotes (pip install "dvc[{extra}]")'
        )


def configured_remote(workspace: Path) -> str | None:
    """The URL of the workspace's ``metarec`` DVC remote when it is the default remote, else None."""
    from configobj import ConfigObj

    path = Path(workspace) / ".dvc" / "config"
    if not path.exists():
        return None
    conf = ConfigObj(str(path))
    if conf.get("core", {}).get("remote") != REMOTE_NAME:
        return None
    url = conf.get(f'remote "{REMOTE_NAME}"', {}).get("url")
    return str(url) if url else None


def configure_remote(workspace: Path, url: str | None) -> None:
    """Make ``url`` the workspace's default DVC remote ``metarec`` (None: remove it); idempotent.

    Only the URL is written to ``.dvc/config``. Credentials stay in the environment (``AWS_*`` for
    S3-compatible stores) or in ``.dvc/config.local`` (``dvc remote modify --local metarec ...``), which
    re-adding the remote leaves alone.
    """
    workspace = Path(workspace)
    current = configured_remote(workspace)
    if url is None:
        from configobj import ConfigObj

        path = workspace / ".dvc" / "config"
        if path.exists() and f'remote "{REMOTE_NAME}"' in ConfigObj(str(path)):
            _dvc(workspace, "remote", "remove", REMOTE_NAME)
        return
    if current == url:
        return
    proc = _dvc(workspace, "remote", "add", "-d", "-f", REMOTE_NAME, url)
    if proc.returncode != 0:
        raise PipelineError(
            f"cannot configure DVC remote {REMOTE_NAME!r} ({redact_url(url)}) in {workspace}:\n"
            + redact((proc.stdout + proc.stderr).strip())
        )


@dataclass
class StageOutcome:
    """What running one DVC stage did."""

    stage: str
    ran: bool
    seconds: float
    log: str
    restored: bool = False
    # Peak resident memory of the stage's process tree (DVC and the stage), sampled; None if unmeasured.
    peak_rss_mb: float | None = None


def repro_stage(
    workspace: Path,
    stage: str,
    parent_run_id: str | None = None,
    on_start: Callable[[], None] | None = None,
) -> StageOutcome:
    """Run one stage with ``dvc repro --single-item``; DVC skips it when deps and params are unchanged.

    ``on_start`` is called when the stage is stale and about to run.
    """
    start = time.perf_counter()
    if not stale(Path(workspace), stage):
        return StageOutcome(stage, False, time.perf_counter() - start, f"Stage '{stage}' didn't change")
    if on_start is not None:
        on_start()
    with tempfile.TemporaryDirectory(prefix="metarec-stage-") as tmp:
        report = Path(tmp) / "error.txt"
        proc, peak = _dvc_measured(
            Path(workspace), "repro", "--single-item", stage, parent_run_id=parent_run_id, error_file=report
        )
        reported = report.read_text(encoding="utf-8").strip() if report.exists() else ""
    log = (proc.stdout + proc.stderr).strip()
    if parent_run_id and (tracking.stage_record_dir(workspace, stage) / "record.json").exists():
        # The data stages leave their MLflow record, finished or failed, for us to log.
        cfg = workspace_config(workspace)
        tracking.flush_stage_run(
            workspace, stage, parent_run_id, cfg.flat(), cfg.tracking.experiment, cfg.tracking.uri
        )
    if proc.returncode != 0:
        raise PipelineError(f"stage {stage} failed: {reported or _dvc_error(log, proc.returncode)}", log)
    skipped = "didn't change, skipping" in log
    # DVC's run cache restores outputs of a deps+params combination it has run before.
    restored = "is cached - skipping run" in log
    peak_mb = None if peak is None else peak / 2**20
    return StageOutcome(stage, not skipped, time.perf_counter() - start, log, restored, peak_mb)


def stale(workspace: Path, stage: str) -> bool:
    """Whether DVC would run ``stage`` now: asked in this process, sparing a DVC start-up per stage.

    A stage that is up to date costs ~0.2 s here instead of ~2 s for ``dvc repro`` in a new process,
    which is most of a re-run with nothing changed.
    """
    import logging

    from dvc.repo import Repo

    dvc_logger = logging.getLogger("dvc")
    level = dvc_logger.level
    dvc_logger.setLevel(logging.ERROR)  # status chatter belongs to DVC's CLI, not to our log
    try:
        with Repo(str(workspace)) as repo:
            return bool(repo.status(targets=[stage], single_item=True))
    except Exception:  # anything unusual: let `dvc repro` decide and report it
        return True
    finally:
        dvc_logger.setLevel(level)


def _dvc_error(log: str, returncode: int) -> str:
    """DVC's own ``ERROR:`` lines, for a stage that died without reporting (killed, DVC itself failed)."""
    lines = [line.removeprefix("ERROR:").strip() for line in log.splitlines() if line.startswith("ERROR:")]
    return "; ".join(lines) or f"dvc exit {returncode}: {log.splitlines()[-1] if log else 'no output'}"


def stage_status(workspace: Path) -> str:
    """``dvc status`` output: which stages are stale."""
    return _dvc(Path(workspace), "status").stdout.strip()
