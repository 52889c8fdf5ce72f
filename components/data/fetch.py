"""Fetch stage: materialise the raw RecBole atomic files inside the workspace.

The default dataset (MovieLens-100k with its KB4Rec Freebase KG) is taken at run time from the
``recbole==1.2.1`` wheel on PyPI. Its licence forbids redistribution, so it is never committed; the
wheel and every file in it are checked against pinned sha256 sums before use.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from components.core.storage import atomic_dir, sha256_file

RECBOLE_VERSION = "1.2.1"
RECBOLE_WHEEL = f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
ML100K_PREFIX = "recbole/dataset_example/ml-100k/"
ML100K_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.kg": "200a0636fa07c218119a42e5bac7aa3e26e3665a6f919c1b22909bd412b14779",
    "ml-100k.link": "524dca2c3d62619688ab99b3ec53ea2acb9b64d38eafec3e02bdd0dc6bb7d948",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
# Suffixes of the RecBole atomic files a dataset directory may hold.
ATOMIC_SUFFIXES = (".inter", ".item", ".user", ".kg", ".link", ".train.inter", ".valid.inter", ".test.inter")


class FetchError(RuntimeError):
    """The raw data could not be obtained or failed its checksum."""


@dataclass(frozen=True)
class FetchResult:
    """What the fetch stage wrote."""

    directory: Path
    files: dict[str, str]  # file name -> sha256


def cache_dir() -> Path:
    """Return the download cache (``$METAREC_CACHE_DIR`` or ``~/.cache/metarec``)."""
    return Path(os.environ.get("METAREC_CACHE_DIR", Path.home() / ".cache" / "metarec"))


def download_recbole_wheel(cache: Path | None = None) -> Path:
    """Download the recbole wheel with pip (no dependencies) into the cache and verify it."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / RECBOLE_WHEEL
    if wheel.exists() and sha256_file(wheel) == RECBOLE_WHEEL_SHA256:
        return wheel
    wheel.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(cache),
        f"recbole=={RECBOLE_VERSION}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.exists():
        raise FetchError(
            f"could not download recbole=={RECBOLE_VERSION} from PyPI:\n{proc.stderr.strip()[-2000:]}"
        )
    digest = sha256_file(wheel)
    if digest != RECBOLE_WHEEL_SHA256:
        wheel.unlink(missing_ok=True)
        raise FetchError(f"{RECBOLE_WHEEL}: sha256 {digest} does not match the pinned {RECBOLE_WHEEL_SHA256}")
    return wheel


def extract_ml100k(wheel: Path, dest: Path) -> FetchResult:
    """Extract the five ml-100k atomic files from the wheel into ``dest``, verifying each checksum."""
    with atomic_dir(dest) as tmp, zipfile.ZipFile(wheel) as archive:
        for name, expected in ML100K_SHA256.items():
            data = archive.read(ML100K_PREFIX + name)
            digest = hashlib.sha256(data).hexdigest()
            if digest != expected:
                raise FetchError(f"{wheel.name}!{ML100K_PREFIX}{name}: sha256 {digest} != pinned {expected}")
            (tmp / name).write_bytes(data)
    return FetchResult(dest, dict(ML100K_SHA256))


def dataset_files(src: Path, name: str) -> list[Path]:
    """List the atomic files of dataset ``name`` in ``src``."""
    return sorted(p for p in (src / f"{name}{s}" for s in ATOMIC_SUFFIXES) if p.is_file())


def copy_dataset(src: Path, name: str, dest: Path) -> FetchResult:
    """Copy a user-supplied dataset's atomic files into the workspace."""
    if not src.is_dir():
        raise FetchError(f"data.path {src}: not a directory")
    files = dataset_files(src, name)
    if not files:
        raise FetchError(
            f"data.path {src}: no RecBole atomic files named {name}.inter (or {name}.train.inter, ...) found"
        )
    with atomic_dir(dest) as tmp:
        for path in files:
            shutil.copyfile(path, tmp / path.name)
    return FetchResult(dest, {p.name: sha256_file(dest / p.name) for p in files})


def fingerprint(src: str | None, name: str) -> str:
    """Content hash of the source files, so a changed external dataset invalidates the fetch stage."""
    if src is None:
        return hashlib.sha256(RECBOLE_WHEEL_SHA256.encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    for path in dataset_files(Path(src), name):
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()[:16]


def fetch(dest: Path, path: str | None, name: str) -> FetchResult:
    """Materialise dataset ``name`` into ``dest`` from ``path`` or, when None, from the recbole wheel."""
    if path is None:
        if name != "ml-100k":
            raise FetchError(f"data.name={name!r} needs data.path; only ml-100k is available by default")
        return extract_ml100k(download_recbole_wheel(), dest)
    return copy_dataset(Path(path).expanduser().resolve(), name, dest)
