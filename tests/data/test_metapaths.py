"""Metapath enumeration, counting, mining and explanations.

Counts are checked three ways: hand-counted entries on the committed tiny fixture, and a brute-force
walk enumeration over a networkx instance graph on the tiny fixture and on random ~1k-node graphs.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from components.data import ingest, kg, split
from components.data.synthetic import SyntheticSpec, generate
from components.metapaths import mining
from components.metapaths.counting import Counter
from components.metapaths.explain import Namer, explain, instances
from components.metapaths.schema import Metapath, MetapathError, enumerate_metapaths, parse

TINY = Path(__file__).parents[1] / "fixtures" / "tiny"
ITEM_FIELDS = {"class": "genre"}
USER_FIELDS = {"age": "age_bucket", "gender": "gender", "occupation": "occupation"}
AGES = [17, 24, 34, 44, 49, 55]


def load(directory: Path, name: str) -> tuple[kg.HeteroGraph, ingest.Dataset]:
    """The dataset's graph with *all* interactions as the interacted relation."""
    data = ingest.load_dataset(directory, name)
    graph, _ = kg.build_graph(data.users, data.items, data.kg, ITEM_FIELDS, USER_FIELDS, AGES)
    inter = split.to_matrix(data.interactions, len(data.users), len(data.items))
    return kg.with_interactions(graph, inter), data


@pytest.fixture(scope="module")
def tiny() -> tuple[kg.HeteroGraph, ingest.Dataset]:
    return load(TINY, "tiny")


def idx(graph: kg.HeteroGraph, node_type: str, node_id: str) -> int:
    return graph.node_ids[node_type].index(node_id)


DIRECTOR = "interacted|film.film.directed_by|~film.film.directed_by"
CF = "interacted|~interacted|interacted"


# ---------------------------------------------------------------- enumeration


def test_enumeration_on_tiny_schema(tiny: tuple[kg.HeteroGraph, ingest.Dataset]) -> None:
    graph, _ = tiny
    by_length = {n: [m.id for m in enumerate_metapaths(graph.schema, n)] for n in (1, 2, 3)}
    assert by_length[1] == ["interacted"]
    # user→item in two steps only through the item–item prequel relation, both directions.
    assert sorted(set(by_length[2]) - set(by_length[1])) == [
        "interacted|item.prequel",
        "interacted|~item.prequel",
    ]
    three = set(by_length[3]) - set(by_length[2])
    # Per KG/attribute relation on items: item–X–item (actor, director, language, genre) = 4;
    # user attributes: user–X–user–item = 3; user–item–user–item = 1; prequel twice in a row = 4.
    assert DIRECTOR in three and CF in three
    assert "user.occupation|~user.occupation|interacted" in three
    assert len(three) == 4 + 3 + 1 + 4


def test_include_and_exclude(tiny: tuple[kg.HeteroGraph, ingest.Dataset]) -> None:
    graph, _ = tiny
    only = enumerate_metapaths(graph.schema, 3, include=["film.film.directed_by"])
    assert [m.id for m in only] == [DIRECTOR]
    without = enumerate_metapaths(graph.schema, 3, exclude=["~interacted"])
    assert all("interacted|~interacted" not in m.id for m in without)
    assert all("~interacted" not in m.keys and "interacted" not in m.keys[1:] for m in without)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_length": 0}, "max_length must be >= 1"),
        ({"max_length": -2}, "max_length must be >= 1"),
        ({"max_length": 3, "include": ["film.film.nope"]}, "unknown relation 'film.film.nope'"),
        ({"max_length": 3, "source": "robot"}, "unknown node type 'robot'"),
    ],
)
def test_enumeration_errors(tiny: tuple[kg.HeteroGraph, ingest.Dataset], kwargs: dict, message: str) -> None:
    with pytest.raises(MetapathError, match=message):
        enumerate_metapaths(tiny[0].schema, **kwargs)


