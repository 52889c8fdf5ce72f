"""Ingest: each malformed dataset fails with a precise error; the tiny fixture parses exactly."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from components.core.storage import read_json
from components.data.ingest import (
    IngestError,
    ingest,
    load_dataset,
    natural_order,
    read_atomic,
    read_processed,
)

FIXTURES = Path(__file__).parents[1] / "fixtures"
TINY = FIXTURES / "tiny"
MALFORMED = FIXTURES / "malformed"
CASES: dict[str, dict] = yaml.safe_load((MALFORMED / "cases.yaml").read_text(encoding="utf-8"))["cases"]
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def _write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


# --------------------------------------------------------------------------------------------------
# The malformed corpus


def test_corpus_is_complete() -> None:
    assert len(CASES) >= 14
    on_disk = {p.name for p in MALFORMED.iterdir() if p.is_dir()}
    assert on_disk == set(CASES)
    for name, case in CASES.items():
        assert set(case) == {"file", "line", "message"}, name
        assert case["file"].startswith("bad."), name
        assert case["line"] is None or (isinstance(case["line"], int) and case["line"] >= 1), name
        files = list((MALFORMED / name).iterdir())
        assert files, name
        for path in files:
            assert path.name.startswith("bad."), path
            assert path.read_bytes().count(b"\n") <= 7, path  # header + at most 6 rows


def test_corpus_bytes_survive_git() -> None:
    # The Latin-1 case must reach the parser byte for byte, and the 0-byte case must stay empty.
    assert (MALFORMED / ".gitattributes").read_bytes().split() == [b"*", b"-text"]
    assert b"u\xe9\t" in (MALFORMED / "not_utf8" / "bad.inter").read_bytes()
    assert (MALFORMED / "empty_inter" / "bad.inter").stat().st_size == 0


def _check_message(message: str, case: dict) -> None:
    assert case["file"] in message, message
    if case["line"] is not None:
        # `bad.inter:3` but not `bad.inter:30`
        assert re.search(re.escape(f"{case['file']}:{case['line']}") + r"(?!\d)", message), message
    assert case["message"] in message, message


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_load_dataset(name: str) -> None:
    case = CASES[name]
    with pytest.raises(IngestError) as info:
        load_dataset(MALFORMED / name, "bad")
    _check_message(str(info.value), case)


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_ingest_writes_nothing(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    dest = tmp_path / "processed" / "bad"
    with pytest.raises(IngestError) as info:
        ingest(MALFORMED / name, "bad", dest)
    _check_message(str(info.value), case)
    assert not dest.exists()
    parent = dest.parent
    assert not parent.exists() or list(parent.iterdir()) == []


def test_failed_ingest_keeps_previous_output(tmp_path: Path) -> None:
    dest = tmp_path / "processed"
    ingest(TINY, "tiny", dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    with pytest.raises(IngestError):
        ingest(MALFORMED / "rating_nan", "bad", dest)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed"]


def test_crlf_and_missing_final_newline_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "x.inter"
    path.write_bytes(b"user_id:token\titem_id:token\r\nu1\ti1\r\nu2\ti2")
    table = read_atomic(path, "inter")
    assert table.columns == {"user_id": ["u1", "u2"], "item_id": ["i1", "i2"]}
    assert table.lines == [2, 3]


def test_blank_lines_at_the_end_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "x.inter"
    path.write_bytes(b"user_id:token\titem_id:token\nu1\ti1\nu2\ti2\n\n \r\n\t\n")
    table = read_atomic(path, "inter")
    assert table.columns == {"user_id": ["u1", "u2"], "item_id": ["i1", "i2"]}
    assert table.lines == [2, 3]


def test_blank_line_inside_is_refused_even_with_blank_lines_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "x.inter"
    path.write_bytes(b"user_id:token\titem_id:token\nu1\ti1\n\nu2\ti2\n\n\n")
    with pytest.raises(IngestError, match=r"x\.inter:3: empty line"):
        read_atomic(path, "inter")


def test_header_with_only_blank_lines_has_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "x.inter"
    path.write_bytes(b"user_id:token\titem_id:token\n\n\n")
    with pytest.raises(IngestError, match="has a header but no data rows"):
        read_atomic(path, "inter")


# --------------------------------------------------------------------------------------------------
# The tiny fixture


def _data_rows(path: Path) -> list[list[str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.split("\t") for line in lines[1:]]


@pytest.fixture(scope="module")
def tiny():
    return load_dataset(TINY, "tiny")


def test_tiny_fixture_file_counts() -> None:
    # Counted from the files themselves, so the assertions below are not circular.
    inter = _data_rows(TINY / "tiny.inter")
    assert len(inter) == 30
    assert len({r[0] for r in inter}) == 6
    assert len({r[1] for r in inter}) == 8
    assert len(_data_rows(TINY / "tiny.item")) == 8
    assert len(_data_rows(TINY / "tiny.user")) == 6
    assert len(_data_rows(TINY / "tiny.link")) == 7
    assert len(_data_rows(TINY / "tiny.kg")) == 27


def test_tiny_counts(tiny) -> None:
    assert len(tiny.interactions) == 30
    assert len(tiny.users) == 6
    assert len(tiny.items) == 8
    assert len(tiny.kg) == 27
    assert int(tiny.items.entity_id.notna().sum()) == 7
    # i8 is the one item without a KG entity
    assert tiny.items.loc[tiny.items.entity_id.isna(), "item_id"].tolist() == ["i8"]
    assert dict(zip(tiny.items.item_id[:7], tiny.items.entity_id[:7], strict=True)) == {
        f"i{k}": f"m.i{k}" for k in range(1, 8)
    }


def test_tiny_indexing_natural_order(tiny) -> None:
    assert tiny.items.item_id.tolist() == [f"i{k}" for k in range(1, 9)]
    assert tiny.items["item"].tolist() == list(range(8))
    assert tiny.users.user_id.tolist() == [f"u{k}" for k in range(1, 7)]
    assert tiny.users["user"].tolist() == list(range(6))
    assert tiny.items["item"].dtype == np.int32 and tiny.users["user"].dtype == np.int32
    # attribute columns ride along with the index
    assert tiny.users.set_index("user_id").loc["u5", "age"] == "60"
    assert tiny.items.set_index("item_id").loc["i6", "class"] == "Action Horror"


def test_tiny_interactions_match_file(tiny) -> None:
    inter = tiny.interactions
    assert list(inter.columns) == ["user", "item", "rating", "timestamp"]
    assert inter.user.dtype == np.int32 and inter.item.dtype == np.int32
    assert inter.rating.dtype == np.float64 and inter.timestamp.dtype == np.float64
    rows = _data_rows(TINY / "tiny.inter")
    expected = [(int(u[1:]) - 1, int(i[1:]) - 1, float(r), float(t)) for u, i, r, t in rows]
    got = list(inter.itertuples(index=False, name=None))
    assert got == expected
    assert (inter.index == np.arange(30)).all()


def test_tiny_report(tiny) -> None:
    report = tiny.report
    assert report["dataset"] == "tiny"
    assert report["n_users"] == 6
    assert report["n_items"] == 8
    assert report["n_interactions"] == 30
    assert report["density"] == pytest.approx(30 / 48)
    assert report["n_linked_items"] == 7
    assert report["n_triples"] == 27
    assert report["triples_per_relation"] == {
        "film.director.film": 5,
        "film.film.actor": 8,
        "film.film.directed_by": 5,
        "film.film.language": 7,
        "film.film.prequel": 1,
        "film.film.sequel": 1,
    }
    assert report["has_timestamp"] is True
    assert report["presplit"] is False
    assert report["items_without_interactions"] == 0
    assert report["users_without_interactions"] == 0
    # every user has 5 interactions; items: i1 4, i2 4, i3 3, i4 3, i5 4, i6 4, i7 4, i8 4
    assert report["interactions_per_user"] == {"min": 5.0, "median": 5.0, "mean": 5.0, "p90": 5.0, "max": 5.0}
    per_item = report["interactions_per_item"]
    assert per_item["min"] == 3.0 and per_item["max"] == 4.0
    assert per_item["mean"] == pytest.approx(30 / 8)


def test_parquet_round_trip(tiny, tmp_path: Path) -> None:
    dest = tmp_path / "processed"
    report = ingest(TINY, "tiny", dest)
    assert sorted(p.name for p in dest.iterdir()) == [
        "interactions.parquet",
        "items.parquet",
        "kg.parquet",
        "report.json",
        "users.parquet",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["processed"]  # no temp dir left behind
    inter, users, items, kg = read_processed(dest)
    pd.testing.assert_frame_equal(inter, tiny.interactions)
    pd.testing.assert_frame_equal(users, tiny.users)
    pd.testing.assert_frame_equal(items, tiny.items)
    pd.testing.assert_frame_equal(kg, tiny.kg)
    assert read_json(dest / "report.json") == report == tiny.report


def test_numeric_ids_sort_numerically(tmp_path: Path) -> None:
    src = _write(
        tmp_path / "num",
        {
            "num.inter": "user_id:token\titem_id:token\n10\t10\n2\t1\n1\t2\n",
        },
    )
    ds = load_dataset(src, "num")
    assert ds.items.item_id.tolist() == ["1", "2", "10"]
    assert ds.users.user_id.tolist() == ["1", "2", "10"]
    pairs = list(ds.interactions[["user", "item"]].itertuples(index=False, name=None))
    assert pairs == [(2, 2), (1, 0), (0, 1)]
    # no rating or timestamp field: implicit feedback, no time
    assert (ds.interactions.rating == 1.0).all()
    assert ds.interactions.timestamp.isna().all()
    assert ds.report["has_timestamp"] is False


def test_natural_order() -> None:
    assert natural_order(["10", "2", "1"]) == ["1", "2", "10"]
    assert natural_order(["i10", "i2", "i1"]) == ["i1", "i10", "i2"]  # not all integers: lexicographic
    assert natural_order(["3", "x", "1"]) == ["1", "3", "x"]
    # ids that are equal as integers keep a deterministic order (independent of set iteration order)
    assert natural_order({"1", "01", "001"}) == ["001", "01", "1"]


def test_item_file_adds_items_without_interactions(tmp_path: Path) -> None:
    src = _write(
        tmp_path / "d",
        {
            "d.inter": "user_id:token\titem_id:token\nu1\ti2\n",
            "d.item": "item_id:token\ttitle:token_seq\ni1\tA\ni2\tB\ni3\tC\n",
        },
    )
    ds = load_dataset(src, "d")
    assert ds.items.item_id.tolist() == ["i1", "i2", "i3"]
    assert ds.interactions.item.tolist() == [1]
    assert ds.report["items_without_interactions"] == 2
    assert ds.report["density"] == pytest.approx(1 / 3)


DUP_INTER = INTER_HEADER + (
    "u1\ti1\t1\t300\n"  # line 2: latest
    "u1\ti2\t2\t150\n"
    "u1\ti1\t3\t100\n"  # line 4: earliest
    "u1\ti1\t4\t200\n"
)


@pytest.mark.parametrize(("policy", "rating"), [("first", 3.0), ("last", 1.0)])
def test_duplicates_policy_by_timestamp(tmp_path: Path, policy: str, rating: float) -> None:
    src = _write(tmp_path / "d", {"d.inter": DUP_INTER})
    with pytest.raises(IngestError, match=r"d\.inter:2 and .*d\.inter:4: duplicate interaction"):
        load_dataset(src, "d")
    ds = load_dataset(src, "d", duplicates=policy)
    inter = ds.interactions
    assert len(inter) == 2
    assert (inter.index == np.arange(2)).all()
    kept = inter[(inter.user == 0) & (inter.item == 0)]
    assert kept.rating.tolist() == [rating]
    assert inter[inter.item == 1].rating.tolist() == [2.0]
    assert ds.report["n_interactions"] == 2


@pytest.mark.parametrize(("policy", "rating"), [("first", 1.0), ("last", 3.0)])
def test_duplicates_policy_by_file_order(tmp_path: Path, policy: str, rating: float) -> None:
    src = _write(
        tmp_path / "d",
        {"d.inter": "user_id:token\titem_id:token\trating:float\nu1\ti1\t1\nu1\ti2\t2\nu1\ti1\t3\n"},
    )
    inter = load_dataset(src, "d", duplicates=policy).interactions
    assert sorted(inter.itertuples(index=False, name=None), key=lambda r: r[1])[0][2] == rating
    assert len(inter) == 2


def test_presplit_dataset(tmp_path: Path) -> None:
    src = _write(
        tmp_path / "p",
        {
            "p.train.inter": INTER_HEADER + "u1\ti1\t4\t100\nu2\ti1\t5\t102\n",
            "p.valid.inter": INTER_HEADER + "u1\ti2\t3\t101\n",
            "p.test.inter": INTER_HEADER + "u2\ti3\t2\t103\n",
        },
    )
    ds = load_dataset(src, "p")
    inter = ds.interactions
    assert inter.part.tolist() == ["train", "train", "valid", "test"]
    pairs = list(inter[["user", "item"]].itertuples(index=False, name=None))
    assert pairs == [(0, 0), (1, 0), (0, 1), (1, 2)]
    assert ds.report["presplit"] is True
    dest = tmp_path / "out"
    ingest(src, "p", dest)
    pd.testing.assert_frame_equal(read_processed(dest)[0], inter)
