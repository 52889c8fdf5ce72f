"""Atomic writes: a failure leaves the previous output in place and no temporary files behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.core.storage import atomic_dir, atomic_file, read_json, write_json


def test_atomic_dir_replaces_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_keeps_old_output_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "partial.txt").write_text("half")
        raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "one"
    assert not (target / "partial.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_file_keeps_old_content_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    write_json(target, {"a": 1})
    with pytest.raises(ValueError), atomic_file(target) as handle:
        handle.write("{broken")
        raise ValueError("boom")
    assert read_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
