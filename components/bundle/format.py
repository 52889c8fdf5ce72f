"""The exported bundle's manifest: ``bundle.json`` lists every other file with its sha256.

A bundle is a directory written by the export stage and registered as one model version. Its
``bundle.json`` is::

    {"format": "metarec-bundle/1",
     "files": {"encoder.onnx": "<sha256 hex>", ...every other file, posix relative paths...},
     "metrics": {"warm": {...}, "cold": {...}, "parity": {...}, "latency": {...}},
     "config": {...}, "data_version": {...}, "git_commit": "...", "model_card": "markdown"}

:func:`write_manifest` is the export stage's last step; :func:`verify_bundle` is what the registry
and the serving model run before trusting a bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

MANIFEST = "bundle.json"
_TMP = f".{MANIFEST}.tmp"
FORMAT = "metarec-bundle/1"
# Fields besides format/files that every manifest carries, with the JSON type each must have.
REQUIRED_FIELDS: dict[str, type] = {
    "metrics": dict,
    "config": dict,
    "data_version": dict,
    "git_commit": str,
    "model_card": str,
}
_CHUNK = 1 << 20
# Copied into a bundle from the model directory as is (all plain JSON/NumPy, no pickle).
MODEL_FILES = ("model.json", "features.json", "features.npz", "profiles.npz")


class BundleError(ValueError):
    """A bundle directory whose manifest or files do not match."""


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of a file, read in chunks so ONNX files need not fit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` except the manifest: posix relative path -> sha256."""
    found = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            rel = path.relative_to(directory).as_posix()
            if rel not in (MANIFEST, _TMP):
                found[rel] = file_sha256(path)
    return found


def _check_fields(fields: dict[str, Any], where: str) -> None:
    for key, kind in REQUIRED_FIELDS.items():
        if key not in fields:
            raise BundleError(f"{where}: missing field {key!r}")
        if not isinstance(fields[key], kind):
            raise BundleError(f"{where}: field {key!r} must be a {kind.__name__}")


def _safe_relative(rel: str, where: str) -> None:
    # A manifest must not point the verifier outside the bundle (../../etc/passwd).
    pure = PurePosixPath(rel)
    if not rel or pure.is_absolute() or ".." in pure.parts or "\\" in rel:
        raise BundleError(f"{where}: file path {rel!r} is not a relative path inside the bundle")


def write_manifest(directory: str | Path, **fields: Any) -> dict[str, Any]:
    """Hash every file of a bundle directory and write its ``bundle.json``.

    Args:
        directory: The bundle directory, with all its files already written.
        **fields: The manifest's other fields: ``metrics``, ``config``, ``data_version``, ``git_commit``
            and ``model_card`` (required), plus any extra JSON-serialisable ones.

    Returns:
        The manifest as written.

    Raises:
        BundleError: A required field is missing or mistyped, or ``format``/``files`` were passed.
    """
    root = Path(directory)
    if not root.is_dir():
        raise BundleError(f"{root}: not a directory")
    reserved = {"format", "files"} & fields.keys()
    if reserved:
        raise BundleError(f"write_manifest computes {sorted(reserved)} itself; do not pass them")
    _check_fields(fields, str(root / MANIFEST))
    manifest = {"format": FORMAT, "files": _files(root), **fields}
    text = json.dumps(manifest, indent=2, sort_keys=False, allow_nan=False) + "\n"
    # Write then rename: a crash never leaves a half-written manifest that later fails as "corrupt".
    tmp = root / _TMP
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, root / MANIFEST)
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and shape-check a bundle's ``bundle.json`` without hashing its files.

    Raises:
        BundleError: The manifest is missing, not JSON, of another format, or lacks a field.
    """
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path}: missing; not a metarec bundle") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{path}: format {found!r}, expected {FORMAT!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path}: 'files' must be a non-empty mapping of path -> sha256")
    _check_fields(manifest, str(path))
    return manifest


def verify_bundle(directory: str | Path) -> dict[str, Any]:
    """Check a bundle against its manifest and return the manifest.

    Every listed file must exist with the listed sha256, and no unlisted file may be present (an
    unlisted file would be served without ever having been checked).

    Raises:
        BundleError: Naming the first offending file, with expected and actual hashes for a mismatch.
    """
    root = Path(directory)
    manifest = read_manifest(root)
    listed: dict[str, Any] = manifest["files"]
    for rel, expected in listed.items():
        _safe_relative(rel, str(root / MANIFEST))
        path = root / rel
        if not path.is_file():
            raise BundleError(f"{path}: listed in {MANIFEST} but missing")
        actual = file_sha256(path)
        if actual != expected:
            raise BundleError(f"{path}: sha256 mismatch, expected {expected}, got {actual}")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST}
    extra = sorted(present - listed.keys())
    if extra:
        raise BundleError(f"{root / extra[0]}: not listed in {MANIFEST} ({len(extra)} unlisted file(s))")
    return manifest
