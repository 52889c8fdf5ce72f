"""Where metarec's log records go: the workspace log file, and a console without tracebacks.

The CLI prints one ``error:`` block per failure; the traceback, Prefect's records and a failed stage's
output go to ``<workspace>/logs/metarec.log`` (or to the console with ``--debug``).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

from components.core.secrets import RedactingFilter

DEBUG_ENV = "METAREC_DEBUG"
LOG_FILE = Path("logs") / "metarec.log"  # under the workspace
log = logging.getLogger("metarec.cli")
log.propagate = False  # the log file only: the console gets one `error:` block, never a traceback
log.setLevel(logging.DEBUG)
log.addHandler(logging.NullHandler())  # before a workspace is known; else logging's last resort prints


class State:
    debug = bool(os.environ.get(DEBUG_ENV))
    log_file: Path | None = None
    handler: logging.Handler | None = None


class _WorkspaceLog(logging.FileHandler):
    """``<workspace>/logs/metarec.log``, written only once the workspace exists (no stray directories)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8", delay=True)
        self.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
        self.addFilter(RedactingFilter())  # tracebacks may quote a database URL: never its password

    def emit(self, record: logging.LogRecord) -> None:
        path = Path(self.baseFilename)
        if self.stream is None:
            if not path.parent.parent.is_dir():
                return
            path.parent.mkdir(exist_ok=True)
        super().emit(record)


class _NoTraceback(logging.Formatter):
    """Formats as the wrapped formatter does, without the traceback (that goes to the log file)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


class _RunFailures(logging.Filter):
    """Drop in-process flow and task run failures from the console: the CLI reports them, once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return True
        if record.levelno >= logging.ERROR:
            return False
        return not re.match(r"Finished in state (Failed|Crashed)\b", record.getMessage())


_RUN_FAILURES = _RunFailures()


def _prefect_logging_ready() -> bool:
    """Whether Prefect has configured logging (its dictConfig would drop handlers attached before)."""
    configuration = sys.modules.get("prefect.logging.configuration")
    return bool(getattr(configuration, "PROCESS_LOGGING_CONFIG", None))


def quiet_console(quiet: bool) -> None:
    """Prefect's console handlers: without tracebacks and run failures, unless --debug."""
    if not _prefect_logging_ready():
        return
    handlers = [*logging.getLogger().handlers, *logging.getLogger("prefect._internal").handlers]
    for handler in handlers:
        if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
            continue
        wrapped = isinstance(handler.formatter, _NoTraceback)
        if quiet and not wrapped:
            handler.setFormatter(_NoTraceback(handler.formatter))
            handler.addFilter(_RUN_FAILURES)
        elif not quiet and isinstance(handler.formatter, _NoTraceback):
            handler.setFormatter(handler.formatter.inner)
            handler.removeFilter(_RUN_FAILURES)


def log_to(ws: Path | None) -> None:
    """Send metarec's and Prefect's records, tracebacks included, to the workspace log (None: nowhere)."""
    path = None if ws is None else ws / LOG_FILE
    loggers = [log, logging.getLogger("prefect")]
    if State.handler is not None and State.log_file != path:
        for logger in loggers:
            logger.removeHandler(State.handler)
        State.handler.close()
        State.handler = State.log_file = None
    if path is not None and State.handler is None:
        State.handler, State.log_file = _WorkspaceLog(path), path
    if State.handler is not None:
        # Prefect's logging setup replaces the handlers of its loggers: attach only once it has run.
        for logger in loggers if _prefect_logging_ready() else [log]:
            if State.handler not in logger.handlers:
                logger.addHandler(State.handler)
    quiet_console(not State.debug)
