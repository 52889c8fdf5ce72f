"""Metapath feature channels of the fusion model, as matrices a server can apply without the graph.

A user→item metapath ``r1 r2 … rk`` factors into the user's row of its first relation (the user's
history for ``interacted``, a one-hot attribute for ``user.occupation``) times the product of the
remaining relations, the *suffix* (source × items). Under PathSim weighting the user's own path count
only scales the row, which the per-user max normalisation cancels, so every channel is

    f_c(u, ·) = normalise_rows(src_c(u) @ S_c),   S_c = (A2 … Ak) · diag(1 / sqrt(M_·i))

and equals ``normalise_rows(Counter.block(path, u))`` of the mining stage (tested). Keeping only
``S_c`` means a new interaction or a cold user's profile changes the features at once, without the
training graph. Besides mined metapaths there are two non-path channels: item popularity (log counts)
and, optionally, an EASE item–item channel (a learned ``user–item–user–item`` path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from components.baselines import ease_matrix
from components.core.storage import read_json, write_json
from components.data.kg import INTERACTED, HeteroGraph
from components.metapaths.counting import Counter
from components.metapaths.schema import Metapath

#: Dense suffixes up to this size (256 MiB: ml-100k's 1682 items take 11 MB); larger ones stay factored.
DENSE_BUDGET_BYTES = 256 << 20
#: A chain's intermediate product filled beyond this share is made dense before the next factor: on the
#: large synthetic graph a 128-user batch's ``user–item–user`` product is 96% full, and the next product
#: took 3.3 s sparse @ sparse against 0.6 s dense @ sparse (the same values).
DENSE_FILL = 0.1
#: Items an EASE channel covers at most (``model.metarec.ease_max_items``; see :func:`ease_suffix`).
EASE_MAX_ITEMS = 5000
HISTORY = "history"
CONSTANT = "constant"
FEATURES_JSON = "features.json"
FEATURES_NPZ = "features.npz"


@dataclass
class Factors:
    """A suffix kept as its chain: ``diag(row_scale) · F1 ⋯ Fk · diag(col_scale)``, each ``F`` sparse.

    Memory grows with the graph's edges instead of ``n_source × n_items``; applying it to a few source
    rows is a few sparse products. Equal to the dense suffix up to float rounding (tested).
    """

    factors: list[sp.csr_matrix]
    row_scale: np.ndarray | None = None  # (n_source,) or None
    col_scale: np.ndarray | None = None  # (n_items,) or None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.factors[0].shape[0], self.factors[-1].shape[1])

    @property
    def nbytes(self) -> int:
        sizes = [f.data.nbytes + f.indices.nbytes + f.indptr.nbytes for f in self.factors]
        return int(sum(sizes)) + sum(int(v.nbytes) for v in (self.row_scale, self.col_scale) if v is not None)

    def apply(self, src: sp.spmatrix, block: int = 1024) -> np.ndarray:
        """``src @ suffix`` as a dense float32 array, ``block`` source rows at a time.

        Blocks bound the sparse intermediates (their fill-in can exceed the dense output several times
        over when the training loop applies a channel to every user at once).
        """
        rows = sp.csr_matrix(src, dtype=np.float32)
        out = np.empty((rows.shape[0], self.shape[1]), dtype=np.float32)
        for start in range(0, rows.shape[0], block):
            acc: Any = rows[start : start + block]
            if self.row_scale is not None:
                acc = acc.multiply(self.row_scale[None, :]).tocsr()
            for factor in self.factors:
                if sp.issparse(acc) and acc.nnz > DENSE_FILL * acc.shape[0] * acc.shape[1]:
                    acc = acc.toarray()  # then dense @ sparse, several times faster than sparse @ sparse
                acc = acc @ factor
            out[start : start + block] = acc.toarray() if sp.issparse(acc) else np.asarray(acc)
        if self.col_scale is not None:
            out *= self.col_scale[None, :]
        return out

    def dense(self) -> np.ndarray:
        """The whole suffix (tests and small graphs only)."""
        return self.apply(sp.identity(self.shape[0], dtype=np.float32, format="csr"))


@dataclass
class Channel:
    """One feature channel: where its source row comes from and its suffix (dense, or as factors)."""

    name: str
    # "history" (the user's interacted items), "constant" (same row for everyone) or a user-attribute
    # relation key such as "user.occupation" whose rows are one-hot over that attribute's values.
    source: str
    # (n_source, n_items) float32, (1, n_items) for a constant channel; or its sparse chain when the dense
    # matrix would exceed the bank's budget (a 20k-item catalogue makes 1.6 GB per dense channel).
    suffix: np.ndarray | Factors
    kind: str = "metapath"  # metapath | popularity | ease
    metapath_id: str | None = None

    def apply(self, src: sp.spmatrix) -> np.ndarray:
        """``src @ suffix``, float32 ``(n, n_items)``."""
        if isinstance(self.suffix, Factors):
            return self.suffix.apply(src)
        return np.asarray(src @ self.suffix, dtype=np.float32)


@dataclass
class FeatureBank:
    """The channels of a trained model plus the user-attribute rows they need."""

    channels: list[Channel]
    n_items: int
    # relation key -> (n_users, n_values) CSR rows of known users, for attribute-sourced channels
    user_attributes: dict[str, sp.csr_matrix] = field(default_factory=dict)
    # relation key -> attribute value ids, so a cold user's profile can be mapped to a one-hot row
    attribute_values: dict[str, list[str]] = field(default_factory=dict)
    # relation key -> the profile field it was built from (``user.age_bucket`` <- ``age``)
    attribute_fields: dict[str, str] = field(default_factory=dict)
    # Upper edges of the age buckets the graph used, to bucket a cold user's raw age the same way.
    age_buckets: list[int] = field(default_factory=list)

    @property
    def collaborative(self) -> np.ndarray:
        """Channels that reach an item only through its interactions (zero for a cold item)."""
        return np.asarray(
            [
                c.kind in ("popularity", "ease") or (c.metapath_id or "").split("|")[-1] == INTERACTED
                for c in self.channels
            ],
            dtype=bool,
        )

    @property
    def names(self) -> list[str]:
        """Channel names in order."""
        return [c.name for c in self.channels]

    def rows(
        self,
        history: sp.csr_matrix,
        users: np.ndarray | None = None,
        attributes: dict[str, sp.csr_matrix] | None = None,
    ) -> np.ndarray:
        """Feature tensor ``(n, n_channels, n_items)`` float32 for ``n`` users.

        Args:
            history: ``(n, n_items)`` binary history rows of the users.
            users: Indices of known users (for attribute-sourced channels), or None.
            attributes: Attribute rows ``(n, n_values)`` per relation key for users not in the
                training graph (cold users); takes precedence over ``users``.
        """
        n = history.shape[0]
        out = np.zeros((n, len(self.channels), self.n_items), dtype=np.float32)
        for c, channel in enumerate(self.channels):
            if channel.source == CONSTANT:
                out[:, c, :] = np.asarray(channel.suffix)[0]
                continue
            if channel.source == HISTORY:
                src = history
            elif attributes is not None and channel.source in attributes:
                src = attributes[channel.source]
            elif users is not None:
                src = self.user_attributes[channel.source][users]
            else:
                continue  # an attribute the caller does not know: the channel stays zero
            out[:, c, :] = _normalise(channel.apply(src))
        return out

    def profile_attributes(self, profile: dict[str, str]) -> dict[str, sp.csr_matrix]:
        """One-hot attribute rows for one cold user's profile (unknown values give an empty row)."""
        from components.data.kg import age_bucket

        out = {}
        for key, values in self.attribute_values.items():
            field_name = self.attribute_fields.get(key) or (key.split(".", 1)[1] if "." in key else key)
            row = sp.csr_matrix((1, len(values)), dtype=np.float32)
            value = profile.get(field_name)
            if value is not None and field_name == "age" and self.age_buckets:
                try:
                    value = age_bucket(str(value), self.age_buckets)
                except ValueError:
                    value = None  # not a number: no age channel rather than a wrong one
            if value is not None and str(value) in values:
                row = sp.csr_matrix(
                    (np.ones(1, np.float32), ([0], [values.index(str(value))])), shape=(1, len(values))
                )
            out[key] = row
        return out

    def save(self, directory: Path) -> None:
        """Write ``features.json`` and ``features.npz`` (no pickle)."""
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {
            "n_items": self.n_items,
            "channels": [],
            "attributes": {},
            "age_buckets": list(self.age_buckets),
        }
        for c, channel in enumerate(self.channels):
            entry: dict[str, Any] = {
                "name": channel.name,
                "source": channel.source,
                "kind": channel.kind,
                "metapath_id": channel.metapath_id,
            }
            if isinstance(channel.suffix, Factors):
                chain = channel.suffix
                entry["factors"] = len(chain.factors)
                for j, factor in enumerate(chain.factors):
                    for part in ("data", "indices", "indptr"):
                        arrays[f"factor_{c}_{j}_{part}"] = getattr(factor, part)
                    arrays[f"factor_{c}_{j}_shape"] = np.asarray(factor.shape, dtype=np.int64)
                for name in ("row_scale", "col_scale"):
                    value = getattr(chain, name)
                    if value is not None:
                        arrays[f"{name}_{c}"] = value.astype(np.float32)
            else:
                arrays[f"suffix_{c}"] = channel.suffix.astype(np.float32)
            meta["channels"].append(entry)
        for a, (key, matrix) in enumerate(sorted(self.user_attributes.items())):
            coo = matrix.tocoo()
            arrays[f"attr_{a}_rows"] = coo.row.astype(np.int64)
            arrays[f"attr_{a}_cols"] = coo.col.astype(np.int64)
            meta["attributes"][key] = {
                "index": a,
                "shape": list(matrix.shape),
                "values": self.attribute_values.get(key, []),
                "field": self.attribute_fields.get(key, ""),
            }
        np.savez(Path(directory) / FEATURES_NPZ, **arrays)  # type: ignore[arg-type]
        write_json(Path(directory) / FEATURES_JSON, meta)

    @classmethod
    def load(cls, directory: Path) -> FeatureBank:
        """Read what :meth:`save` wrote."""
        meta = read_json(Path(directory) / FEATURES_JSON)
        with np.load(Path(directory) / FEATURES_NPZ, allow_pickle=False) as data:
            channels = [
                Channel(m["name"], m["source"], _read_suffix(data, c, m), m["kind"], m["metapath_id"])
                for c, m in enumerate(meta["channels"])
            ]
            attributes, values, fields = {}, {}, {}
            for key, info in meta["attributes"].items():
                fields[key] = info.get("field", "")
                a = info["index"]
                rows, cols = data[f"attr_{a}_rows"], data[f"attr_{a}_cols"]
                attributes[key] = sp.csr_matrix(
                    (np.ones(len(rows), np.float32), (rows, cols)), shape=tuple(info["shape"])
                )
                values[key] = list(info["values"])
        return cls(
            channels, int(meta["n_items"]), attributes, values, fields, list(meta.get("age_buckets", []))
        )


