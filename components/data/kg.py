"""Build stage for the typed heterogeneous graph: a networkx schema plus scipy.sparse instances.

Node types are ``user``, ``item``, one entity type per KG relation and one per user/item attribute.
The schema is a MultiDiGraph over node types whose edges are relations, each present in both
directions (the reverse carries the ``~`` prefix); the instances of a relation are one CSR matrix of
shape (n_src, n_dst). The user→item ``interacted`` relation belongs to the schema, but its instances
come from the training split only (added by :func:`with_interactions`) so no held-out interaction
leaks into metapath features.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
import scipy.sparse as sp

from components.core.storage import atomic_dir, read_json, write_json

INTERACTED = "interacted"
REVERSE = "~"


class GraphError(ValueError):
    """Inputs that cannot form a typed graph."""


@dataclass
class Relation:
    """One directed relation type and its instance matrix."""

    name: str
    src: str
    dst: str
    matrix: sp.csr_matrix
    source: list[str] = field(default_factory=list)  # KG relation ids or metadata fields it came from


@dataclass
class HeteroGraph:
    """Typed heterogeneous graph: node types with their ids, relations with CSR instances."""

    node_ids: dict[str, list[str]]
    relations: dict[str, Relation]

    @property
    def schema(self) -> nx.MultiDiGraph:
        """The type-level graph; each relation appears forward and reversed (``~name``)."""
        graph = nx.MultiDiGraph()
        for node_type, ids in self.node_ids.items():
            graph.add_node(node_type, count=len(ids))
        for rel in self.relations.values():
            nnz = int(rel.matrix.nnz)
            graph.add_edge(rel.src, rel.dst, key=rel.name, relation=rel.name, nnz=nnz, reverse=False)
            graph.add_edge(rel.dst, rel.src, key=REVERSE + rel.name, relation=rel.name, nnz=nnz, reverse=True)
        return graph

    def matrix(self, key: str) -> sp.csr_matrix:
        """Instances of a schema edge key; ``~name`` gives the transpose."""
        if key.startswith(REVERSE):
            return self.relations[key[1:]].matrix.T.tocsr()
        return self.relations[key].matrix

    def summary(self) -> dict[str, Any]:
        """Counts of nodes per type and edges per relation."""
        return {
            "node_types": {t: len(ids) for t, ids in self.node_ids.items()},
            "relations": {
                r.name: {"src": r.src, "dst": r.dst, "edges": int(r.matrix.nnz), "source": r.source}
                for r in self.relations.values()
            },
        }


def binary_matrix(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """A float32 CSR matrix with 1.0 at every (row, col) pair, however often the pair repeats."""
    data = np.ones(len(rows), dtype=np.float32)
    matrix = sp.csr_matrix((data, (rows, cols)), shape=shape)
    matrix.sum_duplicates()
    matrix.data[:] = 1.0  # instances are sets of edges, not multiplicities
    return matrix


def _segment(relation_id: str, position: int) -> str:
    parts = relation_id.split(".")
    return parts[position] if len(parts) >= -position else relation_id


def _add_attribute(
    graph: HeteroGraph,
    table: pd.DataFrame,
    key: str,
    column: str,
    type_name: str,
    src_type: str,
    split_tokens: bool,
) -> None:
    if column not in table:
        raise GraphError(
            f"kg: {src_type} attribute column {column!r} not in the {src_type} table "
            f"(columns: {', '.join(map(str, table.columns))})"
        )
    rows, values = [], []
    for index, raw in zip(table[key], table[column], strict=True):
        if raw is None or (isinstance(raw, float) and np.isnan(raw)):
            continue
        for token in str(raw).split() if split_tokens else [str(raw).strip()]:
            if token:
                rows.append(int(index))
                values.append(token)
    if type_name in graph.node_ids:
        raise GraphError(f"kg: entity type name {type_name!r} is used twice; rename it in params.yaml")
    ids = sorted(set(values))
    position = {v: i for i, v in enumerate(ids)}
    graph.node_ids[type_name] = ids
    name = f"{src_type}.{type_name}"
    matrix = binary_matrix(
        np.asarray(rows, dtype=np.int64),
        np.asarray([position[v] for v in values], dtype=np.int64),
        (len(table), len(ids)),
    )
    graph.relations[name] = Relation(name, src_type, type_name, matrix, [column])


def age_bucket(age: str, edges: list[int]) -> str:
    """Label an age with its bucket, e.g. ``18-24`` for edges [17, 24, ...]."""
    value = int(float(age))
    lower = 0
    for upper in edges:
        if value <= upper:
            return f"{lower}-{upper}"
        lower = upper + 1
    return f"{lower}+"


def build_graph(
    users: pd.DataFrame,
    items: pd.DataFrame,
    kg: pd.DataFrame,
    item_fields: dict[str, str],
    user_fields: dict[str, str],
    age_buckets: list[int],
    type_names: dict[str, str] | None = None,
    optional_item_fields: dict[str, str] | None = None,
) -> tuple[HeteroGraph, dict[str, Any]]:
    """Build the typed graph from processed tables; return it with a build report.

    ``item_fields`` must exist in the items table; ``optional_item_fields`` are used where they do
    and listed under ``skipped_item_fields`` in the report where they do not.
    """
    if users.empty or items.empty:
        raise GraphError("kg: cannot build a graph without users and items")
    type_names = type_names or {}
    graph = HeteroGraph(node_ids={"user": list(users.user_id), "item": list(items.item_id)}, relations={})
    # user->item instances come from the training split; the empty placeholder keeps the schema whole.
    graph.relations[INTERACTED] = Relation(
        INTERACTED, "user", "item", sp.csr_matrix((len(users), len(items)), dtype=np.float32), ["inter"]
    )

    users = users.copy()
    for column, type_name in user_fields.items():
        if column == "age" and column in users:
            try:
                users[column] = [None if pd.isna(a) else age_bucket(a, age_buckets) for a in users[column]]
            except ValueError as exc:
                raise GraphError(f"kg: user attribute 'age' must be numeric to bucket it ({exc})") from None
        _add_attribute(graph, users, "user", column, type_name, "user", split_tokens=False)
    optional = {c: t for c, t in (optional_item_fields or {}).items() if c not in item_fields}
    skipped = [column for column in optional if column not in items]
    present = {c: t for c, t in optional.items() if c not in skipped}
    for column, type_name in {**item_fields, **present}.items():
        _add_attribute(graph, items, "item", column, type_name, "item", split_tokens=True)

    report = _add_kg(graph, items, kg, type_names)
    return graph, {**report, "skipped_item_fields": skipped}


def _add_kg(
    graph: HeteroGraph, items: pd.DataFrame, kg: pd.DataFrame, type_names: dict[str, str]
) -> dict[str, Any]:
    entity_to_item = {
        e: int(i) for e, i in zip(items.entity_id, items.item, strict=True) if isinstance(e, str)
    }
    n_items = len(items)
    heads = kg.head_id.map(entity_to_item)
    tails = kg.tail_id.map(entity_to_item)
    h_item, t_item = heads.notna().to_numpy(), tails.notna().to_numpy()
    dropped = int((~h_item & ~t_item).sum())

    # Normalise each relation to item -> entity pairs whatever side the item was on.
    pairs: dict[str, set[tuple[int, str]]] = {}
    item_pairs: dict[str, set[tuple[int, int]]] = {}
    head_side: Counter[str] = Counter()
    tail_side: Counter[str] = Counter()
    rel = kg.relation_id.to_numpy()
    head_items, tail_items = heads.to_numpy(), tails.to_numpy()  # positional access, not .iat, in the loop
    head_ids, tail_ids = kg.head_id.to_numpy(), kg.tail_id.to_numpy()
    for k in range(len(kg)):
        r = str(rel[k])
        if h_item[k] and t_item[k]:
            item_pairs.setdefault(r, set()).add((int(head_items[k]), int(tail_items[k])))
        elif h_item[k]:
            pairs.setdefault(r, set()).add((int(head_items[k]), str(tail_ids[k])))
            head_side[r] += 1
        elif t_item[k]:
            pairs.setdefault(r, set()).add((int(tail_items[k]), str(head_ids[k])))
            tail_side[r] += 1

    # KG dumps list many relations twice (film.film.directed_by and film.director.film); identical
    # item-entity pair sets are one relation, otherwise metapaths would double-count every instance.
    # A relation whose pairs mostly lie inside a larger one's (film.actor.film: 5 of its 6 pairs are in
    # film.film.actor) is the same relation listed again; its pairs join the larger one.
    groups: dict[str, list[str]] = {}
    union: dict[str, set[tuple[int, str]]] = {}
    for r in sorted(pairs, key=lambda r: (-len(pairs[r]), r)):
        home = next((c for c in groups if len(pairs[r] & pairs[c]) >= 0.8 * len(pairs[r])), None)
        groups.setdefault(home or r, []).append(r)
        union.setdefault(home or r, set()).update(pairs[r])
    merged: list[dict[str, Any]] = []
    for first, members in sorted(groups.items()):
        edge_set = union[first]
        canonical = max(members, key=lambda r: (len(pairs[r]), head_side[r], r))
        tail_named = [r for r in members if tail_side[r] > head_side[r]]
        if canonical in type_names:
            type_name = type_names[canonical]
        elif tail_named:
            type_name = _segment(tail_named[0], -2)
        else:
            type_name = _segment(canonical, -1)
        if type_name in graph.node_ids:
            type_name = canonical
        ids = sorted({e for _, e in edge_set})
        position = {e: i for i, e in enumerate(ids)}
        rows = np.fromiter((i for i, _ in edge_set), dtype=np.int64, count=len(edge_set))
        cols = np.fromiter((position[e] for _, e in edge_set), dtype=np.int64, count=len(edge_set))
        graph.node_ids[type_name] = ids
        graph.relations[canonical] = Relation(
            canonical, "item", type_name, binary_matrix(rows, cols, (n_items, len(ids))), sorted(members)
        )
        merged.append(
            {
                "relation": canonical,
                "entity_type": type_name,
                "merged": sorted(members),
                "edges": len(edge_set),
                "entities": len(ids),
            }
        )

    # Item-item relations (sequel/prequel): drop one that is exactly the reverse of another.
    kept: dict[str, sp.csr_matrix] = {}
    for r in sorted(item_pairs):
        src = np.fromiter((a for a, _ in item_pairs[r]), dtype=np.int64)
        dst = np.fromiter((b for _, b in item_pairs[r]), dtype=np.int64)
        matrix = binary_matrix(src, dst, (n_items, n_items))
        if any((matrix != other.T).nnz == 0 for other in kept.values()):
            continue
        kept[r] = matrix
        name = f"item.{_segment(r, -1)}" if f"item.{_segment(r, -1)}" not in graph.relations else r
        graph.relations[name] = Relation(name, "item", "item", matrix, [r])
    return {"kg_relations": merged, "item_item_relations": sorted(kept), "triples_dropped_unlinked": dropped}


def with_interactions(graph: HeteroGraph, train: sp.csr_matrix) -> HeteroGraph:
    """Return a graph whose ``interacted`` relation holds the given (training) user×item matrix."""
    expected = (len(graph.node_ids["user"]), len(graph.node_ids["item"]))
    if train.shape != expected:
        raise GraphError(f"interactions matrix has shape {train.shape}; the graph expects {expected}")
    relations = dict(graph.relations)
    binary = train.tocsr().astype(np.float32)
    binary.sum_duplicates()
    binary.eliminate_zeros()  # a stored zero is not an interaction
    binary.data[:] = 1.0
    relations[INTERACTED] = Relation(INTERACTED, "user", "item", binary, ["train split"])
    return HeteroGraph(graph.node_ids, relations)


def save_graph(graph: HeteroGraph, dest: Path, report: dict[str, Any] | None = None) -> None:
    """Save schema, ids and CSR instances compactly (one npz) into ``dest`` atomically."""
    with atomic_dir(dest) as tmp:
        arrays: dict[str, np.ndarray] = {}
        meta = []
        for k, rel in enumerate(graph.relations.values()):
            m = rel.matrix.tocsr()
            arrays[f"r{k}_indptr"], arrays[f"r{k}_indices"] = m.indptr, m.indices
            meta.append(
                {
                    "name": rel.name,
                    "src": rel.src,
                    "dst": rel.dst,
                    "shape": list(m.shape),
                    "source": rel.source,
                    "key": f"r{k}",
                }
            )
        np.savez_compressed(tmp / "relations.npz", **arrays)  # type: ignore[arg-type]
        write_json(
            tmp / "graph.json",
            {
                "node_ids": graph.node_ids,
                "relations": meta,
                "schema": nx.node_link_data(graph.schema, edges="edges"),
            },
        )
        write_json(tmp / "report.json", {**graph.summary(), **(report or {})})
        draw_schema(graph, tmp / "schema.png")


def load_graph(src: Path) -> HeteroGraph:
    """Load a graph written by :func:`save_graph`."""
    meta = read_json(src / "graph.json")
    relations = {}
    with np.load(src / "relations.npz") as arrays:
        for rel in meta["relations"]:
            indptr, indices = arrays[rel["key"] + "_indptr"], arrays[rel["key"] + "_indices"]
            data = np.ones(len(indices), dtype=np.float32)
            matrix = sp.csr_matrix((data, indices, indptr), shape=tuple(rel["shape"]))
            relations[rel["name"]] = Relation(rel["name"], rel["src"], rel["dst"], matrix, rel["source"])
    return HeteroGraph(meta["node_ids"], relations)


def draw_schema(graph: HeteroGraph, path: Path) -> None:
    """Draw the type-level schema as a PNG: node types with counts, relations with edge counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schema = nx.DiGraph()
    for rel in graph.relations.values():
        label = rel.name.split(".")[-1] if rel.src != "item" or rel.dst == "item" else ""
        schema.add_edge(rel.src, rel.dst, label=f"{label} ({rel.matrix.nnz:,})".strip())
    others = sorted(n for n in schema.nodes if n not in ("user", "item"))
    user_side = [n for n in others if any(r.src == "user" and r.dst == n for r in graph.relations.values())]
    item_side = [n for n in others if n not in user_side]
    pos: dict[str, tuple[float, float]] = {"user": (-1.0, 0.0), "item": (1.0, 0.0)}
    for k, n in enumerate(user_side):
        pos[n] = (-2.6, (k - (len(user_side) - 1) / 2) * 0.9)
    for k, n in enumerate(item_side):
        angle = np.pi * (k + 0.5) / max(len(item_side), 1) - np.pi / 2
        pos[n] = (1.0 + 2.2 * np.cos(angle), 2.6 * np.sin(angle))
    fig, ax = plt.subplots(figsize=(11, 8))
    labels = {n: f"{n}\n{len(graph.node_ids[n]):,}" for n in schema.nodes}
    colors = ["#f4a261" if n == "user" else "#2a9d8f" if n == "item" else "#e9ecef" for n in schema.nodes]
    nx.draw_networkx_nodes(schema, pos, node_color=colors, node_size=2200, edgecolors="#333", ax=ax)
    nx.draw_networkx_labels(schema, pos, labels=labels, font_size=8, ax=ax)
    nx.draw_networkx_edges(
        schema, pos, arrows=True, arrowsize=12, node_size=2200, ax=ax, connectionstyle="arc3,rad=0.15"
    )
    edge_labels = {(u, v): d["label"] for u, v, d in schema.edges(data=True) if d["label"]}
    nx.draw_networkx_edge_labels(schema, pos, edge_labels=edge_labels, font_size=7, ax=ax)
    ax.set_title(
        "metarec graph schema: node types (instance counts); every relation is also traversed reversed"
    )
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