def test_empty_schema_is_rejected() -> None:
    schema = nx.MultiDiGraph()
    schema.add_nodes_from(["user", "item"])
    with pytest.raises(MetapathError, match="no relations"):
        enumerate_metapaths(schema, 3)


def test_parse_round_trip_and_errors(tiny: tuple[kg.HeteroGraph, ingest.Dataset]) -> None:
    schema = tiny[0].schema
    path = parse(DIRECTOR, schema)
    assert path.types == ("user", "item", "director", "item")
    assert path.name == "user–item–director–item"
    assert parse(path.id, schema) == path
    with pytest.raises(MetapathError, match="step 2: unknown relation 'film.film.nope'"):
        parse("interacted|film.film.nope", schema)
    with pytest.raises(MetapathError, match="does not leave type 'user'"):
        parse("film.film.directed_by", schema)
    with pytest.raises(MetapathError, match="empty"):
        parse(" | ", schema)


def test_ambiguous_steps_are_labelled(tiny: tuple[kg.HeteroGraph, ingest.Dataset]) -> None:
    names = {m.name for m in enumerate_metapaths(tiny[0].schema, 2) if m.length == 2}
    assert names == {"user–item–prequel→item", "user–item←prequel–item"}


# ---------------------------------------------------------------- counting


def test_hand_counted_director_paths(tiny: tuple[kg.HeteroGraph, ingest.Dataset]) -> None:
    graph, _ = tiny
    counter = Counter(graph, "count")
    path = parse(DIRECTOR, graph.schema)
    u1, u2 = idx(graph, "user", "u1"), idx(graph, "user", "u2")
    scores = counter.block(path, np.array([u1, u2]))
    item = {i: idx(graph, "item", i) for i in graph.node_ids["item"]}
    # u1 watched i1..i5; directors: d1 {i1, i2}, d2 {i3, i4}, d3 {i5}.
    expected_u1 = {"i1": 2, "i2": 2, "i3": 2, "i4": 2, "i5": 1, "i6": 0, "i7": 0, "i8": 0}
    # u2 watched i1, i3, i5, i7 (no director), i8 (not in the KG).
    expected_u2 = {"i1": 1, "i2": 1, "i3": 1, "i4": 1, "i5": 1, "i6": 0, "i7": 0, "i8": 0}
    assert {i: scores[0, item[i]] for i in item} == expected_u1
    assert {i: scores[1, item[i]] for i in item} == expected_u2


def test_hand_counted_collaborative_paths(tiny: tuple[kg.HeteroGraph, ingest.Dataset]) -> None:
    graph, _ = tiny
    counter = Counter(graph, "count")
    scores = counter.block(parse(CF, graph.schema), np.array([idx(graph, "user", "u1")]))
    # Users with i6 and their overlap with u1's {i1..i5}: u3 3, u4 3, u5 2, u6 2.
    assert scores[0, idx(graph, "item", "i6")] == 10


def brute_force(graph: kg.HeteroGraph, path: Metapath, damping: float | None = None) -> np.ndarray:
    """Walk counts (or DWPC) by explicit enumeration over a networkx instance graph."""
    g = nx.MultiDiGraph()
    degrees: dict[tuple[str, str, int], float] = {}
    for key in path.keys:
        m = graph.matrix(key).tocoo()
        src_t, dst_t = path.types[path.keys.index(key)], path.types[path.keys.index(key) + 1]
        binary = graph.matrix(key).astype(np.float64)
        out_deg = np.asarray(binary.sum(axis=1)).ravel()
        in_deg = np.asarray(binary.sum(axis=0)).ravel()
        for a, b in zip(m.row, m.col, strict=True):
            g.add_edge((src_t, int(a)), (dst_t, int(b)), key=key)
            degrees[(key, "out", int(a))] = out_deg[a]
            degrees[(key, "in", int(b))] = in_deg[b]
    n_users, n_items = len(graph.node_ids["user"]), len(graph.node_ids["item"])
    out = np.zeros((n_users, n_items))

    def walk(node: tuple[str, int], step: int, start: int, weight: float) -> None:
        if step == path.length:
            out[start, node[1]] += weight
            return
        key = path.keys[step]
        if node not in g:
            return
        for _, nxt, k in g.out_edges(node, keys=True):
            if k != key:
                continue
            w = 1.0
            if damping is not None:
                w = (degrees[(key, "out", node[1])] * degrees[(key, "in", nxt[1])]) ** -damping
            walk(nxt, step + 1, start, weight * w)

    for u in range(n_users):
        walk(("user", u), 0, u, 1.0)
    return out


