"""The serving side of the registry's trust: a private bundle cache per user and per registry, and no
bundle served or promoted without the digest registered with its version."""

from __future__ import annotations

import os
import stat
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from components.bundle.format import MANIFEST, BundleError, file_sha256, write_manifest
from components.core.config import Config, RegistryConfig, ServeSettings
from registry.source import CACHE_ENV, RegistrySource, cache_root, private_dir, registry_key
from registry.store import DIGEST_TAG, LoggedBundle, Registry, RegistryError


def make_bundle(directory: Path) -> Path:
    """A small bundle whose metrics pass the gate's floors."""
    directory.mkdir(parents=True)
    (directory / "scorer.onnx").write_bytes(os.urandom(128))
    write_manifest(
        directory,
        metrics={
            "warm": {"ndcg@10": 0.3, "recall@10": 0.45},
            "cold": {"recall@20": 0.3},
            "parity": {"max_abs_diff": 1e-5, "int8_mean_cosine": 0.999, "ndcg_rel_diff": 0.001},
            "latency": {"scorer_p99_ms": 10.0},
        },
        config={"seed": 42},
        data_version={"data/split": "s1"},
        git_commit="0123abcd",
        model_card="# metarec bundle",
    )
    return directory


class Shared:
    def __init__(self, ws: Path, logged: LoggedBundle) -> None:
        self.ws = ws
        self.logged = logged

    def registry(self, name: str) -> Registry:
        return Registry(self.ws, Config(registry=RegistryConfig(name=name)))

    def settings(self, name: str, cache: Path) -> ServeSettings:
        uri = Registry(self.ws).uri
        return ServeSettings(model_name=name, alias="challenger", tracking_uri=uri, cache_dir=str(cache))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    root = tmp_path_factory.mktemp("registry-security")
    reg = Registry(root / "ws")
    yield Shared(root / "ws", reg.log_bundle(make_bundle(root / "bundle")))
    tracking_utils._tracking_uri = previous[0]
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if previous[1] is not None:
        os.environ["MLFLOW_TRACKING_URI"] = previous[1]


@pytest.fixture
def stub_engine(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """``components.bundle.engine.load_bundle`` recording the bundle directories it is given."""
    loaded: list[Path] = []

    def load_bundle(path: Path, version: str, threads: int, provider: str = "cpu") -> Any:
        loaded.append(Path(path))
        return types.SimpleNamespace(version=version)

    module = types.ModuleType("components.bundle.engine")
    module.load_bundle = load_bundle  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "components.bundle.engine", module)
    return loaded


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- where the cache lives ---------------------------------------------------------------------------


def test_cache_root_is_per_user_unless_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "metarec"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec ignores relative paths
    assert cache_root() == tmp_path / "home" / ".cache" / "metarec"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "metarec"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(str(tmp_path / "setting")) == tmp_path / "setting"
    # Never the old shared, world-writable default (the temporary directory's metarec-serving).
    assert "metarec-serving" not in cache_root().parts


def test_registry_key_separates_registries_and_models_not_passwords() -> None:
    keys = {
        registry_key("sqlite:////a/mlflow.db", "metarec"),
        registry_key("sqlite:////b/mlflow.db", "metarec"),
        registry_key("sqlite:////a/mlflow.db", "other"),
    }
    assert len(keys) == 3
    # A rotated password is the same registry, and no hash of the password is written to disk.
    assert registry_key("http://u:old@h:5000", "m") == registry_key("http://u:new@h:5000", "m")


def test_private_dir_is_0700_and_refuses_what_it_cannot_trust(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = private_dir(tmp_path / "a" / "b" / "c")
    assert made.is_dir()
    assert mode(tmp_path / "a") == mode(tmp_path / "a" / "b") == mode(made) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    assert mode(private_dir(loose)) == 0o700  # tightened
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PermissionError, match="not a directory"):
        private_dir(tmp_path / "link")
    # Owned by another user (e.g. planted in a shared directory): refused, not adopted.
    monkeypatch.setattr("registry.source.os.geteuid", lambda: made.stat().st_uid + 1)
    with pytest.raises(PermissionError, match=rf"belongs to uid .*{CACHE_ENV}"):
        private_dir(made)


