"""Verbalisation: items and users as short English texts for a sentence encoder.

The KG holds Freebase ids (``m.0abc``) rather than names, which a language model cannot read. A KG
fact is therefore rendered through the catalogue itself: the other items that share the entity, by
title ("Directed by the director of: Heat (1995), Collateral (2004).") or, for relations whose entities
say little about which items are alike, as a count ("3 awards won."). Every choice is deterministic
(ties broken by item index), so the same inputs always give the same texts and the embedding cache
keyed on text stays valid.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from components.data.kg import INTERACTED, HeteroGraph

DEFAULT_ITEM_TEMPLATE = "{title}. Genres: {genres}. {facts}"
DEFAULT_USER_TEMPLATE = "User aged {age}, {gender}, {occupation}. Recently watched: {recent}."
ITEM_FIELDS = ("item_id", "title", "name", "year", "genres", "facts")
USER_FIELDS = ("user_id", "age", "gender", "occupation", "zip_code", "recent", "n_history")

# Phrases for item->entity relations, keyed by the relation id's last segment. The tuple order is the
# order facts appear in: a 128-token encoder window truncates the tail, so the most telling come first.
LINK_PHRASES: dict[str, str] = {
    "directed_by": "Directed by the director of",
    "written_by": "Written by the writer of",
    "actor": "Shares cast with",
    "produced_by": "Produced by the producer of",
    "cinematography": "Shot by the cinematographer of",
    "production_companies": "Made by the studio of",
    "sequel": "Same series as",
    "prequel": "Same series as",
    "subjects": "Same subject as",
    "genre": "Same genre as",
    "country": "Same country as",
    "language": "Same language as",
    "rating": "Same rating as",
}
# Relations rendered as counts: award categories are shared by unrelated films, so naming the other
# winners of "an Academy Award" would suggest a likeness that is not there; how many is the signal.
COUNT_PHRASES: dict[str, tuple[str, str]] = {
    "award_won": ("award won", "awards won"),
    "award_nomination": ("award nomination", "award nominations"),
}
FACT_ORDER: tuple[str, ...] = (
    "directed_by",
    "written_by",
    "actor",
    "produced_by",
    "cinematography",
    "production_companies",
    "sequel",
    "prequel",
    "subjects",
    "genre",
    "award_won",
    "award_nomination",
    "country",
    "language",
    "rating",
)
_GENDERS = {"m": "male", "f": "female"}


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return str(value).strip() in ("", "nan", "None", "<NA>")


def _clean(text: str) -> str:
    # An empty field ({facts} for an item outside the KG) must not leave double or trailing spaces.
    return " ".join(text.split())


def _fill(template: str, fields: dict[str, str], allowed: Sequence[str], what: str) -> str:
    names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    unknown = sorted(names - set(allowed))
    if unknown:
        raise ValueError(
            f"{what} template {template!r}: unknown field(s) {unknown}; available: {', '.join(allowed)}"
        )
    return _clean(template.format(**fields))


def item_titles(items: pd.DataFrame) -> dict[int, str]:
    """Readable title of every item by item index: ``Title (year)``, or ``item <id>`` without a title."""
    out: dict[int, str] = {}
    names = items["movie_title"] if "movie_title" in items else pd.Series([None] * len(items))
    years = items["release_year"] if "release_year" in items else pd.Series([None] * len(items))
    for index, item_id, name, year in zip(
        items["item"], items["item_id"], names.tolist(), years.tolist(), strict=True
    ):
        text = f"item {item_id}" if _missing(name) else _clean(str(name))
        if not _missing(year):
            year_text = _year(year)
            if f"({year_text})" not in text:
                text = f"{text} ({year_text})"
        out[int(index)] = text
    return out


def _year(value: Any) -> str:
    # release_year is a token; a float-typed column would render 1995.0.
    text = str(value).strip()
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class _RelationView:
    """One item-side KG relation prepared for rendering."""

    segment: str
    matrix: sp.csr_matrix  # item x entity (or item x item)
    columns: sp.csc_matrix  # the same, by entity, to find the items sharing one
    degree: np.ndarray  # items per entity
    item_to_item: bool


def _relation_order(segment: str, name: str) -> tuple[int, str]:
    rank = FACT_ORDER.index(segment) if segment in FACT_ORDER else len(FACT_ORDER)
    return rank, name


def _kg_relations(graph: HeteroGraph, item_columns: set[str]) -> list[_RelationView]:
    views = []
    ordered = sorted(
        (rel for rel in graph.relations.values() if rel.src == "item" and rel.name != INTERACTED),
        # Direct item-item links (prequel) name the related item itself, so they lead.
        key=lambda rel: (rel.dst != "item", *_relation_order(rel.name.split(".")[-1], rel.name)),
    )
    for rel in ordered:
        # Attribute relations built from item columns (class -> genre) are already in {genres}.
        if rel.source and set(rel.source) <= item_columns:
            continue
        matrix = rel.matrix.tocsr()
        degree = np.asarray((matrix != 0).sum(axis=0)).ravel()
        views.append(
            _RelationView(rel.name.split(".")[-1], matrix, matrix.tocsc(), degree, rel.dst == "item")
        )
    return views


def _linked_titles(
    view: _RelationView, row: int, titles: Sequence[str], max_titles: int, max_shared: int
) -> list[str]:
    entities = view.matrix.indices[view.matrix.indptr[row] : view.matrix.indptr[row + 1]]
    scores: dict[int, float] = {}
    for entity in sorted(int(e) for e in entities):
        degree = int(view.degree[entity])
        # An entity shared by most of the catalogue (English, USA) identifies nothing.
        if degree < 2 or degree > max_shared:
            continue
        start, end = view.columns.indptr[entity], view.columns.indptr[entity + 1]
        for other in view.columns.indices[start:end]:
            if int(other) != row:
                # Rarer shared entities weigh more: sharing a cameo actor beats sharing a studio.
                scores[int(other)] = scores.get(int(other), 0.0) + 1.0 / degree
    ranked = sorted(scores, key=lambda j: (-scores[j], j))
    return [titles[j] for j in ranked[:max_titles]]


def _item_facts(
    views: Sequence[_RelationView],
    row: int | None,
    titles: Sequence[str],
    max_facts: int,
    max_titles: int,
    max_shared: int,
    phrases: Mapping[str, str],
) -> list[str]:
    facts: list[str] = []
    if row is None:
        return facts
    for view in views:
        if len(facts) >= max_facts:
            break
        if view.item_to_item:
            facts.extend(_item_links(view, row, titles, max_titles)[: max_facts - len(facts)])
            continue
        n = int(view.matrix.indptr[row + 1] - view.matrix.indptr[row])
        if n == 0:
            continue
        if view.segment in COUNT_PHRASES:
            singular, plural = COUNT_PHRASES[view.segment]
            facts.append(f"{n} {singular if n == 1 else plural}.")
            continue
        linked = _linked_titles(view, row, titles, max_titles, max_shared)
        if linked:
            phrase = phrases.get(view.segment, f"Same {view.segment.replace('_', ' ')} as")
            facts.append(f"{phrase}: {', '.join(linked)}.")
    return facts


def _item_links(view: _RelationView, row: int, titles: Sequence[str], max_titles: int) -> list[str]:
    # Item-item relations name the other item directly, in both directions: "Prequel: A." on the
    # sequel's text and "Prequel of: B." on the prequel's.
    label = view.segment.replace("_", " ").capitalize()
    facts = []
    for matrix, template in ((view.matrix, "{label}: {titles}."), (view.columns, "{label} of: {titles}.")):
        others = sorted(int(j) for j in matrix.indices[matrix.indptr[row] : matrix.indptr[row + 1]])
        if others:
            names = ", ".join(titles[j] for j in others[:max_titles])
            facts.append(template.format(label=label, titles=names))
    return facts


def item_texts(
    items: pd.DataFrame,
    graph: HeteroGraph | None,
    template: str = DEFAULT_ITEM_TEMPLATE,
    max_facts: int = 4,
    *,
    max_titles: int = 2,
    max_shared: int = 50,
    phrases: Mapping[str, str] | None = None,
) -> list[str]:
    """Verbalise items from their metadata and KG facts, one text per row of ``items``.

    Args:
        items: Processed items table (``item``, ``item_id``; optionally ``movie_title``,
            ``release_year``, ``class``). Rows need not be in the graph: a new item gets a text from
            its metadata alone (cold start).
        graph: The typed graph whose item-side KG relations give the facts; None for metadata only.
        template: ``str.format`` template over the fields ``item_id``, ``title`` (with year), ``name``,
            ``year``, ``genres``, ``facts``.
        max_facts: At most this many KG facts per item, most telling relations first. With
            ``max_titles`` 2 this keeps ml-100k item texts at ~80 MiniLM tokens (p90 105), inside a
            128-token window; 6 facts x 3 titles averaged 123 tokens and half were truncated.
        max_titles: Titles listed per fact.
        max_shared: Entities shared by more items than this are too common to link items by.
        phrases: Overrides of :data:`LINK_PHRASES`, keyed by the relation id's last segment.

    Returns:
        One whitespace-normalised text per row, in row order.

    Raises:
        ValueError: A bad argument or template field, or a text that renders empty (names the item).
    """
    if max_facts < 0 or max_titles < 1 or max_shared < 2:
        raise ValueError(
            f"need max_facts >= 0, max_titles >= 1 and max_shared >= 2 "
            f"(got {max_facts}, {max_titles}, {max_shared})"
        )
    for column in ("item", "item_id"):
        if column not in items:
            raise ValueError(
                f"items table lacks column {column!r} (has {', '.join(map(str, items.columns))})"
            )
    phrases = {**LINK_PHRASES, **(phrases or {})}
    own_titles = item_titles(items)
    views: list[_RelationView] = []
    graph_titles: list[str] = []
    position: dict[str, int] = {}
    if graph is not None:
        views = _kg_relations(graph, {str(c) for c in items.columns})
        by_id = {str(i): own_titles[int(k)] for k, i in zip(items["item"], items["item_id"], strict=True)}
        graph_ids = [str(i) for i in graph.node_ids["item"]]
        graph_titles = [by_id.get(i, f"item {i}") for i in graph_ids]
        position = {i: k for k, i in enumerate(graph_ids)}
    genres_column = items["class"].tolist() if "class" in items else [None] * len(items)
    years = items["release_year"].tolist() if "release_year" in items else [None] * len(items)
    names = items["movie_title"].tolist() if "movie_title" in items else [None] * len(items)
    texts = []
    for index, item_id, name, year, genres in zip(
        items["item"], items["item_id"], names, years, genres_column, strict=True
    ):
        facts = _item_facts(
            views, position.get(str(item_id)), graph_titles, max_facts, max_titles, max_shared, phrases
        )
        fields = {
            "item_id": str(item_id),
            "title": own_titles[int(index)],
            "name": f"item {item_id}" if _missing(name) else _clean(str(name)),
            "year": "" if _missing(year) else _year(year),
            "genres": "unknown" if _missing(genres) else _clean(str(genres)),
            "facts": " ".join(facts),
        }
        text = _fill(template, fields, ITEM_FIELDS, "item")
        if not text:
            raise ValueError(f"item {item_id!r}: text is empty under template {template!r}")
        texts.append(text)
    return texts


def _user_fields(row: Mapping[str, Any], recent: Sequence[str], n_history: int) -> dict[str, str]:
    def get(key: str) -> str:
        value = row.get(key)
        return "unknown" if _missing(value) else _clean(str(value))

    gender = get("gender")
    return {
        "user_id": str(row["user_id"]),
        "age": _year(get("age")),
        "gender": _GENDERS.get(gender.lower(), gender),
        "occupation": get("occupation"),
        "zip_code": get("zip_code"),
        "recent": ", ".join(recent) if recent else "nothing yet",
        "n_history": str(n_history),
    }


def user_text(
    row: Mapping[str, Any], history: Sequence[int], titles: Mapping[int, str], n_recent: int, template: str
) -> str:
    """Verbalise one user from a users-table row and their history (item indices, oldest first).

    Raises:
        ValueError: The text renders empty (names the user) or the template has an unknown field.
    """
    recent = [titles.get(int(i), f"item {int(i)}") for i in reversed(history[-n_recent:])]
    text = _fill(template, _user_fields(row, recent, len(history)), USER_FIELDS, "user")
    if not text:
        raise ValueError(f"user {row['user_id']!r}: text is empty under template {template!r}")
    return text


def histories(train: pd.DataFrame) -> dict[int, list[int]]:
    """Each user's training items in time order (ties by item index, as the split orders them)."""
    for column in ("user", "item", "timestamp"):
        if column not in train:
            raise ValueError(
                f"interactions lack column {column!r} (has {', '.join(map(str, train.columns))})"
            )
    ordered = train.sort_values(["user", "timestamp", "item"], kind="stable")
    return {int(user): [int(i) for i in group] for user, group in ordered.groupby("user", sort=True)["item"]}