def _read_suffix(data: Any, c: int, meta: dict[str, Any]) -> np.ndarray | Factors:
    if not meta.get("factors"):
        return np.asarray(data[f"suffix_{c}"])
    factors = [
        sp.csr_matrix(
            tuple(data[f"factor_{c}_{j}_{part}"] for part in ("data", "indices", "indptr")),
            shape=tuple(int(x) for x in data[f"factor_{c}_{j}_shape"]),
        )
        for j in range(int(meta["factors"]))
    ]
    scales = [data[f"{n}_{c}"] if f"{n}_{c}" in data.files else None for n in ("row_scale", "col_scale")]
    return Factors(factors, scales[0], scales[1])


def _normalise(raw: np.ndarray) -> np.ndarray:
    """Divide each row by its largest absolute value; all-zero rows stay zero."""
    peak = np.abs(raw).max(axis=1, keepdims=True)
    return np.divide(raw, peak, out=np.zeros_like(raw), where=peak > 0)


def _scales(counter: Counter, path: Metapath) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The suffix's row and column scales (float64), None where the weighting has none."""
    if path.length < 2:
        raise ValueError(f"metapath {path.id} has no suffix: length-1 paths only restate the history")
    rows = cols = None
    if counter.weighting == "dwpc" and counter.damping > 0:
        # DWPC also damps the first relation by its destination degrees: a column scale of the user's
        # source row, folded into the suffix's rows so the source row stays binary.
        degrees = np.asarray(counter.graph.matrix(path.keys[0]).sum(axis=0), dtype=np.float64).ravel()
        rows = np.divide(1.0, degrees**counter.damping, out=np.zeros_like(degrees), where=degrees > 0)
    if counter.weighting == "pathsim":
        _, sums = counter.endpoint_sums(path)
        cols = np.divide(1.0, np.sqrt(sums), out=np.zeros_like(sums), where=sums > 0)
    return rows, cols


