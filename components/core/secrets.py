"""Credentials: read from the environment or from secret files, and masked wherever a URL is shown.

Database and tracking-server credentials never belong in ``params.yaml``: that file is committed, logged
to MLflow as run parameters and copied into every bundle. A URL with a password comes from an
environment variable or from a file an environment variable names (``METAREC_FEEDBACK_URL`` /
``METAREC_FEEDBACK_URL_FILE``, ``METAREC_TRACKING_URI`` / ``METAREC_TRACKING_URI_FILE``), as Docker and
Kubernetes secrets are mounted. Anything that prints, logs or raises with a URL passes it through
:func:`redact_url` (one URL) or :func:`redact` (free text, tracebacks included).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

#: The feedback store URL (``serve.feedback_url``), or a file holding it.
FEEDBACK_URL_ENV = "METAREC_FEEDBACK_URL"
#: The MLflow tracking/registry URI (``tracking.uri`` and ``serve.tracking_uri``), or a file holding it.
TRACKING_URI_ENV = "METAREC_TRACKING_URI"
#: What replaces a password.
MASK = "***"

# scheme://netloc: the netloc ends at the path, query, fragment, whitespace or a quote around the URL.
_URL = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<netloc>[^/?#\s'\"<>]*)")
# libpq keyword DSNs (``host=db password=x``) and query parameters (``?password=x``).
_KEYWORD = re.compile(
    r"(?i)(?P<key>\b(?:password|passwd|pwd|secret|token|access_token|api_key)\s*=\s*)(?P<value>[^&;\s'\"]+)"
)


class SecretConfigError(ValueError):
    """A secret's variable and its ``_FILE`` variant are both set, or the secret file is unusable."""


def _mask_netloc(netloc: str) -> str:
    userinfo, at, host = netloc.rpartition("@")
    if not at:
        return netloc
    user, colon, _ = userinfo.partition(":")
    return f"{user}:{MASK}@{host}" if colon else netloc


def redact(text: str) -> str:
    """``text`` with every URL's password (``scheme://user:PASSWORD@host``) and ``password=`` value masked."""
    if "://" in text:
        text = _URL.sub(lambda m: m.group("scheme") + _mask_netloc(m.group("netloc")), text)
    if "=" in text:
        text = _KEYWORD.sub(lambda m: m.group("key") + MASK, text)
    return text


def redact_url(url: str | None) -> str:
    """One URL fit to print or log: its password (and any ``password=`` parameter) masked.

    ``postgresql://metarec:s3cret@db:5432/feedback`` becomes ``postgresql://metarec:***@db:5432/feedback``;
    a URL without credentials comes back unchanged, None as an empty string.
    """
    return "" if url is None else redact(str(url))


def has_password(url: str | None) -> bool:
    """Whether a URL carries a password (in its user info or as a ``password=`` parameter)."""
    return bool(url) and redact_url(url) != url


def read_secret(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """The value of environment variable ``name``, or the content of the file ``<name>_FILE`` names.

    Surrounding whitespace is stripped (secret files usually end in a newline); an empty variable counts
    as unset. Error messages name the variables and the file, never the value.

    Returns:
        The secret, or None when neither variable is set.

    Raises:
        SecretConfigError: Both variables are set, or the file is missing, unreadable or empty.
    """
    env = os.environ if env is None else env
    file_env = f"{name}_FILE"
    value = env.get(name, "").strip()
    file_name = env.get(file_env, "").strip()
    if value and file_name:
        raise SecretConfigError(f"set either {name} or {file_env}, not both")
    if file_name:
        try:
            value = Path(file_name).read_text(encoding="utf-8").strip()
        except OSError as err:
            raise SecretConfigError(f"cannot read {file_env}={file_name}: {err.strerror or err}") from None
        if not value:
            raise SecretConfigError(f"the secret file {file_name} ({file_env}) is empty")
    return value or None


def feedback_url(configured: str, env: Mapping[str, str] | None = None) -> str:
    """The feedback store URL to connect to: ``METAREC_FEEDBACK_URL[_FILE]`` when set, else ``configured``."""
    return read_secret(FEEDBACK_URL_ENV, env) or configured


def tracking_uri(configured: str | None, env: Mapping[str, str] | None = None) -> str:
    """The tracking URI to connect to: ``METAREC_TRACKING_URI[_FILE]`` when set, else ``configured``.

    An empty result means the workspace's own sqlite store (``components.core.tracking.tracking_uri``).
    """
    return read_secret(TRACKING_URI_ENV, env) or (configured or "")


def password_refusal(field: str, url: str, env_name: str) -> str | None:
    """Why a URL from a params file must not be used (it holds a password), or None when it is fine."""
    if not has_password(url):
        return None
    return (
        f"{field} holds a password ({redact_url(url)}); params.yaml is committed, logged to MLflow and "
        f"copied into bundles, so credentials come from the environment: set {env_name} (or "
        f"{env_name}_FILE, a file holding the URL) and leave the password out of {field}"
    )


class RedactingFilter(logging.Filter):
    """Masks URL passwords in a record's message and traceback before any handler formats it.

    Attach it to a logger (``logger.addFilter``): it then applies to every record logged on that logger.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drops it."""
        redact_record(record)
        return True


def redact_record(record: logging.LogRecord) -> None:
    """Mask URL passwords in ``record``'s message, arguments and traceback, in place."""
    try:
        message = record.getMessage()
    except (TypeError, ValueError):  # a broken format string: leave it for the handler to report
        return
    masked = redact(message)
    if masked != message:
        record.msg, record.args = masked, ()
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
