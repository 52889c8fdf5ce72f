"""Mining: score every candidate metapath on validation and greedily select a complementary set.

Each candidate is judged by the ranking quality of its scores alone (NDCG@10 and Recall@50 over the
full catalogue, training items excluded), its coverage (share of validation users it scores anything
for, share of validation interactions it reaches) and its density (share of user×item pairs with a
path). Selection is greedy: starting from nothing, add the candidate whose addition most improves
validation NDCG@10 of a simple combined scorer — the sum of each selected metapath's scores,
normalised per user by their maximum so dense and sparse paths speak on one scale — and stop at
``top_k`` or when the gain falls below ``min_gain``.

Work is split into blocks of validation users; each block is an independent map step whose partial
sums are reduced afterwards, so the blocks can run on any executor (threads, processes, Dask) and the
result does not depend on which.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from components.evaluation.metrics import hits_matrix, ndcg_from_hits, recall_from_hits
from components.evaluation.ranking import topk_items
from components.metapaths.counting import Counter, Weighting
from components.metapaths.schema import Metapath

NDCG_K = 10
RECALL_K = 50


@dataclass
class BlockStats:
    """Additive statistics of one block of validation users, per candidate or per combination."""

    users: int
    ndcg: np.ndarray  # sum over users, one entry per candidate
    recall: np.ndarray
    covered_users: np.ndarray
    reached_pairs: np.ndarray
    nonzero_pairs: np.ndarray
    truth_pairs: int
    all_pairs: int

    def __add__(self, other: BlockStats) -> BlockStats:
        return BlockStats(
            self.users + other.users,
            self.ndcg + other.ndcg,
            self.recall + other.recall,
            self.covered_users + other.covered_users,
            self.reached_pairs + other.reached_pairs,
            self.nonzero_pairs + other.nonzero_pairs,
            self.truth_pairs + other.truth_pairs,
            self.all_pairs + other.all_pairs,
        )


def _ranking_sums(scores: np.ndarray, exclude: sp.csr_matrix, truth: sp.csr_matrix) -> tuple[float, float]:
    k = min(RECALL_K, scores.shape[1])
    top = topk_items(scores, k, exclude)
    hits = hits_matrix(top, truth)
    # Only items the scorer actually reaches count: the index-order tie-break among zero scores
    # must not earn a metapath credit for items it says nothing about.
    top_scores = np.take_along_axis(scores, np.clip(top, 0, None), axis=1)
    hits &= (top >= 0) & (top_scores > 0)
    n_truth = np.diff(truth.indptr)
    # The metric definitions are the evaluation's own, applied to this masked hits matrix.
    return float(ndcg_from_hits(hits, n_truth, min(NDCG_K, k)).sum()), float(
        recall_from_hits(hits, n_truth, k).sum()
    )


def normalise_rows(scores: np.ndarray) -> np.ndarray:
    """Divide each row by its maximum (rows of zeros stay zero)."""
    peak = scores.max(axis=1, keepdims=True)
    return np.divide(scores, peak, out=np.zeros_like(scores), where=peak > 0)


# Relative weights tried when a candidate joins the selection: a dense, weak path may help only
# as a tie-breaker, which equal weights would not reveal.
WEIGHTS = (0.05, 0.2, 1.0)


def block_stats(
    counter: Counter,
    candidates: Sequence[Metapath],
    users: np.ndarray,
    exclude: sp.csr_matrix,
    truth: sp.csr_matrix,
    base: Sequence[tuple[Metapath, float]] = (),
) -> BlockStats:
    """Statistics for one block of users: each candidate alone, or added to the weighted ``base``.

    With a base, the statistics have one column per (candidate, weight in WEIGHTS) pair, candidate-major.
    ``exclude`` and ``truth`` are the block's rows (training items, validation items).
    """
    weights = WEIGHTS if base else (1.0,)
    n = len(candidates) * len(weights)
    stats = BlockStats(
        len(users),
        np.zeros(n),
        np.zeros(n),
        np.zeros(n),
        np.zeros(n),
        np.zeros(n),
        int(truth.nnz),
        len(users) * truth.shape[1],
    )
    combined = combined_scores(counter, base, users)
    truth_mask = truth.toarray() > 0
    for c, path in enumerate(candidates):
        raw = counter.block(path, users)
        nonzero = raw > 0
        for w, weight in enumerate(weights):
            col = c * len(weights) + w
            scores = combined + weight * normalise_rows(raw) if base else raw
            stats.ndcg[col], stats.recall[col] = _ranking_sums(scores, exclude, truth)
            stats.covered_users[col] = float((nonzero.any(axis=1) | (combined.max(axis=1) > 0)).sum())
            stats.reached_pairs[col] = float((nonzero & truth_mask).sum())
            stats.nonzero_pairs[col] = float(nonzero.sum())
    return stats


Selection = Sequence[tuple[Metapath, float]]
MapFn = Callable[[list[np.ndarray], Sequence[Metapath], Selection], list[BlockStats]]


def serial_map(counter: Counter, exclude: sp.csr_matrix, truth: sp.csr_matrix) -> MapFn:
    """A map function that runs every block in this process, one after another."""

    def run(blocks: list[np.ndarray], candidates: Sequence[Metapath], base: Selection) -> list[BlockStats]:
        return [block_stats(counter, candidates, b, exclude[b], truth[b], base) for b in blocks]

    return run


def summarise(stats: BlockStats, candidates: Sequence[Metapath]) -> list[dict[str, Any]]:
    """Per-candidate averages from reduced block statistics."""
    out = []
    for c, path in enumerate(candidates):
        out.append(
            {
                "id": path.id,
                "name": path.name,
                "length": path.length,
                f"ndcg@{NDCG_K}": stats.ndcg[c] / stats.users,
                f"recall@{RECALL_K}": stats.recall[c] / stats.users,
                "user_coverage": stats.covered_users[c] / stats.users,
                "pair_coverage": stats.reached_pairs[c] / max(stats.truth_pairs, 1),
                "density": stats.nonzero_pairs[c] / max(stats.all_pairs, 1),
            }
        )
    return out


def select(
    candidates: Sequence[Metapath],
    blocks: list[np.ndarray],
    map_fn: MapFn,
    top_k: int,
    min_gain: float = 1e-4,
    shortlist: int = 15,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Score all candidates, then greedily select up to ``top_k``.

    Returns:
        (one row of statistics per candidate, the greedy selection's steps).
    """
    if not candidates:
        raise ValueError("no candidate metapaths to mine")
    if top_k < 1:
        raise ValueError("top_k must be >= 1")
    total = _reduce(map_fn(blocks, candidates, ()))
    rows = summarise(total, candidates)
    key = f"ndcg@{NDCG_K}"
    # Greedy rounds re-score combinations; restricting them to the best individual candidates keeps
    # the cost at O(top_k × shortlist) block passes instead of O(top_k × all candidates).
    order = sorted(range(len(candidates)), key=lambda c: (-rows[c][key], candidates[c].id))
    pool = [candidates[c] for c in order[:shortlist] if rows[c]["user_coverage"] > 0]
    selected: list[tuple[Metapath, float]] = []
    steps: list[dict[str, Any]] = []
    current = 0.0
    while pool and len(selected) < top_k:
        weights = WEIGHTS if selected else (1.0,)
        round_stats = (
            _reduce(map_fn(blocks, pool, selected)) if selected else _subset(total, candidates, pool)
        )
        scores = round_stats.ndcg / round_stats.users
        best = int(np.argmax(scores))
        gain = float(scores[best]) - current
        chosen = pool[best // len(weights)]
        if selected and gain < min_gain:
            steps.append(
                {
                    "round": len(selected) + 1,
                    "stopped": True,
                    "best_candidate": chosen.id,
                    "best_name": chosen.name,
                    "gain": gain,
                }
            )
            break
        pool.remove(chosen)
        weight = weights[best % len(weights)]
        selected.append((chosen, weight))
        current = float(scores[best])
        steps.append(
            {
                "round": len(selected),
                "selected": chosen.id,
                "name": chosen.name,
                "weight": weight,
                "combined_ndcg": current,
                "gain": gain,
            }
        )
    selected_paths = [p for p, _ in selected]
    rank = {p.id: r for r, p in enumerate(selected_paths, start=1)}
    weight_of = {p.id: w for p, w in selected}
    for row in rows:
        row["selected"] = row["id"] in rank
        row["selection_rank"] = rank.get(row["id"])
        row["weight"] = weight_of.get(row["id"])
    return rows, steps


def _reduce(parts: list[BlockStats]) -> BlockStats:
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def _subset(stats: BlockStats, candidates: Sequence[Metapath], pool: Sequence[Metapath]) -> BlockStats:
    index = [list(candidates).index(p) for p in pool]
    return BlockStats(
        stats.users,
        stats.ndcg[index],
        stats.recall[index],
        stats.covered_users[index],
        stats.reached_pairs[index],
        stats.nonzero_pairs[index],
        stats.truth_pairs,
        stats.all_pairs,
    )


def combined_scores(counter: Counter, selected: Selection, users: np.ndarray) -> np.ndarray:
    """The combined scorer used for selection: weighted sum of row-normalised metapath scores."""
    total = np.zeros((len(users), len(counter.graph.node_ids["item"])), dtype=np.float64)
    for path, weight in selected:
        total += weight * normalise_rows(counter.block(path, users))
    return total


@dataclass(frozen=True)
class ContextSpec:
    """Where a mining worker finds its inputs; small and picklable, so it travels to any executor."""

    graph_dir: str
    split_dir: str
    weighting: Weighting
    damping: float
    suffix_budget_bytes: int
    # Content version of the inputs (sizes and mtimes): a long-lived worker that cached the previous
    # run's graph must not reuse it after the stage outputs were replaced at the same paths.
    version: str = ""

    @classmethod
    def for_inputs(cls, graph_dir: Path, split_dir: Path, cfg: Any) -> ContextSpec:
        """The spec for a workspace's graph and split under a ``MineConfig``."""
        files = [
            graph_dir / "graph.json",
            graph_dir / "relations.npz",
            split_dir / "train.parquet",
            split_dir / "valid.parquet",
        ]
        version = ";".join(f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files if p.exists())
        return cls(
            str(graph_dir), str(split_dir), cfg.weighting, cfg.damping, cfg.suffix_budget_mb << 20, version
        )


@dataclass
class Context:
    """A worker's loaded inputs: the counter over the training graph, train and valid matrices."""

    counter: Counter
    train: sp.csr_matrix
    valid: sp.csr_matrix


_CONTEXTS: dict[ContextSpec, Context] = {}
_CONTEXT_LOCK = threading.Lock()


def load_context(spec: ContextSpec) -> Context:
    """Load (once per process) the graph with training interactions and the split matrices."""
    with _CONTEXT_LOCK:
        return _load_context_locked(spec)


def _load_context_locked(spec: ContextSpec) -> Context:
    if spec not in _CONTEXTS:
        from components.data.kg import load_graph, with_interactions
        from components.data.split import load_split, to_matrix

        graph = load_graph(Path(spec.graph_dir))
        parts = load_split(Path(spec.split_dir))
        n_users, n_items = len(graph.node_ids["user"]), len(graph.node_ids["item"])
        train = to_matrix(parts.train, n_users, n_items)
        valid = to_matrix(parts.valid, n_users, n_items)
        counter = Counter(
            with_interactions(graph, train),
            spec.weighting,
            spec.damping,
            spec.suffix_budget_bytes,
        )
        _CONTEXTS[spec] = Context(counter, train, valid)
    return _CONTEXTS[spec]


def validation_blocks(
    valid: sp.csr_matrix, sample_users: int, block_size: int, seed: int
) -> list[np.ndarray]:
    """Validation users (a seeded sample when there are more than ``sample_users``) cut into blocks."""
    users = np.flatnonzero(np.diff(valid.indptr) > 0)
    if len(users) == 0:
        raise ValueError("no user has validation interactions; metapaths cannot be scored")
    if len(users) > sample_users:
        users = np.sort(np.random.default_rng(seed).choice(users, size=sample_users, replace=False))
    return [users[i : i + block_size] for i in range(0, len(users), block_size)]


def popularity_ndcg(train: sp.csr_matrix, valid: sp.csr_matrix, blocks: list[np.ndarray]) -> float:
    """Validation NDCG@10 of the popularity ranking on the same users, for the mining report."""
    counts = np.asarray(train.sum(axis=0), dtype=np.float64).ravel()
    total, users = 0.0, 0
    for block in blocks:
        scores = np.tile(counts + 1e-9, (len(block), 1))  # every item is "reached"
        ndcg, _ = _ranking_sums(scores, train[block], valid[block])
        total += ndcg
        users += len(block)
    return total / users


def candidate_features(
    counter: Counter, selected: Selection, train: sp.csr_matrix, per_user: int, block_size: int
) -> pd.DataFrame:
    """Top ``per_user`` unseen items per user under the combined scorer, with each metapath's score.

    This is the hand-off to the model: one row per (user, item) candidate with one column per
    selected metapath (``f0``, ``f1``, … in selection order) and the combined score.
    """
    n_users, n_items = train.shape
    k = min(per_user, n_items)
    frames = []
    for start in range(0, n_users, block_size):
        users = np.arange(start, min(start + block_size, n_users))
        feats = [counter.block(path, users) for path, _ in selected]
        combined = sum(w * normalise_rows(f) for f, (_, w) in zip(feats, selected, strict=True))
        top = topk_items(np.asarray(combined), k, train[users])
        rows = np.repeat(users, k)
        items = top.ravel()
        keep = items >= 0
        frame = {
            "user": rows[keep].astype(np.int32),
            "item": items[keep].astype(np.int32),
            "combined": np.take_along_axis(np.asarray(combined), np.clip(top, 0, None), 1).ravel()[keep],
        }
        for j, f in enumerate(feats):
            frame[f"f{j}"] = np.take_along_axis(f, np.clip(top, 0, None), 1).ravel()[keep].astype(np.float32)
        frames.append(pd.DataFrame(frame))
    return pd.concat(frames, ignore_index=True)
