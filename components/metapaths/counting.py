"""Count metapath instances with sparse commuting matrices, one block of users at a time.

The commuting matrix of a metapath r1 r2 … rk is the product A1 A2 … Ak of its relations' instance
matrices; entry (u, i) counts the path instances from user u to item i. Three weightings:

- ``count``: raw instance counts.
- ``dwpc``: degree-weighted path counts (Himmelstein & Baranzini 2015): every relation matrix becomes
  D_src^-w A D_dst^-w, so each instance is damped by the degrees of the nodes it passes through.
  Hubs such as a genre shared by 40% of films stop dominating.
- ``pathsim``: counts normalised by the geometric mean of u's outgoing and i's incoming path counts,
  M_ui / sqrt(M_u· M_·i): PathSim's idea of penalising prolific endpoints, for endpoints of different
  types (PathSim's 2M_xy/(M_xx+M_yy) needs a symmetric path).

Memory stays bounded: no dense users×items matrix larger than one block is formed. When the product
of all relations after the first (an item×item matrix for user–item–X–item paths) fits the
``suffix_budget_bytes``, it is computed once and every block is one product with it; otherwise the
chain is multiplied left to right per block.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.sparse as sp

from components.data.kg import HeteroGraph
from components.metapaths.schema import Metapath

Weighting = Literal["count", "dwpc", "pathsim"]
# Sparse intermediates denser than this are cheaper as dense arrays.
_DENSE_SWITCH = 0.15
# A suffix whose chain passes through at most this many nodes of one type is low-rank: cheaper to
# multiply per block than to expand into a (possibly dense) items×items matrix.
LOW_RANK = 1024


def _inv_power(degrees: np.ndarray, w: float) -> np.ndarray:
    out = np.zeros_like(degrees, dtype=np.float64)
    nz = degrees > 0
    out[nz] = degrees[nz] ** -w
    return out


def damped_matrix(graph: HeteroGraph, key: str, damping: float) -> sp.csr_matrix:
    """D_src^-w A D_dst^-w for one schema edge key (plain A, as float64, when ``damping`` is 0)."""
    base = graph.matrix(key).astype(np.float64).tocsr()
    if damping > 0:
        rows = _inv_power(np.asarray(base.sum(axis=1)).ravel(), damping)
        cols = _inv_power(np.asarray(base.sum(axis=0)).ravel(), damping)
        base = (sp.diags(rows) @ base @ sp.diags(cols)).tocsr()
    return base


@dataclass
class Counter:
    """Computes metapath score blocks on one graph with one weighting; caches reusable products."""

    graph: HeteroGraph
    weighting: Weighting = "dwpc"
    damping: float = 0.5
    suffix_budget_bytes: int = 2 << 30
    low_rank: int = LOW_RANK
    _mats: dict[str, sp.csr_matrix] = field(default_factory=dict, init=False, repr=False)
    _suffix: dict[tuple[str, ...], sp.csr_matrix | np.ndarray | None] = field(
        default_factory=dict, init=False, repr=False
    )
    _cached_bytes: int = field(default=0, init=False, repr=False)
    _inner: dict[tuple[str, ...], int] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _norms: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        if self.weighting not in ("count", "dwpc", "pathsim"):
            raise ValueError(f"unknown weighting {self.weighting!r}; expected count, dwpc or pathsim")
        if self.damping < 0:
            raise ValueError("damping must be >= 0")

    def matrix(self, key: str) -> sp.csr_matrix:
        """The (weighted) instance matrix of one schema edge key, float64 for exact counts."""
        if key not in self._mats:
            damping = self.damping if self.weighting == "dwpc" else 0.0
            self._mats[key] = damped_matrix(self.graph, key, damping)
        return self._mats[key]

    def _suffix_product(self, path: Metapath) -> sp.csr_matrix | np.ndarray | None:
        keys = path.keys[1:]
        if not keys:
            return None
        # Thread-pool workers share this counter: one of them computes a suffix while the others
        # wait, instead of each building its own multi-GB copy.
        with self._lock:
            return self._suffix_locked(keys)

    def _suffix_locked(self, keys: tuple[str, ...]) -> sp.csr_matrix | np.ndarray | None:
        if keys not in self._suffix:
            n_rows = self.matrix(keys[0]).shape[0]
            n_items = self.matrix(keys[-1]).shape[1]
            inner = min(self.matrix(k).shape[0] for k in keys[1:]) if len(keys) > 1 else n_rows
            if n_rows * n_items * 8 > self.suffix_budget_bytes or inner <= self.low_rank:
                # Too big even dense, or a narrow middle (8 genres) that makes the per-block chain
                # cheaper than an items×items product: multiply the chain per user block instead.
                self._suffix[keys] = None
                return None
            if not self._make_room(n_rows * n_items * 8, inner):
                self._suffix[keys] = None
                return None
            product = self._chunked_product(keys, n_rows)
            self._suffix[keys] = product
            self._inner[keys] = inner
            self._cached_bytes += _nbytes(product)
        return self._suffix[keys]

    def _make_room(self, size: int, inner: int) -> bool:
        """Free budget for a suffix of ``size`` bytes; False if it should not be cached.

        Suffixes are used block after block and candidate after candidate, so evicting one to cache
        another would recompute both over and over. A cached suffix is only given up for one whose
        per-block chain would be costlier (a wider middle: users rather than entities).
        """
        if self._cached_bytes + size <= self.suffix_budget_bytes:
            return True
        victims = sorted(
            (k for k, v in self._suffix.items() if v is not None and self._inner[k] < inner),
            key=lambda k: self._inner[k],
        )
        freed = 0
        chosen = []
        for key in victims:
            if self._cached_bytes - freed + size <= self.suffix_budget_bytes:
                break
            chosen.append(key)
            freed += _nbytes(self._suffix[key])
        if self._cached_bytes - freed + size > self.suffix_budget_bytes:
            return False
        for key in chosen:
            self._suffix[key] = None
        self._cached_bytes -= freed
        return True

    def _chunked_product(self, keys: tuple[str, ...], n_rows: int) -> sp.csr_matrix | np.ndarray:
        # Row chunks bound the sparse intermediates: an item×user×item product can be nearly dense,
        # and materialising it as sparse first would take several times its dense size.
        chunk = max(1, min(n_rows, (256 << 20) // max(1, 8 * self.matrix(keys[-1]).shape[1])))
        parts: list[sp.csr_matrix | np.ndarray] = []
        for start in range(0, n_rows, chunk):
            acc: sp.csr_matrix | np.ndarray = self.matrix(keys[0])[start : start + chunk]
            for key in keys[1:]:
                acc = _multiply(acc, self.matrix(key))
            parts.append(acc)
        if all(sp.issparse(p) for p in parts):
            return sp.vstack(parts).tocsr()
        return np.vstack([p.toarray() if sp.issparse(p) else p for p in parts])  # type: ignore[union-attr]

    def raw_block(self, path: Metapath, users: np.ndarray) -> np.ndarray:
        """Weighted path counts (before any pathsim normalisation) for a block: (len(users), n_items)."""
        first = self.matrix(path.keys[0])[users]
        suffix = self._suffix_product(path)
        if path.length == 1:
            acc: sp.csr_matrix | np.ndarray = first
        elif suffix is not None:
            acc = _multiply(first, suffix)
        else:
            acc = first
            for key in path.keys[1:]:
                acc = _multiply(acc, self.matrix(key))
        dense = acc.toarray() if isinstance(acc, sp.spmatrix | sp.sparray) else acc
        return np.asarray(dense, dtype=np.float64)

    def endpoint_sums(self, path: Metapath) -> tuple[np.ndarray, np.ndarray]:
        """Row sums (paths out of each user) and column sums (paths into each item), via vector chains."""
        if path.keys not in self._norms:
            mats = [self.matrix(k) for k in path.keys]
            rows = np.ones(mats[-1].shape[1])
            for m in reversed(mats):
                rows = m @ rows
            cols = np.ones(mats[0].shape[0])
            for m in mats:
                cols = m.T @ cols
            self._norms[path.keys] = (np.asarray(rows).ravel(), np.asarray(cols).ravel())
        return self._norms[path.keys]

    def block(self, path: Metapath, users: np.ndarray) -> np.ndarray:
        """Scores of ``path`` for a block of users under the counter's weighting: (len(users), n_items)."""
        users = np.asarray(users, dtype=np.int64)
        scores = self.raw_block(path, users)
        if self.weighting == "pathsim":
            rows, cols = self.endpoint_sums(path)
            denom = np.sqrt(np.outer(rows[users], cols))
            scores = np.divide(scores, denom, out=np.zeros_like(scores), where=denom > 0)
        return scores


def _nbytes(matrix: sp.csr_matrix | np.ndarray) -> int:
    if isinstance(matrix, np.ndarray):
        return int(matrix.nbytes)
    return int(matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes)


def _multiply(
    left: sp.csr_matrix | np.ndarray, right: sp.csr_matrix | np.ndarray
) -> sp.csr_matrix | np.ndarray:
    if not sp.issparse(right):
        return np.asarray(left @ right)
    if sp.issparse(left):
        out = (left @ right).tocsr()
        rows, cols = out.shape
        if rows and cols and out.nnz > _DENSE_SWITCH * rows * cols:
            return np.asarray(out.toarray())
        return out
    # dense @ sparse: scipy's fast path is sparse @ dense, so transpose around it.
    return np.asarray((right.T @ np.asarray(left).T).T)
