"""The serving engine source backed by the model registry: ``models:/<name>@<alias>``."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from components.core.config import ServeSettings
from components.core.secrets import redact_url, tracking_uri

#: Overrides where the bundle cache lives when ``serve.cache_dir`` is not set.
CACHE_ENV = "METAREC_CACHE_DIR"


def cache_root(configured: str | None = None) -> Path:
    """metarec's cache directory: ``configured``, else ``$METAREC_CACHE_DIR``, else the user's XDG cache.

    The XDG cache is ``$XDG_CACHE_HOME/metarec`` (``~/.cache/metarec`` when that is unset or relative, as
    the XDG spec says), so two users of one host never share it.
    """
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "metarec"


def registry_key(tracking_uri: str, model_name: str) -> str:
    """The cache subdirectory of one registered model of one registry (version numbers are per model).

    The URI's password is masked first: it does not name another registry, and a hash of it on disk
    would be a password hash anyone with the path could attack offline.
    """
    return hashlib.sha256(f"{redact_url(tracking_uri)}\0{model_name}".encode()).hexdigest()[:16]


def private_dir(path: Path) -> Path:
    """``path`` as a directory only this user can read or write (0700), created as needed.

    Missing components are created 0700. The directory itself must belong to this user; a looser mode
    is tightened (a cache other users can write to could hand this server a planted bundle).

    Raises:
        PermissionError: The directory belongs to another user, or is not a directory.
    """
    path = Path(path).absolute()
    missing = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another worker created it in between
            directory.mkdir(mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"bundle cache {path} is not a directory (a link or a file is refused)")
    uid = os.geteuid() if hasattr(os, "geteuid") else None
    if uid is not None and info.st_uid != uid:
        raise PermissionError(
            f"bundle cache {path} belongs to uid {info.st_uid}, not to this user (uid {uid}); "
            f"set serve.cache_dir or {CACHE_ENV} to a directory of your own"
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        path.chmod(0o700)
    return path


class RegistrySource:
    """Resolves the served alias and loads verified bundles of registered versions.

    ``current_version`` is one registry call (every ``poll_seconds`` in every worker); ``load``
    downloads the version's bundle into a per-version cache directory, verifies it against its
    manifest and the digest registered with the version (a version without one is refused) and opens
    its ONNX sessions. A download is written to a temporary sibling and renamed, so a crash never leaves
    a half-downloaded version that a later load would trust.

    The cache is ``<cache root>/bundles/<registry key>/<version>`` (:func:`cache_root`,
    :func:`registry_key`): per user, per registry and registered model, and 0700.
    """

    def __init__(self, settings: ServeSettings, cache_dir: Path | None = None) -> None:
        """Bind to the settings' registry; ``cache_dir`` replaces :func:`cache_root` (tests)."""
        from mlflow import MlflowClient

        self.settings = settings
        self.tracking_uri = tracking_uri(settings.tracking_uri) or None
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        root = Path(cache_dir) if cache_dir is not None else cache_root(settings.cache_dir)
        key = registry_key(self.tracking_uri or "", settings.model_name)
        self.cache = private_dir(root / "bundles" / key)

    def current_version(self) -> str | None:
        """The version the alias points at, or None when the alias (or the model) does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(self.settings.model_name, self.settings.alias)
        except MlflowException:
            return None
        return str(mv.version)

    def load(self, version: str) -> Any:
        """Download (once), verify and load one version's bundle."""
        from components.bundle.engine import load_bundle
        from components.bundle.format import BundleError, verify_bundle
        from components.core.config import Config
        from registry.store import Registry, check_registered_digest

        target = self.cache / str(version)
        bundle = target / "bundle"
        if not (bundle / "bundle.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=self.cache))
            try:
                cfg = Config.model_validate(
                    {
                        "tracking": {"uri": self.tracking_uri or ""},
                        "registry": {"name": self.settings.model_name},
                    }
                )
                # Verified there: against the manifest and the registered digest.
                local, _ = Registry(Path("."), cfg).download_bundle(version, tmp / "download")
                local.rename(tmp / "bundle")
                shutil.rmtree(tmp / "download", ignore_errors=True)
                _install(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        verify_bundle(bundle)  # also when cached: a file altered on disk must not be served
        registered = self.client.get_model_version(self.settings.model_name, str(version))
        try:
            check_registered_digest(registered, bundle)
        except BundleError as exc:
            raise BundleError(f"cached bundle {bundle}: {exc}") from None
        engine = load_bundle(
            bundle,
            version=str(version),
            threads=self.settings.threads,
            provider=self.settings.execution_provider,
        )
        if registered.creation_timestamp:  # MLflow ms -> metarec_model_created_timestamp_seconds (alerts)
            engine.created_at = registered.creation_timestamp / 1000
        return engine


def _install(tmp: Path, target: Path) -> None:
    """Rename a verified download to ``target`` unless another process installed that version first.

    Instances (or workers) sharing the cache download a new champion at the same moment; removing the
    winner's directory would pull the files from under its load, so the later download is dropped instead.
    """
    for _ in range(2):
        try:
            tmp.rename(target)
            return
        except OSError:
            if (target / "bundle" / "bundle.json").exists():
                shutil.rmtree(tmp, ignore_errors=True)  # the same version, verified when it is loaded
                return
            shutil.rmtree(target, ignore_errors=True)  # a leftover without a complete bundle
    tmp.rename(target)


def registry_source(settings: ServeSettings) -> RegistrySource:
    """The ``serve.source`` entry point: ``registry.source:registry_source``."""
    return RegistrySource(settings)