def check_all(graph: kg.HeteroGraph, paths: list[Metapath]) -> None:
    users = np.arange(len(graph.node_ids["user"]))
    # count uses cached suffix products (low_rank=0), the others the per-block chain on these small graphs.
    count = Counter(graph, "count", low_rank=0)
    dwpc, pathsim = Counter(graph, "dwpc", 0.4), Counter(graph, "pathsim")
    for path in paths:
        expected = brute_force(graph, path)
        np.testing.assert_allclose(count.block(path, users), expected, err_msg=path.id)
        np.testing.assert_allclose(
            dwpc.block(path, users), brute_force(graph, path, 0.4), rtol=1e-9, err_msg=path.id
        )
        rows, cols = expected.sum(axis=1), expected.sum(axis=0)
        denom = np.sqrt(np.outer(rows, cols))
        norm = np.divide(expected, denom, out=np.zeros_like(expected), where=denom > 0)
        np.testing.assert_allclose(pathsim.block(path, users), norm, rtol=1e-9, err_msg=path.id)


def test_counts_match_brute_force_on_tiny(tiny: tuple[kg.HeteroGraph, ingest.Dataset]) -> None:
    graph, _ = tiny
    check_all(graph, enumerate_metapaths(graph.schema, 3))


@pytest.mark.parametrize("seed", [1, 2])
def test_counts_match_brute_force_on_random_graphs(tmp_path: Path, seed: int) -> None:
    spec = SyntheticSpec(
        n_users=200,
        n_items=150,
        n_entities=900,
        n_relations=3,
        n_interactions=2000,
        n_triples=1200,
        seed=seed,
    )
    generate(spec, tmp_path / "syn")
    graph, data = load(tmp_path / "syn", "synthetic")
    n_nodes = sum(len(ids) for ids in graph.node_ids.values())
    assert 900 <= n_nodes <= 1500  # ~1k nodes
    paths = [p for p in enumerate_metapaths(graph.schema, 3) if p.length == 3]
    check_all(graph, paths)


def test_blocks_equal_one_shot_and_suffix_cache_is_exact(tiny: tuple[kg.HeteroGraph, ingest.Dataset]) -> None:
    graph, _ = tiny
    users = np.arange(len(graph.node_ids["user"]))
    # low_rank=0: the tiny graph's narrow middles would otherwise skip the suffix cache entirely.
    cached = Counter(graph, "dwpc", low_rank=0)
    chained = Counter(graph, "dwpc", suffix_budget_bytes=0)
    # Room for about one dense 8x8 suffix: later ones are chained per block or replace narrower ones.
    tight = Counter(graph, "dwpc", suffix_budget_bytes=8 * 8 * 8 + 64, low_rank=0)
    for path in enumerate_metapaths(graph.schema, 4):
        whole = cached.block(path, users)
        np.testing.assert_allclose(np.vstack([cached.block(path, np.array([u])) for u in users]), whole)
        np.testing.assert_allclose(chained.block(path, users), whole)
        np.testing.assert_allclose(tight.block(path, users), whole)
        assert tight._cached_bytes <= tight.suffix_budget_bytes
    assert any(v is not None for v in cached._suffix.values())  # the cached path was exercised
    assert all(v is None for v in chained._suffix.values())


# ---------------------------------------------------------------- mining


