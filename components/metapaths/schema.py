"""Metapaths on the type-level schema: representation, parsing and enumeration."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import networkx as nx

from components.data.kg import REVERSE


class MetapathError(ValueError):
    """A metapath specification that does not fit the schema."""


@dataclass(frozen=True)
class Metapath:
    """A typed walk on the schema: node types and the relation key taken at each step.

    ``keys`` are schema edge keys: a relation name for the forward direction or ``~name`` reversed.
    """

    types: tuple[str, ...]
    keys: tuple[str, ...]
    # Readable name; relations are spelled out where the node types alone are ambiguous.
    label: str = ""

    def __post_init__(self) -> None:
        if len(self.types) != len(self.keys) + 1:
            raise MetapathError("a metapath has one more node type than relations")

    @property
    def length(self) -> int:
        """Number of relations."""
        return len(self.keys)

    @property
    def id(self) -> str:
        """Stable identifier: the relation keys joined by ``|`` (parseable by :func:`parse`)."""
        return "|".join(self.keys)

    @property
    def name(self) -> str:
        """Readable name from node types, e.g. ``user–item–director–item``."""
        return self.label or "–".join(self.types)

    def __str__(self) -> str:
        return self.name


def parse(spec: str, schema: nx.MultiDiGraph, source: str = "user") -> Metapath:
    """Parse ``key|key|...`` (schema edge keys) into a Metapath starting at ``source``.

    Raises:
        MetapathError: naming the unknown relation or the step whose types do not connect.
    """
    keys = [k.strip() for k in spec.split("|") if k.strip()]
    if not keys:
        raise MetapathError(f"metapath {spec!r}: empty")
    if source not in schema:
        raise MetapathError(f"metapath {spec!r}: unknown node type {source!r}")
    types = [source]
    known = {k for _, _, k in schema.edges(keys=True)}
    for step, key in enumerate(keys, start=1):
        if key not in known:
            raise MetapathError(f"metapath {spec!r}: step {step}: unknown relation {key!r}")
        targets = [v for _, v, k in schema.out_edges(types[-1], keys=True) if k == key]
        if not targets:
            raise MetapathError(
                f"metapath {spec!r}: step {step}: relation {key!r} does not leave type {types[-1]!r}"
            )
        types.append(targets[0])
    return Metapath(tuple(types), tuple(keys), label(types, keys, schema))


def label(types: Sequence[str], keys: Sequence[str], schema: nx.MultiDiGraph) -> str:
    """Name a walk by node types, spelling out a relation where two types have several between them."""
    parts = [types[0]]
    for k, key in enumerate(keys):
        between = {e for _, v, e in schema.out_edges(types[k], keys=True) if v == types[k + 1]}
        if len(between) > 1:
            short = key.lstrip(REVERSE).split(".")[-1]
            parts.append(f"←{short}–" if key.startswith(REVERSE) else f"–{short}→")
        else:
            parts.append("–")
        parts.append(types[k + 1])
    return "".join(parts)


def enumerate_metapaths(
    schema: nx.MultiDiGraph,
    max_length: int,
    source: str = "user",
    target: str = "item",
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> list[Metapath]:
    """Every schema walk from ``source`` to ``target`` with 1..max_length relations.

    Node types may repeat and a relation may be followed by its own reverse: user–item–user–item
    (collaborative filtering) and item–actor–item (shared cast) are exactly such walks. ``include``
    keeps only walks using at least one of the named relations; ``exclude`` drops walks using any.
    Relation names match with or without the ``~`` prefix.
    """
    if max_length <= 0:
        raise MetapathError(f"max_length must be >= 1, got {max_length}")
    for node in (source, target):
        if node not in schema:
            raise MetapathError(f"unknown node type {node!r}; schema has {sorted(schema.nodes)}")
    if schema.number_of_edges() == 0:
        raise MetapathError("the schema has no relations")
    relations = {k.lstrip(REVERSE) for _, _, k in schema.edges(keys=True)}
    include_set, exclude_set = set(include), set(exclude)
    for name in include_set | exclude_set:
        if name.lstrip(REVERSE) not in relations:
            raise MetapathError(f"include/exclude names unknown relation {name!r}")
    include_set = {n.lstrip(REVERSE) for n in include_set}
    exclude_set = {n.lstrip(REVERSE) for n in exclude_set}

    out: list[Metapath] = []
    edges = sorted(schema.edges(keys=True))

    def walk(types: list[str], keys: list[str]) -> None:
        if keys and types[-1] == target:
            used = {k.lstrip(REVERSE) for k in keys}
            if (not include_set or used & include_set) and not used & exclude_set:
                out.append(Metapath(tuple(types), tuple(keys), label(types, keys, schema)))
        if len(keys) == max_length:
            return
        for u, v, key in edges:
            if u != types[-1] or key.lstrip(REVERSE) in exclude_set:
                continue
            walk([*types, v], [*keys, key])

    walk([source], [])
    return sorted(out, key=lambda m: (m.length, m.id))
