"""Seeded synthetic datasets in RecBole atomic format, for tests and scale benchmarks.

Users, items and entities get power-law (Zipf-like) popularity, as real interaction logs and knowledge
graphs do: a few hubs, a long tail. Sizes are exact: the requested numbers of interactions and triples
are unique (user, item) pairs and unique (head, relation, tail) triples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.core.storage import atomic_dir


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes and shape of a synthetic dataset."""

    n_users: int = 1000
    n_items: int = 500
    n_entities: int = 2000
    n_relations: int = 4
    n_interactions: int = 20000
    n_triples: int = 8000
    # Zipf exponent of popularity: ~1 resembles MovieLens item popularity.
    exponent: float = 1.0
    # Share of items that have a KG entity (.link row); the rest are KG-less, as in ml-100k.
    link_fraction: float = 0.95
    seed: int = 0

    def check(self) -> None:
        """Reject sizes that cannot be generated."""
        for name in ("n_users", "n_items", "n_entities", "n_relations"):
            if getattr(self, name) < 1:
                raise ValueError(f"synthetic: {name} must be >= 1")
        if not 0 < self.n_interactions <= self.n_users * self.n_items:
            raise ValueError("synthetic: n_interactions must be in 1..n_users*n_items")
        linked = max(1, int(self.n_items * self.link_fraction))
        if not 0 <= self.n_triples <= linked * self.n_entities * self.n_relations:
            raise ValueError("synthetic: n_triples exceeds the possible distinct triples")


#: The scale benchmarks' graphs (users, items, entities, relations, interactions, triples). "large" is
#: issue 17's target; mining, serving and the whole pipeline are measured on all three.
SIZES = {
    "small": SyntheticSpec(10_000, 2_000, 20_000, 8, 500_000, 200_000, seed=1),
    "medium": SyntheticSpec(30_000, 6_000, 60_000, 8, 1_500_000, 600_000, seed=1),
    "large": SyntheticSpec(100_000, 20_000, 200_000, 8, 5_000_000, 2_000_000, seed=1),
}


def _zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    rng.shuffle(weights)  # hubs are not always the lowest ids
    return weights / weights.sum()


def _unique_pairs(
    n: int, a_size: int, b_size: int, pa: np.ndarray, pb: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    # Sample with replacement, keep first occurrences, top up until exactly n distinct pairs exist;
    # if heavy hubs make collisions dominate, finish with uniform pairs so the loop always ends.
    keys = np.empty(0, dtype=np.int64)
    rounds = 0
    while keys.size < n:
        need = n - keys.size
        size = int(need * 1.3) + 16
        if rounds < 20:
            a = rng.choice(a_size, size=size, p=pa)
            b = rng.choice(b_size, size=size, p=pb)
        else:
            a = rng.integers(0, a_size, size=size)
            b = rng.integers(0, b_size, size=size)
        new = a.astype(np.int64) * b_size + b
        merged = np.concatenate([keys, new])
        _, first = np.unique(merged, return_index=True)
        keys = merged[np.sort(first)]
        rounds += 1
    keys = keys[:n]
    return keys // b_size, keys % b_size


def generate(spec: SyntheticSpec, dest: Path, name: str = "synthetic") -> dict[str, int]:
    """Write ``<name>.inter/.item/.user/.kg/.link`` for ``spec`` into ``dest``; return the counts."""
    spec.check()
    rng = np.random.default_rng(spec.seed)
    pu = _zipf_weights(spec.n_users, spec.exponent, rng)
    pi = _zipf_weights(spec.n_items, spec.exponent, rng)
    users, items = _unique_pairs(spec.n_interactions, spec.n_users, spec.n_items, pu, pi, rng)
    timestamps = rng.integers(1_000_000_000, 1_100_000_000, size=users.size)
    ratings = rng.integers(1, 6, size=users.size)

    n_linked = max(1, int(spec.n_items * spec.link_fraction))
    linked_items = np.sort(rng.choice(spec.n_items, size=n_linked, replace=False))
    pe = _zipf_weights(spec.n_entities, spec.exponent, rng)
    # One (item, relation) slot per head/relation pair, entities drawn by popularity.
    n_slots = n_linked * spec.n_relations
    slot, tails = _unique_pairs(
        spec.n_triples, n_slots, spec.n_entities, np.full(n_slots, 1.0 / n_slots), pe, rng
    )
    heads = linked_items[slot // spec.n_relations]
    relations = slot % spec.n_relations

    genres = np.array(
        ["Action", "Comedy", "Drama", "Horror", "Romance", "Thriller", "Documentary", "Animation"]
    )
    occupations = np.array(["student", "engineer", "artist", "doctor", "writer", "retired", "other"])
    with atomic_dir(dest) as tmp:
        pd.DataFrame(
            {
                "user_id:token": users + 1,
                "item_id:token": items + 1,
                "rating:float": ratings,
                "timestamp:float": timestamps,
            }
        ).to_csv(tmp / f"{name}.inter", sep="\t", index=False)
        item_genres = [
            " ".join(sorted(set(rng.choice(genres, size=rng.integers(1, 4))))) for _ in range(spec.n_items)
        ]
        pd.DataFrame(
            {
                "item_id:token": np.arange(1, spec.n_items + 1),
                "movie_title:token_seq": [f"Item {k}" for k in range(1, spec.n_items + 1)],
                "class:token_seq": item_genres,
                # From a generator of its own, so every other column stays as it was before years existed.
                "release_year:token": np.random.default_rng([spec.seed, 1]).integers(
                    1950, 2000, size=spec.n_items
                ),
            }
        ).to_csv(tmp / f"{name}.item", sep="\t", index=False)
        pd.DataFrame(
            {
                "user_id:token": np.arange(1, spec.n_users + 1),
                "age:token": rng.integers(10, 75, size=spec.n_users),
                "gender:token": rng.choice(np.array(["F", "M"]), size=spec.n_users),
                "occupation:token": rng.choice(occupations, size=spec.n_users),
            }
        ).to_csv(tmp / f"{name}.user", sep="\t", index=False)
        pd.DataFrame(
            {"item_id:token": linked_items + 1, "entity_id:token": [f"m.i{k + 1}" for k in linked_items]}
        ).to_csv(tmp / f"{name}.link", sep="\t", index=False)
        pd.DataFrame(
            {
                "head_id:token": [f"m.i{k + 1}" for k in heads],
                "relation_id:token": [f"rel.r{r}" for r in relations],
                "tail_id:token": [f"m.e{e}" for e in tails],
            }
        ).to_csv(tmp / f"{name}.kg", sep="\t", index=False)
    return {
        "users": spec.n_users,
        "items": spec.n_items,
        "interactions": int(users.size),
        "triples": int(heads.size),
        "linked_items": n_linked,
    }
