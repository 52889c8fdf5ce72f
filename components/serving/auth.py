"""API-key authentication: where the key comes from, how it is compared, and what a refusal looks like."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Mapping

from fastapi import HTTPException, Request

from components.core import secrets

log = logging.getLogger(__name__)

KEY_ENV = "METAREC_API_KEY"
KEY_FILE_ENV = "METAREC_API_KEY_FILE"
KEY_HEADER = "X-API-Key"


class ApiKeyConfigError(ValueError):
    """The API key settings are contradictory or the key file is unusable."""


def load_api_key(env: Mapping[str, str] | None = None) -> str | None:
    """Read the API key from ``METAREC_API_KEY`` or the file ``METAREC_API_KEY_FILE`` names.

    Surrounding whitespace is stripped (secret files usually end in a newline). An empty
    ``METAREC_API_KEY`` counts as unset, as shells make it easy to export one by accident.

    Returns:
        The key, or None when neither variable is set.

    Raises:
        ApiKeyConfigError: Both variables are set, or the file is missing, unreadable or empty.
    """
    try:
        return secrets.read_secret(KEY_ENV, env)
    except secrets.SecretConfigError as err:
        raise ApiKeyConfigError(str(err)) from None


def fingerprint(key: str) -> str:
    """First 8 hex digits of the key's SHA-256: enough to tell keys apart in logs, useless to an attacker."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


def _digest(raw: bytes) -> bytes:
    # Comparing fixed-size digests hides the key's length as well as its content from timing.
    return hashlib.sha256(raw).digest()


class ApiKeyAuth:
    """Checks the API key on writes (always, when a key is configured) and optionally on reads.

    Without a configured key, writes are refused with 503 unless ``allow_anonymous_writes`` is set: a
    server that silently accepted anyone's feedback would let anyone poison the training data, so the
    unsafe mode has to be asked for by name (local demos). 503 rather than 401/403 because no key the
    client could send would help; the operator has to configure one.

    The key is taken from the ``X-API-Key`` header or ``Authorization: Bearer <key>``. A missing key is
    answered 401 and a wrong one 403; both are logged with the client address, and a wrong one with its
    fingerprint, never the key itself.
    """

    def __init__(
        self, key: str | None, require_key_for_reads: bool = False, allow_anonymous_writes: bool = False
    ) -> None:
        """Configure the checks.

        Args:
            key: The expected key, or None for none configured.
            require_key_for_reads: Whether recommendation reads need the key too.
            allow_anonymous_writes: Accept writes without a key when none is configured (local demos only).

        Raises:
            ApiKeyConfigError: Reads must be authenticated but no key is configured.
        """
        if require_key_for_reads and key is None:
            raise ApiKeyConfigError(
                f"require_key_for_reads is set but no API key is configured ({KEY_ENV} or {KEY_FILE_ENV})"
            )
        self._digest = _digest(key.encode("utf-8")) if key is not None else None
        self.key_fingerprint = fingerprint(key) if key is not None else None
        self.require_key_for_reads = require_key_for_reads
        self.allow_anonymous_writes = allow_anonymous_writes
        if key is None:
            if allow_anonymous_writes:
                log.warning("no API key configured and allow_anonymous_writes is set: anyone may write")
            else:
                log.warning("no API key configured (%s or %s): writes are refused", KEY_ENV, KEY_FILE_ENV)

    @classmethod
    def from_env(
        cls,
        require_key_for_reads: bool = False,
        allow_anonymous_writes: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> ApiKeyAuth:
        """Build the checks with the key ``load_api_key`` finds."""
        return cls(load_api_key(env), require_key_for_reads, allow_anonymous_writes)

    async def check_read(self, request: Request) -> None:
        """FastAPI dependency for reads: passes unless reads need a key and the right one is absent."""
        if self.require_key_for_reads:
            self._check(request, "read")

    async def check_write(self, request: Request) -> None:
        """FastAPI dependency for writes: needs the key, or refuses when none is configured."""
        if self._digest is None:
            if self.allow_anonymous_writes:
                return
            raise HTTPException(
                status_code=503,
                detail=(
                    f"writes are disabled: the server has no API key configured (set {KEY_ENV} or "
                    f"{KEY_FILE_ENV}, or allow_anonymous_writes for a local demo)"
                ),
            )
        self._check(request, "write")

    def _check(self, request: Request, kind: str) -> None:
        presented = _presented_key(request)
        client = request.client.host if request.client else "unknown"
        where = f"{request.method} {request.url.path}"
        if presented is None:
            log.warning("401 missing API key for %s %s from %s", kind, where, client)
            raise HTTPException(
                status_code=401,
                detail=f"missing API key: send it in the {KEY_HEADER} header or Authorization: Bearer <key>",
                headers={"WWW-Authenticate": 'Bearer realm="metarec"'},
            )
        # Starlette decodes headers as latin-1, so encoding back to latin-1 recovers the bytes sent.
        raw = presented.encode("latin-1")
        assert self._digest is not None
        if not hmac.compare_digest(_digest(raw), self._digest):
            shown = hashlib.sha256(raw).hexdigest()[:8]
            log.warning("403 wrong API key (fingerprint %s) for %s %s from %s", shown, kind, where, client)
            raise HTTPException(status_code=403, detail="wrong API key")


def _presented_key(request: Request) -> str | None:
    value = request.headers.get(KEY_HEADER)
    if value:
        return value.strip()
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None