def planted_graph(seed: int = 0) -> tuple[kg.HeteroGraph, sp.csr_matrix, sp.csr_matrix]:
    """40 users, 48 items in 12 director groups of 4: each user's validation items share a director
    with the user's training items; training also holds noise items from other groups."""
    rng = np.random.default_rng(seed)
    n_users, n_items, group = 40, 48, 4
    directors = np.arange(n_items) // group
    train_rows, train_cols, valid_rows, valid_cols = [], [], [], []
    for u in range(n_users):
        g = rng.integers(0, n_items // group)
        members = np.flatnonzero(directors == g)
        noise = rng.choice(np.flatnonzero(directors != g), size=2, replace=False)
        for i in [*members[:2], *noise]:
            train_rows.append(u)
            train_cols.append(i)
        for i in members[2:]:
            valid_rows.append(u)
            valid_cols.append(i)
    train = split.to_matrix(pd.DataFrame({"user": train_rows, "item": train_cols}), n_users, n_items)
    valid = split.to_matrix(pd.DataFrame({"user": valid_rows, "item": valid_cols}), n_users, n_items)
    users = pd.DataFrame(
        {
            "user": range(n_users),
            "user_id": [f"u{u}" for u in range(n_users)],
            "gender": rng.choice(["F", "M"], size=n_users),
        }
    )
    items = pd.DataFrame(
        {
            "item": range(n_items),
            "item_id": [f"i{i}" for i in range(n_items)],
            "entity_id": [f"m.{i}" for i in range(n_items)],
            "class": rng.choice(["Action", "Drama", "Comedy"], size=n_items),
        }
    )
    triples = pd.DataFrame(
        {
            "head_id": [f"m.{i}" for i in range(n_items)],
            "relation_id": "film.film.directed_by",
            "tail_id": [f"m.d{d}" for d in directors],
        }
    )
    graph, _ = kg.build_graph(users, items, triples, {"class": "genre"}, {"gender": "gender"}, AGES)
    return kg.with_interactions(graph, train), train, valid


def test_planted_metapath_is_selected_first() -> None:
    graph, train, valid = planted_graph()
    counter = Counter(graph, "pathsim")
    candidates = enumerate_metapaths(graph.schema, 3)
    blocks = mining.validation_blocks(valid, 1000, 16, seed=0)
    rows, steps = mining.select(candidates, blocks, mining.serial_map(counter, train, valid), top_k=3)
    assert steps[0]["selected"] == DIRECTOR
    best = max(rows, key=lambda r: r["ndcg@10"])
    assert best["id"] == DIRECTOR
    # A user's two validation items share the director with two training items; the noise items'
    # group-mates share it with one, so the planted items lead almost every list.
    assert best["ndcg@10"] > 0.9
    assert best["pair_coverage"] == pytest.approx(1.0)
    pop = mining.popularity_ndcg(train, valid, blocks)
    assert steps[0]["combined_ndcg"] > pop + 0.3


def test_selection_is_independent_of_block_size() -> None:
    graph, train, valid = planted_graph(seed=3)
    counter = Counter(graph, "dwpc")
    candidates = enumerate_metapaths(graph.schema, 3)
    results = []
    for block_size in (1, 7, 1000):
        blocks = mining.validation_blocks(valid, 1000, block_size, seed=0)
        rows, steps = mining.select(candidates, blocks, mining.serial_map(counter, train, valid), top_k=3)
        results.append(
            (
                [(s.get("selected"), round(s["gain"], 12)) for s in steps],
                [round(r["ndcg@10"], 12) for r in rows],
            )
        )
    assert results[0] == results[1] == results[2]


def test_select_rejects_bad_arguments() -> None:
    graph, train, valid = planted_graph()
    blocks = mining.validation_blocks(valid, 1000, 16, seed=0)
    map_fn = mining.serial_map(Counter(graph), train, valid)
    with pytest.raises(ValueError, match="no candidate metapaths"):
        mining.select([], blocks, map_fn, top_k=3)
    with pytest.raises(ValueError, match="top_k"):
        mining.select(enumerate_metapaths(graph.schema, 3), blocks, map_fn, top_k=0)
    with pytest.raises(ValueError, match="no user has validation interactions"):
        mining.validation_blocks(sp.csr_matrix(valid.shape), 10, 4, seed=0)


def test_candidate_features_exclude_training_items() -> None:
    graph, train, valid = planted_graph()
    counter = Counter(graph, "pathsim")
    selected = [(parse(DIRECTOR, graph.schema), 1.0), (parse(CF, graph.schema), 0.2)]
    frame = mining.candidate_features(counter, selected, train, per_user=5, block_size=8)
    assert len(frame) == 40 * 5
    seen = set(zip(*train.nonzero(), strict=True))
    assert not any((u, i) in seen for u, i in zip(frame.user, frame.item, strict=True))
    one = counter.block(selected[0][0], np.array([0]))[0]
    first = frame[frame.user == 0].iloc[0]
    assert first["f0"] == pytest.approx(one[int(first["item"])])


# ---------------------------------------------------------------- explanations


def test_explanation_names_the_shared_director(tiny: tuple[kg.HeteroGraph, ingest.Dataset]) -> None:
    graph, data = tiny
    counter = Counter(graph, "dwpc")
    path = parse(DIRECTOR, graph.schema)
    u2, i2 = idx(graph, "user", "u2"), idx(graph, "item", "i2")
    total, best = instances(counter, path, u2, i2)
    assert total == 1  # u2 watched i1, which shares director d1 with i2
    result = explain(counter, [path], u2, i2, Namer(graph, data.items))
    assert result[0]["paths"][0]["text"] == (
        "you —interacted→ Alpha One (1990) —directed_by→ m.d1 ←directed_by— Beta Two (1991)"
    )
    assert result[0]["instances"] == 1


def test_explanation_skips_unconnected_pairs(tiny: tuple[kg.HeteroGraph, ingest.Dataset]) -> None:
    graph, data = tiny
    counter = Counter(graph, "count")
    u1, i7 = idx(graph, "user", "u1"), idx(graph, "item", "i7")
    assert explain(counter, [parse(DIRECTOR, graph.schema)], u1, i7, Namer(graph, data.items)) == []


def test_explanation_counts_match_brute_force(tiny: tuple[kg.HeteroGraph, ingest.Dataset]) -> None:
    graph, _ = tiny
    counter = Counter(graph, "count")
    for spec in (CF, DIRECTOR, "user.occupation|~user.occupation|interacted"):
        path = parse(spec, graph.schema)
        mats = [graph.matrix(k).tocsr() for k in path.keys]

        def walks(
            nodes: list[tuple[str, int]], step: int, target: int, path: Metapath = path, mats: list = mats
        ) -> int:
            if step == path.length:
                return int(nodes[-1][1] == target)
            m = mats[step]
            total = 0
            for nxt in m.indices[m.indptr[nodes[-1][1]] : m.indptr[nodes[-1][1] + 1]]:
                node = (path.types[step + 1], int(nxt))
                if node not in nodes:  # a node is its type and index together
                    total += walks([*nodes, node], step + 1, target)
            return total

        for u in range(len(graph.node_ids["user"])):
            for i in range(len(graph.node_ids["item"])):
                total, _ = instances(counter, path, u, i, top_n=1)
                assert total == walks([("user", u)], 0, i), (spec, u, i)


def test_describe_reads_each_relation_in_order(tiny: tuple[kg.HeteroGraph, ingest.Dataset]) -> None:
    """The language gates' phrase for a metapath, hand-written for three shapes of path."""
    from components.metapaths.explain import describe

    schema = tiny[0].schema
    assert describe(parse(CF, schema)) == "items liked by people who liked items you liked"
    assert (
        describe(parse(DIRECTOR, schema)) == "items whose directed by is the directed by of items you liked"
    )
    occupation = parse("user.occupation|~user.occupation|interacted", schema)
    assert describe(occupation) == "items liked by people whose occupation is your occupation"
