"""The serving engine source backed by the model registry: ``models:/<name>@<alias>``."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from components.core.config import ServeSettings


class RegistrySource:
    """Resolves the served alias and loads verified bundles of registered versions.

    ``current_version`` is one registry call (every ``poll_seconds`` in every worker); ``load``
    downloads the version's bundle into a per-version cache directory, verifies it against its
    manifest and opens its ONNX sessions. A download is written to a temporary sibling and renamed,
    so a crash never leaves a half-downloaded version that a later load would trust.
    """

    def __init__(self, settings: ServeSettings, cache_dir: Path | None = None) -> None:
        from mlflow import MlflowClient

        self.settings = settings
        self.client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
        root = Path(cache_dir or Path(tempfile.gettempdir()) / "metarec-serving")
        # Version numbers are only unique within one registry: key the cache by its URI too.
        store = hashlib.sha256((settings.tracking_uri or "").encode()).hexdigest()[:12]
        self.cache = root / store / settings.model_name
        self.cache.mkdir(parents=True, exist_ok=True)

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
        from components.bundle.format import BundleError, file_sha256, verify_bundle
        from components.core.config import Config
        from registry.store import Registry

        target = self.cache / str(version)
        bundle = target / "bundle"
        if not (bundle / "bundle.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=self.cache))
            try:
                cfg = Config.model_validate(
                    {
                        "tracking": {"uri": self.settings.tracking_uri or ""},
                        "registry": {"name": self.settings.model_name},
                    }
                )
                local, _ = Registry(Path("."), cfg).download_bundle(version, tmp / "download")
                local.rename(tmp / "bundle")
                shutil.rmtree(tmp / "download", ignore_errors=True)
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        verify_bundle(bundle)  # also when cached: a file altered on disk must not be served
        registered = self.client.get_model_version(self.settings.model_name, str(version)).tags or {}
        expected = registered.get("metarec.bundle_sha256")
        if expected and file_sha256(bundle / "bundle.json") != expected:
            raise BundleError(f"cached bundle {bundle} is not the registered version {version}")
        return load_bundle(bundle, version=str(version), threads=self.settings.threads)


def registry_source(settings: ServeSettings) -> RegistrySource:
    """The ``serve.source`` entry point: ``registry.source:registry_source``."""
    return RegistrySource(settings)