def suffix_factors(counter: Counter, path: Metapath) -> Factors:
    """The suffix ``S`` of a metapath (see the module docstring) as its sparse chain, float32."""
    rows, cols = _scales(counter, path)
    factors = [sp.csr_matrix(counter.matrix(key), dtype=np.float32) for key in path.keys[1:]]
    return Factors(
        factors,
        None if rows is None else rows.astype(np.float32),
        None if cols is None else cols.astype(np.float32),
    )


def suffix_matrix(counter: Counter, path: Metapath) -> np.ndarray:
    """The dense suffix ``S`` of a metapath (see the module docstring), float32."""
    rows, cols = _scales(counter, path)
    acc: Any = counter.matrix(path.keys[1])
    for key in path.keys[2:]:
        acc = acc @ counter.matrix(key)
    dense = acc.toarray() if sp.issparse(acc) else np.asarray(acc)
    if rows is not None:
        dense = rows[:, None] * dense
    if cols is not None:
        dense = dense * cols[None, :]
    return np.asarray(dense, dtype=np.float32)


def popularity_row(train: sp.csr_matrix) -> np.ndarray:
    """``log1p(count) / log1p(max count)`` per item, a (1, n_items) row."""
    counts = np.asarray(train.sum(axis=0), dtype=np.float64).ravel()
    top = np.log1p(counts.max()) if counts.max() > 0 else 1.0
    return (np.log1p(counts) / top).astype(np.float32)[None, :]


