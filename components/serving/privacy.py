"""What the serving logs may say: no credentials ever, and user ids as keyed hashes when asked.

:func:`install` puts one :class:`ServingLogFilter` on uvicorn's loggers (the access log's request lines
carry ``/recommendations/<user_id>``) and on metarec's serving loggers. Every record then has URL
passwords masked (``components.core.secrets.redact``), and with ``serve.hash_user_ids`` every user id in
a request path or a ``user_id=`` field is replaced by :func:`pseudonym`: ``uid-`` and the first 16 hex
digits of HMAC-SHA256 under the key in ``METAREC_USER_ID_SALT`` (or the file ``METAREC_USER_ID_SALT_FILE``
names). The same id always maps to the same pseudonym, so one user's requests can still be followed and
counted, in every worker and instance sharing the key; without the key the ids cannot be recovered by
hashing candidate ids. Compute a user's pseudonym to search the logs with
``python -c 'from components.serving.privacy import pseudonym; print(pseudonym("196", b"<key>"))'``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Mapping
from urllib.parse import unquote

from components.core.config import ServeSettings
from components.core.secrets import SecretConfigError, read_secret, redact, redact_record

#: The HMAC key for user-id pseudonyms, or (``METAREC_USER_ID_SALT_FILE``) a file holding it.
SALT_ENV = "METAREC_USER_ID_SALT"
# Shorter keys could be found by trying keys against a known user's pseudonym.
MIN_SALT_CHARS = 16
PREFIX = "uid-"
#: Loggers the filter is put on, besides every ``components.serving.*`` and ``registry.*`` one that exists.
LOGGERS = (
    "uvicorn.access",
    "uvicorn.error",
    "uvicorn",
    "components.serving.app",
    "components.serving.auth",
    "components.serving.feedback",
    "components.serving.holder",
    "components.serving.server",
    "registry.source",
)

# /recommendations/<id>: the id is one path segment (percent-encoded as the client sent it).
_PATH = re.compile(r"(?P<route>/recommendations/)(?P<id>[^/?#\s\"']+)")
# user_id=<id>, user_id: <id>, "user_id": "<id>", 'user_id': '<id>' (reprs of dicts and models).
_FIELD = re.compile(
    r"(?P<key>\buser_id[\"']?\s*[:=]\s*)(?:(?P<q>[\"'])(?P<quoted>.*?)(?P=q)|(?P<bare>[^\s,;&)}\]\"']+))"
)


class UserIdSaltError(SecretConfigError):
    """``serve.hash_user_ids`` is set but no usable key is configured."""


def load_salt(env: Mapping[str, str] | None = None) -> bytes:
    """The pseudonym key from ``METAREC_USER_ID_SALT`` or ``METAREC_USER_ID_SALT_FILE``.

    Raises:
        UserIdSaltError: Neither is set, or the key is shorter than 16 characters.
        SecretConfigError: Both are set, or the file is unreadable or empty.
    """
    salt = read_secret(SALT_ENV, env)
    if salt is None:
        raise UserIdSaltError(
            f"serve.hash_user_ids needs a key: set {SALT_ENV} or {SALT_ENV}_FILE (e.g. from "
            "`openssl rand -hex 32`); every instance whose logs are read together must share it"
        )
    if len(salt) < MIN_SALT_CHARS:
        raise UserIdSaltError(f"{SALT_ENV} is shorter than {MIN_SALT_CHARS} characters; use a random key")
    return salt.encode("utf-8")


def pseudonym(user_id: str, key: bytes) -> str:
    """The keyed hash a user id is logged as: ``uid-`` and 16 hex digits of HMAC-SHA256(key, user_id)."""
    return PREFIX + hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


class ServingLogFilter(logging.Filter):
    """Masks URL passwords in every record and, given a key, replaces user ids by their pseudonyms.

    uvicorn's access records keep their argument tuple (its formatter unpacks it): only the request path
    in it is rewritten. Other records are rewritten to their final message.
    """

    def __init__(self, key: bytes | None = None) -> None:
        """Filter with ``key`` for pseudonyms (None: user ids are left as they are)."""
        super().__init__()
        self.key = key

    def _path(self, match: re.Match[str]) -> str:
        assert self.key is not None
        return match.group("route") + pseudonym(unquote(match.group("id")), self.key)

    def _field(self, match: re.Match[str]) -> str:
        assert self.key is not None
        quote = match.group("q") or ""
        value = match.group("quoted") if quote else match.group("bare")
        return f"{match.group('key')}{quote}{pseudonym(value, self.key)}{quote}"

    def hide_user_ids(self, text: str) -> str:
        """``text`` with the user ids of request paths and ``user_id`` fields replaced (given a key)."""
        if self.key is None or ("user_id" not in text and "/recommendations/" not in text):
            return text
        return _FIELD.sub(self._field, _PATH.sub(self._path, text))

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drops it."""
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) >= 3:
            # (client address, method, path with query, HTTP version, status): see uvicorn's AccessFormatter.
            if isinstance(args[2], str):
                record.args = (*args[:2], self.hide_user_ids(redact(args[2])), *args[3:])
            return True
        redact_record(record)
        if self.key is not None:
            try:
                message = record.getMessage()
            except (TypeError, ValueError):
                return True
            hidden = self.hide_user_ids(message)
            if hidden != message:
                record.msg, record.args = hidden, ()
            user_id = getattr(record, "user_id", None)  # logged with extra={"user_id": ...}
            if isinstance(user_id, str):
                record.user_id = pseudonym(user_id, self.key)
        return True


def install(settings: ServeSettings, env: Mapping[str, str] | None = None) -> ServingLogFilter:
    """Put one filter for ``settings`` on the serving loggers, replacing one an earlier call installed.

    Raises:
        UserIdSaltError: ``settings.hash_user_ids`` without a usable key (nothing is installed then).
    """
    key = load_salt(env) if settings.hash_user_ids else None
    log_filter = ServingLogFilter(key)
    existing = [
        name
        for name in list(logging.root.manager.loggerDict)
        if name.startswith(("components.serving.", "registry.", "uvicorn."))
    ]
    for name in {*LOGGERS, *existing}:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, ServingLogFilter)]:
            logger.removeFilter(old)
        logger.addFilter(log_filter)
    return log_filter
