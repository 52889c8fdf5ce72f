"""Ingest stage: parse and validate RecBole atomic files into typed Parquet tables.

Every problem is reported as ``file:line: field: what was expected``; nothing is written unless the
whole dataset validates (the output directory is built in a temporary sibling and renamed at the end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.core.storage import atomic_dir, write_json

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")

# Fields each file must have, with the type they must be declared as.
REQUIRED: dict[str, dict[str, str]] = {
    "inter": {"user_id": "token", "item_id": "token"},
    "item": {"item_id": "token"},
    "user": {"user_id": "token"},
    "kg": {"head_id": "token", "relation_id": "token", "tail_id": "token"},
    "link": {"item_id": "token", "entity_id": "token"},
}
# Optional fields whose type is fixed when present.
TYPED: dict[str, str] = {"rating": "float", "timestamp": "float"}
SPLIT_PARTS = ("train", "valid", "test")


class IngestError(ValueError):
    """A dataset file that does not follow the RecBole atomic format or fails validation."""


@dataclass
class AtomicTable:
    """One parsed atomic file: columns by field name plus the source line of each row."""

    path: Path
    fields: list[str]
    types: dict[str, str]
    columns: dict[str, list[Any]]
    lines: list[int] = field(default_factory=list)

    def frame(self) -> pd.DataFrame:
        """Return the table as a DataFrame (token columns as str, float columns as float64)."""
        data = {}
        for name in self.fields:
            values = self.columns[name]
            data[name] = np.asarray(values, dtype=np.float64) if self.types[name] == "float" else values
        return pd.DataFrame(data)


def _fail(path: Path, line: int | None, message: str) -> IngestError:
    where = f"{path}:{line}" if line is not None else str(path)
    return IngestError(f"{where}: {message}")


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise _fail(path, None, "file is empty; expected a header line `field:type<TAB>...` and rows")
    try:
        # utf-8-sig drops a leading byte-order mark, which would otherwise corrupt the first field name.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise _fail(
            path, line, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None


def _parse_header(path: Path, header: str) -> tuple[list[str], dict[str, str]]:
    fields: list[str] = []
    types: dict[str, str] = {}
    for column, spec in enumerate(header.split("\t"), start=1):
        name, sep, kind = spec.strip().partition(":")
        if not sep or not name:
            raise _fail(
                path, 1, f"header column {column} {spec!r}: expected `name:type` with type in {FIELD_TYPES}"
            )
        if kind not in FIELD_TYPES:
            raise _fail(
                path, 1, f"header field {name!r}: unknown type {kind!r}; expected one of {FIELD_TYPES}"
            )
        if name in types:
            raise _fail(path, 1, f"header field {name!r} appears twice")
        fields.append(name)
        types[name] = kind
    return fields, types


def read_atomic(path: Path, kind: str) -> AtomicTable:
    """Parse one atomic file of the given kind (inter, item, user, kg, link) with full validation."""
    text = _decode(path)
    rows = text.split("\n")
    # Trailing blank lines (an editor's extra newline) end the file; a blank line between rows is refused.
    while len(rows) > 1 and not rows[-1].strip():
        rows.pop()
    fields, types = _parse_header(path, rows[0].rstrip("\r"))
    for name, kind_required in REQUIRED[kind].items():
        if name not in types:
            raise _fail(
                path, 1, f"header lacks required field `{name}:{kind_required}` (has {', '.join(fields)})"
            )
    for name, declared in types.items():
        expected = REQUIRED[kind].get(name) or (TYPED.get(name) if kind == "inter" else None)
        if expected and declared != expected:
            raise _fail(path, 1, f"header field {name!r} is declared {declared!r}; expected {expected!r}")
    if len(rows) < 2:
        raise _fail(path, None, "has a header but no data rows")
    required = set(REQUIRED[kind])
    columns: dict[str, list[Any]] = {name: [] for name in fields}
    lines: list[int] = []
    width = len(fields)
    for number, row in enumerate(rows[1:], start=2):
        row = row.rstrip("\r")
        if not row.strip():
            raise _fail(path, number, "empty line; expected a data row")
        values = row.split("\t")
        if len(values) != width:
            raise _fail(
                path,
                number,
                f"expected {width} tab-separated columns ({', '.join(fields)}), got {len(values)}",
            )
        for name, value in zip(fields, values, strict=True):
            kind_of = types[name]
            if kind_of == "float":
                columns[name].append(_parse_float(path, number, name, value))
            else:
                if name in required and not value.strip():
                    raise _fail(path, number, f"field {name!r} is empty; expected a {kind_of}")
                columns[name].append(value.strip() if kind_of == "token" else value)
        lines.append(number)
    return AtomicTable(path, fields, types, columns, lines)


def _parse_float(path: Path, line: int, name: str, value: str) -> float:
    try:
        if "_" in value:  # float() accepts "1_000"; a data file should not
            raise ValueError(value)
        number = float(value)
    except ValueError:
        raise _fail(path, line, f"field {name!r}: expected a float, got {value!r}") from None
    if not math.isfinite(number):
        raise _fail(path, line, f"field {name!r}: expected a finite float, got {value!r}")
    return number


def natural_order(ids: list[str] | set[str]) -> list[str]:
    """Sort ids numerically when they are all integers (1, 2, 10), else lexicographically."""
    unique = set(ids)
    try:
        return sorted(unique, key=lambda s: (int(s), s))  # ties ("1", "01") by text: deterministic
    except ValueError:
        return sorted(unique)


@dataclass
class Dataset:
    """The validated, indexed dataset as written to ``data/processed``."""

    interactions: pd.DataFrame  # user, item (int indices), rating, timestamp[, part]
    users: pd.DataFrame  # user (index), user_id, attributes...
    items: pd.DataFrame  # item (index), item_id, entity_id, attributes...
    kg: pd.DataFrame  # head_id, relation_id, tail_id
    report: dict[str, Any]


def _dedupe(frame: pd.DataFrame, policy: str, path_label: str) -> pd.DataFrame:
    dup = frame.duplicated(["user_id", "item_id"], keep=False)
    if not dup.any():
        return frame
    if policy == "error":
        first = frame[dup].iloc[0]
        same = frame.index[(frame.user_id == first.user_id) & (frame.item_id == first.item_id)]
        line_of = frame["_line"].to_numpy() if "_line" in frame else None
        where = [f"{frame.loc[i, '_file']}:{line_of[i]}" for i in same[:2]] if line_of is not None else []
        raise IngestError(
            f"{' and '.join(where) or path_label}: duplicate interaction user_id={first.user_id!r} "
            f"item_id={first.item_id!r}; set data.duplicates=first|last to keep one"
        )
    order = ["timestamp"] if "timestamp" in frame else []
    frame = frame.sort_values(order + ["_line"], kind="stable") if order else frame
    return frame.drop_duplicates(["user_id", "item_id"], keep=policy)


def load_dataset(src: Path, name: str, duplicates: str = "error") -> Dataset:
    """Parse, validate and index every atomic file of dataset ``name`` in ``src``."""
    files = {kind: src / f"{name}.{kind}" for kind in ("inter", "item", "user", "kg", "link")}
    split_files = {part: src / f"{name}.{part}.inter" for part in SPLIT_PARTS}
    present = [p for p in split_files.values() if p.exists()]
    if present and len(present) != 3:
        missing = [str(p) for p in split_files.values() if not p.exists()]
        raise IngestError(f"{src}: pre-split dataset is missing {', '.join(missing)}")
    if present and files["inter"].exists():
        raise IngestError(
            f"{src}: both {files['inter'].name} and pre-split .train/.valid/.test.inter exist; keep one"
        )
    if not present and not files["inter"].exists():
        raise IngestError(f"{src}: required file {files['inter'].name} not found")

    frames = []
    sources = [(None, files["inter"])] if not present else list(split_files.items())
    inter_fields: list[str] | None = None
    for part, path in sources:
        table = read_atomic(path, "inter")
        if inter_fields is not None and table.fields != inter_fields:
            raise _fail(path, 1, f"header {table.fields} differs from the other split files' {inter_fields}")
        inter_fields = table.fields
        frame = table.frame()
        frame["_line"] = table.lines
        frame["_file"] = str(path)
        if part is not None:
            frame["part"] = part
        frames.append(frame)
    inter = pd.concat(frames, ignore_index=True)
    inter = _dedupe(inter, duplicates, str(src))

    item_meta = read_atomic(files["item"], "item").frame() if files["item"].exists() else None
    user_meta = read_atomic(files["user"], "user").frame() if files["user"].exists() else None
    for meta, key, label in ((item_meta, "item_id", "item"), (user_meta, "user_id", "user")):
        if meta is not None and meta[key].duplicated().any():
            row = int(np.flatnonzero(meta[key].duplicated().to_numpy())[0]) + 2
            raise _fail(files[label], row, f"duplicate {key} {meta[key].iloc[row - 2]!r}")
        if meta is not None:
            unknown = ~inter[key].isin(set(meta[key]))
            if unknown.any():
                bad = inter[unknown].iloc[0]
                raise _fail(
                    Path(bad["_file"]),
                    int(bad["_line"]),
                    f"{key} {bad[key]!r} is not listed in {files[label].name}",
                )

    item_ids = natural_order(
        set(inter.item_id) | (set(item_meta.item_id) if item_meta is not None else set())
    )
    user_ids = natural_order(
        set(inter.user_id) | (set(user_meta.user_id) if user_meta is not None else set())
    )
    items = pd.DataFrame({"item": np.arange(len(item_ids), dtype=np.int32), "item_id": item_ids})
    users = pd.DataFrame({"user": np.arange(len(user_ids), dtype=np.int32), "user_id": user_ids})
    if item_meta is not None:
        items = items.merge(item_meta, on="item_id", how="left")
    if user_meta is not None:
        users = users.merge(user_meta, on="user_id", how="left")

    items["entity_id"] = None
    if files["link"].exists():
        link_table = read_atomic(files["link"], "link")
        link = link_table.frame()
        known, seen = set(item_ids), set()
        for item_id, line in zip(link.item_id, link_table.lines, strict=True):
            if item_id not in known:
                raise _fail(
                    files["link"], line, f"item_id {item_id!r} is not a known item (not in .inter or .item)"
                )
            if item_id in seen:
                raise _fail(files["link"], line, f"item_id {item_id!r} is linked twice")
            seen.add(item_id)
        items["entity_id"] = items.item_id.map(dict(zip(link.item_id, link.entity_id, strict=True)))
    kg = (
        read_atomic(files["kg"], "kg").frame()
        if files["kg"].exists()
        else pd.DataFrame({"head_id": [], "relation_id": [], "tail_id": []}, dtype=str)
    )

    user_index = dict(zip(users.user_id, users.user, strict=True))
    item_index = dict(zip(items.item_id, items.item, strict=True))
    out = pd.DataFrame(
        {
            "user": inter.user_id.map(user_index).astype(np.int32),
            "item": inter.item_id.map(item_index).astype(np.int32),
            "rating": inter["rating"].astype(np.float64) if "rating" in inter else 1.0,
            "timestamp": inter["timestamp"].astype(np.float64) if "timestamp" in inter else np.nan,
        }
    )
    if "part" in inter:
        out["part"] = inter["part"].to_numpy()
    out = out.reset_index(drop=True)
    report = data_report(name, out, users, items, kg)
    return Dataset(out, users, items, kg, report)


def data_report(
    name: str, inter: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame, kg: pd.DataFrame
) -> dict[str, Any]:
    """Summarise the dataset: sizes, density, activity distributions, KG triples per relation."""
    per_user = inter.groupby("user").size().reindex(users.user, fill_value=0)
    per_item = inter.groupby("item").size().reindex(items.item, fill_value=0)

    def dist(series: pd.Series) -> dict[str, float]:
        return {
            "min": float(series.min()),
            "median": float(series.median()),
            "mean": float(series.mean()),
            "p90": float(series.quantile(0.9)),
            "max": float(series.max()),
        }

    n_u, n_i, n = len(users), len(items), len(inter)
    return {
        "dataset": name,
        "n_users": n_u,
        "n_items": n_i,
        "n_interactions": n,
        "density": n / (n_u * n_i) if n_u and n_i else 0.0,
        "interactions_per_user": dist(per_user),
        "interactions_per_item": dist(per_item),
        "items_without_interactions": int((per_item == 0).sum()),
        "users_without_interactions": int((per_user == 0).sum()),
        "n_linked_items": int(items.entity_id.notna().sum()),
        "n_triples": len(kg),
        "triples_per_relation": {
            str(k): int(v) for k, v in kg.relation_id.value_counts().sort_index().items()
        },
        "has_timestamp": bool(inter.timestamp.notna().all()),
        "presplit": "part" in inter,
    }


def write_dataset(dataset: Dataset, dest: Path) -> None:
    """Write the processed tables and report atomically into ``dest``."""
    with atomic_dir(dest) as tmp:
        dataset.interactions.to_parquet(tmp / "interactions.parquet", index=False)
        dataset.users.to_parquet(tmp / "users.parquet", index=False)
        dataset.items.to_parquet(tmp / "items.parquet", index=False)
        dataset.kg.to_parquet(tmp / "kg.parquet", index=False)
        write_json(tmp / "report.json", dataset.report)


def read_processed(src: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Read (interactions, users, items, kg) written by :func:`write_dataset`."""
    return tuple(pd.read_parquet(src / f"{n}.parquet") for n in ("interactions", "users", "items", "kg"))


def ingest(raw: Path, name: str, dest: Path, duplicates: str = "error") -> dict[str, Any]:
    """Validate the raw dataset and write processed Parquet tables; return the data report."""
    dataset = load_dataset(raw, name, duplicates)
    write_dataset(dataset, dest)
    return dataset.report