def ease_suffix(train: sp.csr_matrix, l2: float, max_items: int) -> np.ndarray | Factors:
    """The EASE channel's suffix: the dense weights up to ``max_items`` items, else a bounded chain.

    Beyond ``max_items`` EASE is fitted on the ``max_items`` most interacted items alone and kept as
    ``pick · B · pickᵀ`` (``pick`` the items × chosen selection): memory and solve time depend on
    ``max_items``, not on the catalogue, and the other items score zero on this channel.
    """
    n_items = train.shape[1]
    if n_items <= max_items:
        return ease_matrix(train, l2)
    counts = np.asarray(train.sum(axis=0)).ravel()
    chosen = np.sort(np.argsort(-counts, kind="stable")[:max_items])
    weights = ease_matrix(sp.csr_matrix(train[:, chosen]), l2)
    ones = np.ones(len(chosen), dtype=np.float32)
    pick = sp.csr_matrix((ones, (chosen, np.arange(len(chosen)))), shape=(n_items, len(chosen)))
    return Factors([pick, sp.csr_matrix(weights), sp.csr_matrix(pick.T)])


def build_bank(
    graph: HeteroGraph,
    train: sp.csr_matrix,
    paths: list[Metapath],
    weighting: str,
    damping: float,
    ease_l2: float | None,
    age_buckets: list[int] | None = None,
    dense_budget_bytes: int = DENSE_BUDGET_BYTES,
    popularity: bool = True,
    ease_max_items: int = EASE_MAX_ITEMS,
) -> FeatureBank:
    """Channels for ``paths`` on ``graph`` with ``train`` as its interactions, plus popularity/EASE.

    Args:
        graph: The typed graph (its ``interacted`` relation is replaced by ``train``).
        train: Binary users × items matrix the features are computed from.
        paths: User→item metapaths of length ≥ 2.
        weighting: The mining weighting (``pathsim``, ``dwpc`` or ``count``).
        damping: DWPC damping.
        ease_l2: L2 of the EASE channel, or None for no EASE channel.
        age_buckets: The graph's age bucket edges (``kg.age_buckets``), for cold users' raw ages.
        dense_budget_bytes: A metapath channel whose dense suffix would take more than this is kept as
            its sparse chain (:class:`Factors`); at or below it, dense (faster to apply).
        popularity: Whether to add the item-popularity channel.
        ease_max_items: Above this many items the EASE channel covers the most interacted ones only
            (:func:`ease_suffix`).

    The bank may have no channel at all (no paths, no popularity, no EASE): the scorer then has
    text and ID terms only.
    """
    from components.data.kg import with_interactions

    counter = Counter(with_interactions(graph, train), weighting, damping)  # type: ignore[arg-type]
    n_items = train.shape[1]
    channels = []
    attributes: dict[str, sp.csr_matrix] = {}
    values: dict[str, list[str]] = {}
    fields: dict[str, str] = {}
    for path in paths:
        first = path.keys[0]
        source = HISTORY if first == INTERACTED else first
        if source != HISTORY:
            attributes[first] = counter.graph.matrix(first).tocsr().astype(np.float32)
            values[first] = list(counter.graph.node_ids[path.types[1]])
            source_fields = counter.graph.relations[first].source
            fields[first] = source_fields[0] if source_fields else ""
        n_source = counter.matrix(path.keys[1]).shape[0]
        dense = n_source * n_items * 4 <= dense_budget_bytes
        suffix = suffix_matrix(counter, path) if dense else suffix_factors(counter, path)
        channels.append(Channel(path.label or path.id, source, suffix, "metapath", path.id))
    if popularity:
        channels.append(Channel("popularity", CONSTANT, popularity_row(train), "popularity"))
    if ease_l2 is not None:
        channels.append(Channel("ease", HISTORY, ease_suffix(train, ease_l2, ease_max_items), "ease"))
    return FeatureBank(channels, n_items, attributes, values, fields, list(age_buckets or []))
