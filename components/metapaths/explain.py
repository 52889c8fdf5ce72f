"""Explanations: the concrete path instances that connect a user to an item along selected metapaths."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from components.data.kg import INTERACTED, REVERSE, HeteroGraph
from components.metapaths.counting import Counter, damped_matrix
from components.metapaths.schema import Metapath

# Instances are ranked by their degree-damped weight: a director shared by two films says more than a
# language shared by five hundred. Enumeration stops after this many instances per metapath.
MAX_INSTANCES = 20000
INSTANCE_DAMPING = 0.5


@dataclass
class Instance:
    """One path instance: node indices per step and its weight."""

    nodes: tuple[int, ...]
    weight: float


class Namer:
    """Readable names for nodes: item titles (with year), entity ids where the KG has no names."""

    def __init__(self, graph: HeteroGraph, items: pd.DataFrame | None = None) -> None:
        self.graph = graph
        self.titles: dict[int, str] = {}
        if items is not None and "movie_title" in items:
            years = items["release_year"] if "release_year" in items else pd.Series([None] * len(items))
            for index, title, year in zip(items["item"], items["movie_title"], years, strict=True):
                text = str(title)
                if (
                    year is not None
                    and str(year).strip() not in ("", "nan", "None")
                    and f"({year})" not in text
                ):
                    text = f"{text} ({year})"
                self.titles[int(index)] = text

    def node(self, node_type: str, index: int, position: int) -> str:
        """Name of one node; the path's first node (the user asked about) is "you"."""
        if node_type == "user":
            return "you" if position == 0 else f"user {self.graph.node_ids['user'][index]}"
        if node_type == "item":
            return self.titles.get(index, f"item {self.graph.node_ids['item'][index]}")
        return str(self.graph.node_ids[node_type][index])


def _relation_label(key: str) -> str:
    name = key.lstrip(REVERSE)
    return "interacted" if name == INTERACTED else name.split(".")[-1]


#: Nouns for node types in :func:`describe`; other types are named by their type name.
_NOUNS = {"user": "people", "item": "items"}


def describe(path: Metapath) -> str:
    """A metapath as an English phrase the language model can read.

    ``interacted|~interacted|interacted`` becomes "items liked by people who liked items you liked";
    ``user.occupation|~user.occupation|interacted`` becomes "items liked by people whose occupation
    is your occupation". The phrase names what the channel recommends, so its embedding can be
    matched against a user's interest text.
    """
    first = path.keys[0]
    phrase = "items you liked" if first == INTERACTED else f"your {_relation_label(first).replace('_', ' ')}"
    for step, key in enumerate(path.keys[1:], start=2):
        target = path.types[step]
        noun = _NOUNS.get(target, target.replace("_", " "))
        name = _relation_label(key).replace("_", " ")
        if key == INTERACTED:
            phrase = f"items liked by {phrase}"
        elif key == REVERSE + INTERACTED:
            phrase = f"people who liked {phrase}"
        elif key.startswith(REVERSE):
            phrase = f"{noun} whose {name} is {phrase}"
        else:
            phrase = f"the {name} of {phrase}"
    return phrase


def render(path: Metapath, nodes: Sequence[int], namer: Namer) -> str:
    """Render an instance as text.

    Example: ``you —interacted→ Heat (1995) —directed_by→ m.0x ←directed_by— Collateral (2004)``.
    """
    parts = [namer.node(path.types[0], nodes[0], 0)]
    for step, key in enumerate(path.keys, start=1):
        label = _relation_label(key)
        parts.append(f"←{label}—" if key.startswith(REVERSE) else f"—{label}→")
        parts.append(namer.node(path.types[step], nodes[step], step))
    return " ".join(parts)


def instances(
    counter: Counter, path: Metapath, user: int, item: int, top_n: int = 3
) -> tuple[int, list[Instance]]:
    """The ``top_n`` heaviest instances of ``path`` from ``user`` to ``item``, and how many exist.

    Backward reachability from the item prunes the forward walk to nodes that can still reach it, so
    only real instances are enumerated.
    """
    mats = [counter.graph.matrix(k).tocsr() for k in path.keys]
    # Instances are ranked by degree-damped weight whatever the counter's weighting.
    weights = [damped_matrix(counter.graph, k, INSTANCE_DAMPING) for k in path.keys]
    reach: list[np.ndarray] = [np.zeros(0, dtype=bool)] * (len(mats) + 1)
    last = np.zeros(mats[-1].shape[1], dtype=bool)
    last[item] = True
    reach[-1] = last
    for step in range(len(mats) - 1, -1, -1):
        reach[step] = np.asarray(mats[step] @ reach[step + 1].astype(np.float64)).ravel() > 0
    if not reach[0][user]:
        return 0, []
    found: list[Instance] = []
    total = 0

    def walk(step: int, nodes: list[int], weight: float) -> None:
        nonlocal total
        if total >= MAX_INSTANCES:
            return
        if step == len(mats):
            total += 1
            found.append(Instance(tuple(nodes), weight))
            return
        row = mats[step].indices[mats[step].indptr[nodes[-1]] : mats[step].indptr[nodes[-1] + 1]]
        wrow = weights[step].getrow(nodes[-1]).toarray().ravel()
        for nxt in row[reach[step + 1][row]]:
            # A walk that revisits a node (you → film → you) is a degenerate instance; skip it. Nodes
            # are the same only when both type and index match.
            if any(path.types[k] == path.types[step + 1] and nodes[k] == nxt for k in range(step + 1)):
                continue
            walk(step + 1, [*nodes, int(nxt)], weight * float(wrow[nxt] or 1.0))

    walk(0, [user], 1.0)
    found.sort(key=lambda inst: (-inst.weight, inst.nodes))
    return total, found[:top_n]


def explain(
    counter: Counter, selected: Sequence[Metapath], user: int, item: int, namer: Namer, top_n: int = 3
) -> list[dict[str, Any]]:
    """Explanations of (user, item) along each selected metapath that connects them, strongest first."""
    out: list[dict[str, Any]] = []
    for path in selected:
        count, best = instances(counter, path, user, item, top_n)
        if not best:
            continue
        out.append(
            {
                "metapath": path.id,
                "name": path.name,
                "instances": count,
                "instances_capped": count >= MAX_INSTANCES,
                "score": float(counter.block(path, np.asarray([user]))[0, item]),
                "paths": [{"text": render(path, inst.nodes, namer), "weight": inst.weight} for inst in best],
            }
        )
    out.sort(key=lambda e: -e["paths"][0]["weight"])
    return out