def test_source_caches_per_registry_and_model_in_private_dirs(
    shared: Shared, tmp_path: Path, stub_engine: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("cache-a", "cache-b"):
        shared.registry(name).add_version(shared.logged)
    # No serve.cache_dir: the user's XDG cache, never a shared path under /tmp.
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    settings = shared.settings("cache-a", tmp_path).model_copy(update={"cache_dir": None})
    source = RegistrySource(settings)
    key = registry_key(settings.tracking_uri or "", "cache-a")
    assert source.cache == tmp_path / "xdg" / "metarec" / "bundles" / key
    assert mode(source.cache) == mode(source.cache.parent) == 0o700

    # serve.cache_dir: one directory per (registry, model), each 0700, each version verified there.
    a = RegistrySource(shared.settings("cache-a", tmp_path / "cache"))
    b = RegistrySource(shared.settings("cache-b", tmp_path / "cache"))
    other = RegistrySource(
        ServeSettings(
            model_name="cache-a",
            tracking_uri=f"sqlite:///{tmp_path / 'other.db'}",
            cache_dir=str(tmp_path / "cache"),
        )
    )
    assert len({a.cache, b.cache, other.cache}) == 3
    assert {p.parent for p in (a.cache, b.cache, other.cache)} == {tmp_path / "cache" / "bundles"}
    assert a.current_version() == "1"
    assert a.load("1").version == "1" and b.load("1").version == "1"
    assert stub_engine == [a.cache / "1" / "bundle", b.cache / "1" / "bundle"]
    for source in (a, b):
        assert mode(source.cache) == mode(source.cache / "1") == 0o700
        assert (source.cache / "1" / "bundle" / MANIFEST).is_file()
        assert not [p for p in source.cache.iterdir() if p.name.startswith(".")]  # no temporary left

    # Cached, it is verified again on every load: an altered file is refused, never served.
    scorer = a.cache / "1" / "bundle" / "scorer.onnx"
    scorer.write_bytes(b"planted")
    with pytest.raises(BundleError, match=r"scorer\.onnx"):
        a.load("1")
    assert len(stub_engine) == 2


# ---- the registered digest ---------------------------------------------------------------------------


def test_registered_versions_carry_their_digest(shared: Shared) -> None:
    reg = shared.registry("digest-carried")
    mv = reg.add_version(shared.logged)
    assert mv.tags[DIGEST_TAG] == shared.logged.digest
    assert len(shared.logged.digest) == 64
    broken = LoggedBundle(
        shared.logged.model_uri, shared.logged.model_id, shared.logged.run_id, shared.logged.manifest, ""
    )
    with pytest.raises(RegistryError, match="without its bundle.json sha256"):
        reg.add_version(broken)
    assert [str(v.version) for v in reg.versions()] == ["1"]


def test_a_version_without_its_registered_digest_is_refused(
    shared: Shared, tmp_path: Path, stub_engine: list[Path]
) -> None:
    reg = shared.registry("digest-missing")
    version = str(reg.add_version(shared.logged).version)
    source = RegistrySource(shared.settings("digest-missing", tmp_path / "cache"))
    source.load(version)  # cached while the digest was there
    reg.client.delete_model_version_tag(reg.name, version, DIGEST_TAG)

    # What is missing, on which version, and how to fix it.
    expected = (
        rf"version {version} of 'digest-missing' has no registered digest "
        rf"\(version tag {DIGEST_TAG} is missing\).*Re-register"
    )
    with pytest.raises(BundleError, match=expected):
        reg.verify(version)
    move = reg.promote(version)
    assert not move.moved and "no registered digest" in move.decision.reasons[0]  # type: ignore[union-attr]
    assert reg.aliases().get("champion") is None
    # Serving refuses it too, downloaded afresh or from its cache.
    with pytest.raises(BundleError, match="no registered digest"):
        source.load(version)
    fresh = RegistrySource(shared.settings("digest-missing", tmp_path / "fresh"))
    with pytest.raises(BundleError, match="no registered digest"):
        fresh.load(version)
    assert len(stub_engine) == 1

    # A wrong digest is refused as before, naming both.
    reg.client.set_model_version_tag(reg.name, version, DIGEST_TAG, "0" * 64)
    with pytest.raises(BundleError, match="sha256 mismatch, expected 0{64} \\(registered\\)"):
        reg.verify(version)
    with pytest.raises(BundleError, match="sha256 mismatch"):
        source.load(version)
    # Restored (what re-registering gives a new version), it verifies and serves.
    reg.client.set_model_version_tag(reg.name, version, DIGEST_TAG, shared.logged.digest)
    assert file_sha256(source.cache / version / "bundle" / MANIFEST) == shared.logged.digest
    assert source.load(version).version == version