def user_texts(
    users: pd.DataFrame,
    train: pd.DataFrame,
    items: pd.DataFrame,
    n_recent: int = 10,
    template: str = DEFAULT_USER_TEMPLATE,
) -> list[str]:
    """Verbalise users: demographics plus the titles of their most recent training items.

    Args:
        users: Processed users table (``user``, ``user_id``; optionally ``age``, ``gender``,
            ``occupation``, ``zip_code``).
        train: Training interactions (``user``, ``item``, ``timestamp``); nothing held out may be here.
        items: Processed items table, for titles.
        n_recent: Most recent training items named, newest first.
        template: ``str.format`` template over ``user_id``, ``age``, ``gender``, ``occupation``,
            ``zip_code``, ``recent``, ``n_history``.

    Returns:
        One text per row of ``users``, in row order; a user without training items reads
        "Recently watched: nothing yet".

    Raises:
        ValueError: ``n_recent`` < 1, a missing column, an unknown template field or an empty text.
    """
    if n_recent < 1:
        raise ValueError(f"n_recent must be >= 1, got {n_recent}")
    for column in ("user", "user_id"):
        if column not in users:
            raise ValueError(
                f"users table lacks column {column!r} (has {', '.join(map(str, users.columns))})"
            )
    titles = item_titles(items)
    history = histories(train)
    return [
        user_text(row, history.get(int(row["user"]), []), titles, n_recent, template)
        for row in users.to_dict("records")
    ]
