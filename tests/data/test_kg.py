"""Typed graph built from the tiny fixture: node types, relations and edges counted by hand from the files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from components.core.storage import read_json
from components.data.ingest import load_dataset
from components.data.kg import (
    INTERACTED,
    GraphError,
    HeteroGraph,
    age_bucket,
    build_graph,
    load_graph,
    save_graph,
    with_interactions,
)

TINY = Path(__file__).parents[1] / "fixtures" / "tiny"
ITEM_FIELDS = {"class": "genre"}
USER_FIELDS = {"age": "age_bucket", "gender": "gender", "occupation": "occupation"}
AGE_BUCKETS = [17, 24, 34, 44, 49, 55]

# Node types and their ids, from tiny.user / tiny.item / tiny.kg (entity ids sorted).
EXPECTED_NODES = {
    "user": ["u1", "u2", "u3", "u4", "u5", "u6"],
    "item": ["i1", "i2", "i3", "i4", "i5", "i6", "i7", "i8"],
    # ages 15, 22, 30, 40, 60, 22
    "age_bucket": ["0-17", "18-24", "25-34", "35-44", "56+"],
    "gender": ["F", "M"],
    "occupation": ["artist", "engineer", "retired", "student"],
    "genre": ["Action", "Comedy", "Drama", "Horror"],
    "director": ["m.d1", "m.d2", "m.d3"],
    "actor": ["m.a1", "m.a2", "m.a3", "m.a4"],
    "language": ["m.en", "m.fr"],
}

# Every edge of every relation, as (source id, destination id).
EXPECTED_EDGES: dict[str, tuple[str, str, set[tuple[str, str]]]] = {
    INTERACTED: ("user", "item", set()),  # filled from the training split only
    "user.age_bucket": (
        "user",
        "age_bucket",
        {
            ("u1", "0-17"),
            ("u2", "18-24"),
            ("u3", "25-34"),
            ("u4", "35-44"),
            ("u5", "56+"),
            ("u6", "18-24"),
        },
    ),
    "user.gender": (
        "user",
        "gender",
        {
            ("u1", "M"),
            ("u2", "F"),
            ("u3", "M"),
            ("u4", "F"),
            ("u5", "M"),
            ("u6", "F"),
        },
    ),
    "user.occupation": (
        "user",
        "occupation",
        {
            ("u1", "student"),
            ("u2", "engineer"),
            ("u3", "engineer"),
            ("u4", "artist"),
            ("u5", "retired"),
            ("u6", "student"),
        },
    ),
    "item.genre": (
        "item",
        "genre",
        {
            ("i1", "Action"),
            ("i1", "Drama"),
            ("i2", "Comedy"),
            ("i3", "Action"),
            ("i4", "Drama"),
            ("i4", "Comedy"),
            ("i5", "Horror"),
            ("i6", "Action"),
            ("i6", "Horror"),
            ("i7", "Drama"),
            ("i8", "Comedy"),
            ("i8", "Drama"),
        },
    ),
    # film.film.directed_by and its inverse film.director.film are one relation
    "film.film.directed_by": (
        "item",
        "director",
        {
            ("i1", "m.d1"),
            ("i2", "m.d1"),
            ("i3", "m.d2"),
            ("i4", "m.d2"),
            ("i5", "m.d3"),
        },
    ),
    # m.x9 film.film.actor m.a1 touches no linked item: dropped
    "film.film.actor": (
        "item",
        "actor",
        {
            ("i1", "m.a1"),
            ("i1", "m.a2"),
            ("i2", "m.a1"),
            ("i3", "m.a3"),
            ("i4", "m.a2"),
            ("i6", "m.a3"),
            ("i7", "m.a4"),
        },
    ),
    "film.film.language": (
        "item",
        "language",
        {
            ("i1", "m.en"),
            ("i2", "m.en"),
            ("i3", "m.en"),
            ("i4", "m.fr"),
            ("i5", "m.en"),
            ("i6", "m.en"),
            ("i7", "m.fr"),
        },
    ),
    # film.film.sequel (i1 -> i2) is the transpose of film.film.prequel (i2 -> i1): only one is kept
    "item.prequel": ("item", "item", {("i2", "i1")}),
}
EDGE_COUNTS = {
    INTERACTED: 0,
    "user.age_bucket": 6,
    "user.gender": 6,
    "user.occupation": 6,
    "item.genre": 12,
    "film.film.directed_by": 5,
    "film.film.actor": 7,
    "film.film.language": 7,
    "item.prequel": 1,
}
KG_SOURCES = {
    "film.film.directed_by": ["film.director.film", "film.film.directed_by"],
    "film.film.actor": ["film.film.actor"],
    "film.film.language": ["film.film.language"],
    "item.prequel": ["film.film.prequel"],
}


@pytest.fixture(scope="module")
def tiny():
    return load_dataset(TINY, "tiny")


@pytest.fixture(scope="module")
def built(tiny) -> tuple[HeteroGraph, dict]:
    return build_graph(tiny.users, tiny.items, tiny.kg, ITEM_FIELDS, USER_FIELDS, AGE_BUCKETS)


@pytest.fixture(scope="module")
def graph(built) -> HeteroGraph:
    return built[0]


def _edges(graph: HeteroGraph, name: str) -> set[tuple[str, str]]:
    rel = graph.relations[name]
    coo = rel.matrix.tocoo()
    src, dst = graph.node_ids[rel.src], graph.node_ids[rel.dst]
    return {(src[r], dst[c]) for r, c in zip(coo.row, coo.col, strict=True)}


def test_node_types(graph: HeteroGraph) -> None:
    assert graph.node_ids == EXPECTED_NODES
    assert graph.summary()["node_types"] == {t: len(ids) for t, ids in EXPECTED_NODES.items()}
    assert graph.summary()["node_types"] == {
        "user": 6,
        "item": 8,
        "age_bucket": 5,
        "gender": 2,
        "occupation": 4,
        "genre": 4,
        "director": 3,
        "actor": 4,
        "language": 2,
    }


def test_relations_and_edges(graph: HeteroGraph) -> None:
    assert set(graph.relations) == set(EXPECTED_EDGES)
    for name, (src, dst, edges) in EXPECTED_EDGES.items():
        rel = graph.relations[name]
        assert (rel.src, rel.dst) == (src, dst), name
        assert rel.matrix.shape == (len(EXPECTED_NODES[src]), len(EXPECTED_NODES[dst])), name
        assert isinstance(rel.matrix, sp.csr_matrix), name
        assert _edges(graph, name) == edges, name
        assert rel.matrix.nnz == EDGE_COUNTS[name] == len(edges), name
        assert set(rel.matrix.data.tolist()) <= {1.0}, name  # binary instances
    for name, sources in KG_SOURCES.items():
        assert graph.relations[name].source == sources


def test_build_report(built) -> None:
    _, report = built
    assert report["triples_dropped_unlinked"] == 1
    assert report["item_item_relations"] == ["film.film.prequel"]
    assert report["skipped_item_fields"] == []
    assert report["kg_relations"] == [
        {
            "relation": "film.film.directed_by",
            "entity_type": "director",
            "merged": ["film.director.film", "film.film.directed_by"],
            "edges": 5,
            "entities": 3,
        },
        {
            "relation": "film.film.actor",
            "entity_type": "actor",
            "merged": ["film.film.actor"],
            "edges": 7,
            "entities": 4,
        },
        {
            "relation": "film.film.language",
            "entity_type": "language",
            "merged": ["film.film.language"],
            "edges": 7,
            "entities": 2,
        },
    ]


def test_kg_edges_brute_force(tiny, graph: HeteroGraph) -> None:
    """Every CSR nonzero is a .kg triple (either orientation); every linked triple is an edge."""
    triples = {tuple(line.split("\t")) for line in (TINY / "tiny.kg").read_text().splitlines()[1:]}
    entity = dict(zip(tiny.items.item, tiny.items.entity_id, strict=True))
    linked = {e for e in entity.values() if isinstance(e, str)}
    for name, sources in KG_SOURCES.items():
        rel = graph.relations[name]
        coo = rel.matrix.tocoo()
        dst_ids = graph.node_ids[rel.dst]
        found = set()
        for r, c in zip(coo.row, coo.col, strict=True):
            head = entity[int(r)]
            tail = entity[int(c)] if rel.dst == "item" else dst_ids[c]
            hit = any((head, s, tail) in triples or (tail, s, head) in triples for s in sources)
            assert hit, (name, head, tail)
            found.add((head, tail))
        # converse: each source triple with a linked endpoint shows up as an edge (item-side first)
        for h, s, t in triples:
            if s not in sources or not ({h, t} & linked):
                continue
            if rel.dst == "item":
                assert (h, t) in found or (t, h) in found, (h, s, t)
            else:
                assert ((h, t) if h in linked else (t, h)) in found, (h, s, t)


def test_attribute_edges_brute_force(tiny, graph: HeteroGraph) -> None:
    users = tiny.users.set_index("user")
    for column, type_name in USER_FIELDS.items():
        for u, j in zip(*graph.relations[f"user.{type_name}"].matrix.nonzero(), strict=True):
            value = users.loc[u, column]
            if column == "age":
                value = age_bucket(value, AGE_BUCKETS)
            assert graph.node_ids[type_name][j] == value
    items = tiny.items.set_index("item")
    matrix = graph.relations["item.genre"].matrix
    for i in range(len(items)):
        genres = {graph.node_ids["genre"][j] for j in matrix[i].indices}
        assert genres == set(items.loc[i, "class"].split())


def test_schema_has_every_relation_both_ways(graph: HeteroGraph) -> None:
    schema = graph.schema
    assert schema.is_multigraph() and schema.is_directed()
    assert set(schema.nodes) == set(EXPECTED_NODES)
    counts = {n: d["count"] for n, d in schema.nodes(data=True)}
    assert counts == {t: len(v) for t, v in EXPECTED_NODES.items()}
    assert schema.number_of_edges() == 2 * len(EXPECTED_EDGES)
    for name, (src, dst, _) in EXPECTED_EDGES.items():
        forward = schema.get_edge_data(src, dst, key=name)
        backward = schema.get_edge_data(dst, src, key="~" + name)
        assert forward == {"relation": name, "nnz": EDGE_COUNTS[name], "reverse": False}, name
        assert backward == {"relation": name, "nnz": EDGE_COUNTS[name], "reverse": True}, name


def test_reverse_matrix_is_transpose(graph: HeteroGraph) -> None:
    for name in EXPECTED_EDGES:
        forward = graph.matrix(name)
        backward = graph.matrix("~" + name)
        assert forward is graph.relations[name].matrix
        assert isinstance(backward, sp.csr_matrix)
        assert backward.shape == forward.shape[::-1]
        assert (backward != forward.T).nnz == 0, name
    assert {(b, a) for a, b in _edges(graph, "film.film.actor")} == {
        (graph.node_ids["actor"][r], graph.node_ids["item"][c])
        for r, c in zip(*graph.matrix("~film.film.actor").nonzero(), strict=True)
    }
    with pytest.raises(KeyError):
        graph.matrix("no.such.relation")


def _train(n_users: int = 6, n_items: int = 8) -> sp.csr_matrix:
    rows, cols = [0, 0, 1, 5, 5], [0, 1, 2, 7, 7]  # a duplicate (5, 7) counts once
    return sp.csr_matrix((np.array([5.0, 3.0, 1.0, 2.0, 2.0]), (rows, cols)), shape=(n_users, n_items))


def test_with_interactions(graph: HeteroGraph) -> None:
    train = _train()
    before = train.copy()
    full = with_interactions(graph, train)
    m = full.matrix(INTERACTED)
    assert m.shape == (6, 8) and m.nnz == 4
    assert set(m.data.tolist()) == {1.0}
    assert sorted(zip(*m.nonzero(), strict=True)) == [(0, 0), (0, 1), (1, 2), (5, 7)]
    assert (train != before).nnz == 0  # the caller's matrix is not modified
    assert graph.relations[INTERACTED].matrix.nnz == 0  # nor the original graph
    assert full.schema.get_edge_data("user", "item", key=INTERACTED)["nnz"] == 4
    for name in EXPECTED_EDGES:
        if name != INTERACTED:
            assert full.relations[name] is graph.relations[name]


@pytest.mark.parametrize("shape", [(8, 6), (6, 7), (7, 8), (0, 0)])
def test_with_interactions_rejects_wrong_shape(graph: HeteroGraph, shape: tuple[int, int]) -> None:
    with pytest.raises(GraphError, match=r"expects \(6, 8\)"):
        with_interactions(graph, sp.csr_matrix(shape, dtype=np.float32))


def test_save_load_round_trip(built, tmp_path: Path) -> None:
    graph, report = built
    graph = with_interactions(graph, _train())
    dest = tmp_path / "graph"
    save_graph(graph, dest, report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph"]  # no temp dir left behind
    files = sorted(p.name for p in dest.iterdir())
    assert files == ["graph.json", "relations.npz", "report.json", "schema.png"]
    loaded = load_graph(dest)
    assert loaded.node_ids == graph.node_ids
    assert list(loaded.relations) == list(graph.relations)
    for name, rel in graph.relations.items():
        other = loaded.relations[name]
        assert (other.src, other.dst, other.source) == (rel.src, rel.dst, rel.source), name
        assert other.matrix.shape == rel.matrix.shape, name
        assert (other.matrix != rel.matrix).nnz == 0, name
        assert np.array_equal(other.matrix.toarray(), rel.matrix.toarray()), name
        assert (loaded.matrix("~" + name) != graph.matrix("~" + name)).nnz == 0, name
    assert loaded.summary() == graph.summary()
    assert sorted(loaded.schema.edges(keys=True)) == sorted(graph.schema.edges(keys=True))
    written = read_json(dest / "report.json")
    assert written["triples_dropped_unlinked"] == 1
    assert written["relations"]["interacted"]["edges"] == 4
    assert written["node_types"]["director"] == 3


def test_schema_png(built, tmp_path: Path) -> None:
    graph, report = built
    save_graph(graph, tmp_path / "g", report)
    png = (tmp_path / "g" / "schema.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 1000


def test_save_overwrites_previous(built, tmp_path: Path) -> None:
    graph, report = built
    dest = tmp_path / "g"
    save_graph(graph, dest, report)
    save_graph(with_interactions(graph, _train()), dest, report)
    assert load_graph(dest).relations[INTERACTED].matrix.nnz == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]


@pytest.mark.parametrize(
    ("age", "bucket"),
    [
        ("0", "0-17"),
        ("17", "0-17"),
        ("18", "18-24"),
        ("24", "18-24"),
        ("25", "25-34"),
        ("49", "45-49"),
        ("50", "50-55"),
        ("55", "50-55"),
        ("56", "56+"),
        ("90", "56+"),
        ("22.0", "18-24"),
    ],
)
def test_age_bucket(age: str, bucket: str) -> None:
    assert age_bucket(age, AGE_BUCKETS) == bucket


def test_build_without_kg_or_link(tiny) -> None:
    items = tiny.items.assign(entity_id=None)
    graph, report = build_graph(tiny.users, items, tiny.kg, ITEM_FIELDS, {"gender": "gender"}, AGE_BUCKETS)
    assert set(graph.relations) == {INTERACTED, "user.gender", "item.genre"}
    assert report["triples_dropped_unlinked"] == 27
    empty_kg = pd.DataFrame({"head_id": [], "relation_id": [], "tail_id": []}, dtype=str)
    graph, report = build_graph(tiny.users, tiny.items, empty_kg, ITEM_FIELDS, {}, AGE_BUCKETS)
    assert set(graph.relations) == {INTERACTED, "item.genre"}
    assert report == {
        "kg_relations": [],
        "item_item_relations": [],
        "triples_dropped_unlinked": 0,
        "skipped_item_fields": [],
    }


def test_build_errors(tiny) -> None:
    with pytest.raises(GraphError, match="'colour' not in the item table"):
        build_graph(tiny.users, tiny.items, tiny.kg, {"colour": "colour"}, {}, AGE_BUCKETS)
    with pytest.raises(GraphError, match="used twice"):
        build_graph(tiny.users, tiny.items, tiny.kg, {"class": "gender"}, {"gender": "gender"}, AGE_BUCKETS)
    with pytest.raises(GraphError, match="without users and items"):
        build_graph(tiny.users.iloc[:0], tiny.items, tiny.kg, ITEM_FIELDS, {}, AGE_BUCKETS)
    bad_age = tiny.users.assign(age=["x"] * len(tiny.users))
    with pytest.raises(GraphError, match="must be numeric"):
        build_graph(bad_age, tiny.items, tiny.kg, {}, {"age": "age_bucket"}, AGE_BUCKETS)


def test_optional_item_fields_are_used_where_present(tiny) -> None:
    """ml-100k's release year joins as a type where the column exists; a missing one is reported."""
    optional = {"release_year": "year", "budget": "budget"}
    graph, report = build_graph(
        tiny.users, tiny.items, tiny.kg, ITEM_FIELDS, USER_FIELDS, AGE_BUCKETS, optional_item_fields=optional
    )
    assert graph.node_ids["year"] == [str(y) for y in range(1990, 1998)]  # i1..i8: 1990..1997
    assert graph.relations["item.year"].matrix.nnz == 8 and "budget" not in graph.node_ids
    assert report["skipped_item_fields"] == ["budget"]
    # A required field that is missing is still an error naming the column.
    with pytest.raises(GraphError, match="item attribute column 'budget' not in the item table"):
        build_graph(tiny.users, tiny.items, tiny.kg, {"budget": "budget"}, USER_FIELDS, AGE_BUCKETS)
