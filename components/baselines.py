"""Baseline recommenders (popularity, item-kNN, BPR-MF, EASE) with pickle-free persistence.

All models train on a binary implicit matrix ``train`` (users x items, CSR) and score the full
catalogue for a batch of users. A saved model is a directory holding ``model.json`` (name, config,
shapes) and ``arrays.npz`` (numpy arrays) or, for a sparse item-kNN similarity,
``similarity.npz`` (scipy sparse format); both load with pickling disabled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self, runtime_checkable

import numpy as np
import scipy.sparse as sp

from components.evaluation.ranking import topk_items

MODEL_JSON = "model.json"
ARRAYS_NPZ = "arrays.npz"
SIMILARITY_NPZ = "similarity.npz"
FORMAT_VERSION = 1

EpochCallback = Callable[[int, float], None]


@runtime_checkable
class Recommender(Protocol):
    """Interface shared by every recommender that pipelines train, evaluate and serve."""

    name: str

    def fit(self, train: sp.csr_matrix) -> Self:
        """Train on a binary users x items CSR matrix and return ``self``."""
        ...

    def score(self, users: np.ndarray, history: sp.csr_matrix | None = None) -> np.ndarray:
        """Return float32 scores ``(len(users), n_items)``; ``history`` overrides training history."""
        ...

    def save(self, directory: Path) -> None:
        """Write the fitted model to ``directory`` without pickle."""
        ...

    @classmethod
    def load(cls, directory: Path) -> Self:
        """Read a model written by :meth:`save`."""
        ...


def _as_binary_csr(matrix: Any, what: str) -> sp.csr_matrix:
    """Return a float32 CSR copy with every stored interaction set to 1.0."""
    if not sp.issparse(matrix):
        raise ValueError(f"{what} must be a scipy sparse matrix, got {type(matrix).__name__}")
    csr = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    if csr.ndim != 2:
        raise ValueError(f"{what} must be 2-D, got shape {csr.shape}")
    csr.sum_duplicates()
    csr.eliminate_zeros()
    csr.data[:] = 1.0
    return csr


def _check_users(users: np.ndarray, n_users: int) -> np.ndarray:
    """Validate a 1-D array of user indices against the number of known users."""
    arr = np.asarray(users)
    if arr.ndim != 1:
        raise ValueError(f"users must be a 1-D array of user indices, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"users must hold integer indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= n_users):
        raise ValueError(f"user indices must lie in [0, {n_users}), got range [{arr.min()}, {arr.max()}]")
    return arr


def _history_rows(
    users: np.ndarray, history: sp.csr_matrix | None, train: sp.csr_matrix, n_items: int
) -> sp.csr_matrix:
    """Binary history rows of ``users``: from ``history`` when given, else the training matrix."""
    if history is None:
        hist = train
    else:
        if not sp.issparse(history) or history.shape[1] != n_items:
            raise ValueError(
                f"history must be a sparse matrix with {n_items} item columns, got "
                f"{getattr(history, 'shape', type(history).__name__)}"
            )
        hist = sp.csr_matrix(history)
    idx = _check_users(users, int(hist.shape[0]))
    return _as_binary_csr(hist[idx], "history")


def _write_model_json(
    directory: Path, name: str, config: Mapping[str, Any], n_users: int, n_items: int
) -> None:
    """Record what is needed to rebuild the model: class name, config and matrix shape."""
    payload = {
        "name": name,
        "format_version": FORMAT_VERSION,
        "config": dict(config),
        "n_users": int(n_users),
        "n_items": int(n_items),
    }
    (directory / MODEL_JSON).write_text(
        json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def _read_model_json(directory: Path, expected_name: str | None = None) -> dict[str, Any]:
    """Read and sanity-check ``model.json``, optionally insisting on a model name."""
    path = Path(directory) / MODEL_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no {MODEL_JSON} in {directory}; not a saved model directory")
    meta: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    if expected_name is not None and meta.get("name") != expected_name:
        raise ValueError(f"{path} describes model {meta.get('name')!r}, not {expected_name!r}")
    return meta


def _load_arrays(directory: Path) -> dict[str, np.ndarray]:
    """Load every array of ``arrays.npz`` into memory."""
    # allow_pickle=False so a tampered artifact cannot execute code on load.
    with np.load(Path(directory) / ARRAYS_NPZ, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


class _NotFittedMixin:
    """Shared guard so every model fails loudly when used before ``fit``/``load``."""

    _fitted: bool = False

    def _require_fitted(self) -> None:
        """Raise if the model holds no trained state."""
        if not self._fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit() or load() first")


class PopRecommender(_NotFittedMixin):
    """Recommend the most interacted-with items to everybody."""

    name: str = "pop"

    def __init__(self) -> None:
        self.n_users = 0
        self.item_counts = np.zeros(0, dtype=np.float32)

    def get_config(self) -> dict[str, Any]:
        """Return the constructor parameters (none for this model)."""
        return {}

    def fit(self, train: sp.csr_matrix) -> Self:
        """Count training interactions per item.

        Args:
            train: Binary users x items CSR matrix.

        Returns:
            ``self``.
        """
        csr = _as_binary_csr(train, "train")
        self.n_users = int(csr.shape[0])
        self.item_counts = np.asarray(csr.sum(axis=0), dtype=np.float32).ravel()
        self._fitted = True
        return self

    def score(self, users: np.ndarray, history: sp.csr_matrix | None = None) -> np.ndarray:
        """Score every item by its training interaction count, identically for all users.

        Args:
            users: 1-D int array of user indices in ``[0, n_users)``.
            history: Ignored; accepted so callers can treat all models alike.

        Returns:
            Float32 array ``(len(users), n_items)``.
        """
        self._require_fitted()
        idx = _check_users(users, self.n_users)
        return np.tile(self.item_counts, (idx.size, 1))

    def save(self, directory: Path) -> None:
        """Write ``model.json`` and ``arrays.npz`` to ``directory`` (created if missing)."""
        self._require_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(directory / ARRAYS_NPZ, item_counts=self.item_counts)
        _write_model_json(directory, self.name, self.get_config(), self.n_users, self.item_counts.size)

    @classmethod
    def load(cls, directory: Path) -> Self:
        """Read a model written by :meth:`save`."""
        meta = _read_model_json(directory, cls.name)
        arrays = _load_arrays(directory)
        model = cls(**meta["config"])
        model.n_users = int(meta["n_users"])
        model.item_counts = arrays["item_counts"].astype(np.float32, copy=False)
        model._fitted = True
        return model


class ItemKNNRecommender(_NotFittedMixin):
    """Item-based collaborative filtering with cosine similarity.

    ``score(u, i) = sum_{j in history(u)} sim(i, j)`` where ``sim`` is the cosine similarity of
    the items' binary user vectors with a zero diagonal, optionally truncated to each item's
    ``neighbours`` most similar items (ties broken by lower item index).
    """

    name: str = "itemknn"
    # Above this many items a dense float32 similarity (n_items^2 * 4 bytes) gets too large.
    DEFAULT_DENSE_MAX_ITEMS: ClassVar[int] = 20_000
    _BLOCK: ClassVar[int] = 2048

    def __init__(self, neighbours: int | None = None, dense_max_items: int = DEFAULT_DENSE_MAX_ITEMS) -> None:
        """Configure the model.

        Args:
            neighbours: Keep only this many most similar items per item; ``None`` keeps all.
            dense_max_items: Store the similarity densely when ``n_items`` is at most this.

        Raises:
            ValueError: If ``neighbours`` is not a positive integer or ``None``.
        """
        if neighbours is not None and (
            isinstance(neighbours, bool) or int(neighbours) != neighbours or neighbours < 1
        ):
            raise ValueError(f"neighbours must be a positive integer or None, got {neighbours!r}")
        self.neighbours = None if neighbours is None else int(neighbours)
        self.dense_max_items = int(dense_max_items)
        self.n_users = 0
        self.n_items = 0
        # Stored transposed (weights[j, i] = sim(i, j)) so scoring is history @ weights without a copy.
        self._weights: np.ndarray | sp.csr_matrix = np.zeros((0, 0), dtype=np.float32)
        self._train: sp.csr_matrix = sp.csr_matrix((0, 0), dtype=np.float32)

    def get_config(self) -> dict[str, Any]:
        """Return the constructor parameters."""
        return {"neighbours": self.neighbours, "dense_max_items": self.dense_max_items}

    @property
    def similarity(self) -> np.ndarray | sp.csr_matrix:
        """Item-item similarity ``sim[i, j]`` (dense ndarray or sparse CSR), diagonal zero."""
        self._require_fitted()
        return self._weights.T if isinstance(self._weights, np.ndarray) else self._weights.T.tocsr()

    def fit(self, train: sp.csr_matrix) -> Self:
        """Compute the item-item cosine similarity from ``train``.

        Args:
            train: Binary users x items CSR matrix; kept as the default scoring history.

        Returns:
            ``self``.
        """
        csr = _as_binary_csr(train, "train")
        self.n_users, self.n_items = (int(s) for s in csr.shape)
        self._train = csr
        counts = np.asarray(csr.sum(axis=0), dtype=np.float64).ravel()
        inv_norm = np.divide(1.0, np.sqrt(counts), out=np.zeros_like(counts), where=counts > 0)
        if self.n_items <= self.dense_max_items:
            sim: np.ndarray | sp.csr_matrix = self._dense_similarity(csr, inv_norm)
        else:
            sim = self._sparse_similarity(csr, inv_norm)
        self._weights = np.ascontiguousarray(sim.T) if isinstance(sim, np.ndarray) else sim.T.tocsr()
        self._fitted = True
        return self

    def _dense_similarity(self, csr: sp.csr_matrix, inv_norm: np.ndarray) -> np.ndarray:
        """Build the dense cosine similarity, then truncate rows to ``neighbours`` if set."""
        n = self.n_items
        csc = csr.tocsc()
        xt = csc.T.tocsr()
        sim = np.empty((n, n), dtype=np.float32)
        # Column blocks keep the sparse intermediate small even when co-occurrence is dense.
        for start in range(0, n, self._BLOCK):
            stop = min(start + self._BLOCK, n)
            block = (xt @ csc[:, start:stop]).toarray()
            block *= inv_norm[:, None]
            block *= inv_norm[None, start:stop]
            sim[:, start:stop] = block
        np.fill_diagonal(sim, 0.0)
        if self.neighbours is not None and self.neighbours < n - 1:
            for start in range(0, n, self._BLOCK):
                rows = sim[start : start + self._BLOCK]
                keep_idx = topk_items(rows, self.neighbours, None)
                mask = np.zeros(rows.shape, dtype=bool)
                np.put_along_axis(mask, keep_idx, True, axis=1)
                rows[~mask] = 0.0
        return sim

    def _sparse_similarity(self, csr: sp.csr_matrix, inv_norm: np.ndarray) -> sp.csr_matrix:
        """Build the sparse cosine similarity, then truncate rows to ``neighbours`` if set."""
        n = self.n_items
        co = (csr.T.tocsr() @ csr).tocoo()
        off_diag = co.row != co.col
        rows = co.row[off_diag].astype(np.int64)
        cols = co.col[off_diag].astype(np.int64)
        vals = co.data[off_diag].astype(np.float64) * inv_norm[rows] * inv_norm[cols]
        if self.neighbours is not None:
            # Sort by (row, -sim, col) so each row's first `neighbours` entries are its top-N with
            # the same lower-index tie-break as the dense path.
            order = np.lexsort((cols, -vals, rows))
            rows, cols, vals = rows[order], cols[order], vals[order]
            row_start = np.searchsorted(rows, np.arange(n))
            rank = np.arange(rows.size) - row_start[rows]
            keep = rank < self.neighbours
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
        sim = sp.csr_matrix((vals.astype(np.float32), (rows, cols)), shape=(n, n))
        sim.eliminate_zeros()
        return sim

    def score(self, users: np.ndarray, history: sp.csr_matrix | None = None) -> np.ndarray:
        """Score all items for ``users`` from their interaction history.

        Args:
            users: 1-D int array of row indices into ``history`` (or the training matrix).
            history: Optional users x items matrix (e.g. train + validation) whose rows replace the
                training rows as each user's history; it is binarised.

        Returns:
            Float32 array ``(len(users), n_items)``.

        Raises:
            ValueError: If ``history`` has the wrong number of item columns or ``users`` is out of range.
        """
        self._require_fitted()
        rows = _history_rows(users, history, self._train, self.n_items)
        out = rows @ self._weights
        if sp.issparse(out):
            out = out.toarray()
        return np.asarray(out, dtype=np.float32)

    def save(self, directory: Path) -> None:
        """Write ``model.json``, the training history and the similarity to ``directory``."""
        self._require_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {
            "train_indptr": self._train.indptr,
            "train_indices": self._train.indices,
        }
        if isinstance(self._weights, np.ndarray):
            arrays["weights"] = self._weights
        else:
            sp.save_npz(directory / SIMILARITY_NPZ, self._weights, compressed=True)
        np.savez(directory / ARRAYS_NPZ, **arrays)  # type: ignore[arg-type]
        _write_model_json(directory, self.name, self.get_config(), self.n_users, self.n_items)

    @classmethod
    def load(cls, directory: Path) -> Self:
        """Read a model written by :meth:`save`."""
        directory = Path(directory)
        meta = _read_model_json(directory, cls.name)
        arrays = _load_arrays(directory)
        model = cls(**meta["config"])
        model.n_users, model.n_items = int(meta["n_users"]), int(meta["n_items"])
        indices = arrays["train_indices"]
        model._train = sp.csr_matrix(
            (np.ones(indices.size, dtype=np.float32), indices, arrays["train_indptr"]),
            shape=(model.n_users, model.n_items),
        )
        if "weights" in arrays:
            model._weights = arrays["weights"].astype(np.float32, copy=False)
        else:
            model._weights = sp.csr_matrix(sp.load_npz(directory / SIMILARITY_NPZ), dtype=np.float32)
        model._fitted = True
        return model


class BPRRecommender(_NotFittedMixin):
    """Matrix factorisation trained with the BPR pairwise loss and uniform negative sampling.

    Training is deterministic for a given ``seed`` (numpy drives sampling and shuffling, a seeded
    ``torch.Generator`` drives initialisation) on a given machine and thread count.
    """

    name: str = "bpr"

    def __init__(
        self,
        dim: int = 64,
        lr: float = 1e-3,
        reg: float = 1e-4,
        epochs: int = 30,
        batch_size: int = 2048,
        init_std: float = 0.1,
        num_threads: int = 2,
        seed: int = 0,
        on_epoch: EpochCallback | None = None,
    ) -> None:
        """Configure the model.

        Args:
            dim: Embedding size.
            lr: Adam learning rate.
            reg: L2 coefficient on the user, positive and negative embeddings of each batch.
            epochs: Passes over all training interactions.
            batch_size: Triplets per optimiser step.
            init_std: Standard deviation of the normal embedding initialisation.
            num_threads: Torch CPU threads during ``fit``, capped at 2 to share small machines.
            seed: Seed for sampling, shuffling and initialisation.
            on_epoch: Optional ``callback(epoch, mean_loss)`` called after each epoch (0-based),
                e.g. to log to MLflow.

        Raises:
            ValueError: On non-positive sizes, rates or epochs, or a negative ``reg``.
        """
        for label, value in (
            ("dim", dim),
            ("epochs", epochs),
            ("batch_size", batch_size),
            ("num_threads", num_threads),
        ):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if not reg >= 0:
            raise ValueError(f"reg must be non-negative, got {reg!r}")
        if not init_std > 0:
            raise ValueError(f"init_std must be positive, got {init_std!r}")
        self.dim = int(dim)
        self.lr = float(lr)
        self.reg = float(reg)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.init_std = float(init_std)
        self.num_threads = min(int(num_threads), 2)
        self.seed = int(seed)
        self.on_epoch = on_epoch
        self.loss_history: list[float] = []
        self.user_emb = np.zeros((0, self.dim), dtype=np.float32)
        self.item_emb = np.zeros((0, self.dim), dtype=np.float32)

    def get_config(self) -> dict[str, Any]:
        """Return the JSON-serialisable constructor parameters (the callback is not one)."""
        return {
            "dim": self.dim,
            "lr": self.lr,
            "reg": self.reg,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "init_std": self.init_std,
            "num_threads": self.num_threads,
            "seed": self.seed,
        }

    def fit(self, train: sp.csr_matrix) -> Self:
        """Train user and item embeddings with BPR on ``train``.

        Args:
            train: Binary users x items CSR matrix.

        Returns:
            ``self``; per-epoch mean losses are in ``loss_history``.

        Raises:
            ValueError: If ``train`` has fewer than two items.
        """
        csr = _as_binary_csr(train, "train")
        n_users, n_items = (int(s) for s in csr.shape)
        if n_items < 2:
            raise ValueError("BPR needs at least two items to sample negatives")
        rng = np.random.default_rng(self.seed)
        import torch  # only BPR needs it; the rest of this module is imported by serving

        gen = torch.Generator().manual_seed(self.seed)

        degree = np.diff(csr.indptr)
        pos_users = np.repeat(np.arange(n_users, dtype=np.int64), degree)
        pos_items = csr.indices.astype(np.int64)
        # A user who interacted with every item has no negative to contrast with.
        usable = degree[pos_users] < n_items
        pos_users, pos_items = pos_users[usable], pos_items[usable]
        # CSR rows are sorted by user and (after sum_duplicates) by item, so keys are sorted.
        pos_keys = pos_users * n_items + pos_items

        user_w = torch.nn.Parameter(torch.randn(n_users, self.dim, generator=gen) * self.init_std)
        item_w = torch.nn.Parameter(torch.randn(n_items, self.dim, generator=gen) * self.init_std)
        optimiser = torch.optim.Adam([user_w, item_w], lr=self.lr)

        self.loss_history = []
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        try:
            for epoch in range(self.epochs):
                order = rng.permutation(pos_users.size)
                users_e, pos_e = pos_users[order], pos_items[order]
                neg_e = self._sample_negatives(users_e, pos_keys, n_items, rng)
                total, count = 0.0, 0
                for start in range(0, users_e.size, self.batch_size):
                    sl = slice(start, start + self.batch_size)
                    u = torch.from_numpy(users_e[sl])
                    i = torch.from_numpy(pos_e[sl])
                    j = torch.from_numpy(neg_e[sl])
                    eu, ei, ej = user_w[u], item_w[i], item_w[j]
                    margin = (eu * (ei - ej)).sum(dim=1)
                    l2 = (eu.pow(2).sum(dim=1) + ei.pow(2).sum(dim=1) + ej.pow(2).sum(dim=1)).mean()
                    loss = -torch.nn.functional.logsigmoid(margin).mean() + self.reg * l2
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    total += float(loss.detach()) * u.numel()
                    count += u.numel()
                mean_loss = total / count if count else float("nan")
                self.loss_history.append(mean_loss)
                if self.on_epoch is not None:
                    self.on_epoch(epoch, mean_loss)
        finally:
            torch.set_num_threads(previous_threads)

        self.user_emb = user_w.detach().numpy().astype(np.float32, copy=True)
        self.item_emb = item_w.detach().numpy().astype(np.float32, copy=True)
        self._fitted = True
        return self

    @staticmethod
    def _sample_negatives(
        users: np.ndarray, pos_keys: np.ndarray, n_items: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Draw one uniform non-interacted item per user by vectorised rejection sampling."""
        neg = rng.integers(0, n_items, size=users.size, dtype=np.int64)
        redraw = np.arange(users.size)
        while redraw.size:
            keys = users[redraw] * n_items + neg[redraw]
            pos = np.searchsorted(pos_keys, keys)
            pos = np.minimum(pos, max(pos_keys.size - 1, 0))
            clash = pos_keys[pos] == keys if pos_keys.size else np.zeros(redraw.size, dtype=bool)
            redraw = redraw[clash]
            neg[redraw] = rng.integers(0, n_items, size=redraw.size, dtype=np.int64)
        return neg

    def score(self, users: np.ndarray, history: sp.csr_matrix | None = None) -> np.ndarray:
        """Score all items as user-item embedding dot products.

        Args:
            users: 1-D int array of user indices in ``[0, n_users)``.
            history: Ignored; accepted so callers can treat all models alike.

        Returns:
            Float32 array ``(len(users), n_items)``.
        """
        self._require_fitted()
        idx = _check_users(users, self.user_emb.shape[0])
        return np.asarray(self.user_emb[idx] @ self.item_emb.T, dtype=np.float32)

    def save(self, directory: Path) -> None:
        """Write ``model.json`` and the embeddings (``arrays.npz``) to ``directory``."""
        self._require_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(
            directory / ARRAYS_NPZ,
            user_emb=self.user_emb,
            item_emb=self.item_emb,
            loss_history=np.asarray(self.loss_history, dtype=np.float64),
        )
        _write_model_json(
            directory, self.name, self.get_config(), self.user_emb.shape[0], self.item_emb.shape[0]
        )

    @classmethod
    def load(cls, directory: Path) -> Self:
        """Read a model written by :meth:`save`."""
        meta = _read_model_json(directory, cls.name)
        arrays = _load_arrays(directory)
        model = cls(**meta["config"])
        model.user_emb = arrays["user_emb"].astype(np.float32, copy=False)
        model.item_emb = arrays["item_emb"].astype(np.float32, copy=False)
        model.loss_history = [float(x) for x in arrays["loss_history"]]
        model._fitted = True
        return model


def ease_matrix(train: sp.csr_matrix, l2: float) -> np.ndarray:
    """EASE item–item weights (Steck 2019) fitted on ``train``: B = -P/diag(P), zero diagonal."""
    # Solve in float64: G's condition number grows as l2 shrinks, and float32 loses the small
    # off-diagonal weights that carry the ranking.
    x = sp.csr_matrix(train, dtype=np.float64)
    gram = np.asarray((x.T @ x).toarray())
    gram[np.diag_indices_from(gram)] += l2
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return b.astype(np.float32)


class EASERecommender(_NotFittedMixin):
    """Embarrassingly Shallow Autoencoder (Steck, 2019): a closed-form item-item linear model.

    ``B = argmin ||X - XB||^2 + l2 ||B||^2`` subject to ``diag(B) = 0`` is, with ``G = XᵀX + l2·I``
    and ``P = G⁻¹``, ``B_ij = -P_ij / P_jj`` for ``i != j``; a user's scores are ``history @ B``.
    Fitting inverts a dense ``n_items x n_items`` matrix, so memory grows with ``n_items²`` (about
    8 bytes per entry while fitting, 4 once stored) and time with ``n_items³``.
    """

    name: str = "ease"

    # 500 is the usual starting point for ml-100k-sized data, but on ml-100k validation NDCG@10
    # l2=100 scored best (50: 0.137, 100: 0.140, 200: 0.139, 500: 0.132, 1000: 0.126, 2000: 0.124).
    DEFAULT_L2: ClassVar[float] = 100.0

    def __init__(self, l2: float = DEFAULT_L2) -> None:
        """Configure the model.

        Args:
            l2: Ridge penalty added to the diagonal of the item Gram matrix; larger values shrink
                the item-item weights towards zero.

        Raises:
            ValueError: If ``l2`` is not a finite positive number.
        """
        if isinstance(l2, bool) or not isinstance(l2, int | float | np.integer | np.floating):
            raise ValueError(f"l2 must be a positive number, got {l2!r}")
        if not (math.isfinite(float(l2)) and float(l2) > 0):
            raise ValueError(f"l2 must be a finite positive number, got {l2!r}")
        self.l2 = float(l2)
        self.n_users = 0
        self.n_items = 0
        self.weights = np.zeros((0, 0), dtype=np.float32)
        self._train: sp.csr_matrix = sp.csr_matrix((0, 0), dtype=np.float32)

    def get_config(self) -> dict[str, Any]:
        """Return the constructor parameters."""
        return {"l2": self.l2}

    def fit(self, train: sp.csr_matrix) -> Self:
        """Solve for the item-item weight matrix ``B`` in closed form.

        Args:
            train: Binary users x items CSR matrix; kept as the default scoring history.

        Returns:
            ``self``; the weights are in ``weights`` (float32, zero diagonal).
        """
        csr = _as_binary_csr(train, "train")
        self.n_users, self.n_items = (int(s) for s in csr.shape)
        self._train = csr
        self.weights = np.ascontiguousarray(ease_matrix(csr, self.l2))
        self._fitted = True
        return self

    def score(self, users: np.ndarray, history: sp.csr_matrix | None = None) -> np.ndarray:
        """Score all items for ``users`` as ``history @ B``.

        Args:
            users: 1-D int array of row indices into ``history`` (or the training matrix).
            history: Optional users x items matrix (e.g. train + validation) whose rows replace the
                training rows as each user's history; it is binarised.

        Returns:
            Float32 array ``(len(users), n_items)``.

        Raises:
            ValueError: If ``history`` has the wrong number of item columns or ``users`` is out of range.
        """
        self._require_fitted()
        rows = _history_rows(users, history, self._train, self.n_items)
        return np.asarray(rows @ self.weights, dtype=np.float32)

    def save(self, directory: Path) -> None:
        """Write ``model.json``, the training history and ``B`` (``arrays.npz``) to ``directory``."""
        self._require_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(
            directory / ARRAYS_NPZ,
            weights=self.weights,
            train_indptr=self._train.indptr,
            train_indices=self._train.indices,
        )
        _write_model_json(directory, self.name, self.get_config(), self.n_users, self.n_items)

    @classmethod
    def load(cls, directory: Path) -> Self:
        """Read a model written by :meth:`save`."""
        meta = _read_model_json(directory, cls.name)
        arrays = _load_arrays(directory)
        model = cls(**meta["config"])
        model.n_users, model.n_items = int(meta["n_users"]), int(meta["n_items"])
        indices = arrays["train_indices"]
        model._train = sp.csr_matrix(
            (np.ones(indices.size, dtype=np.float32), indices, arrays["train_indptr"]),
            shape=(model.n_users, model.n_items),
        )
        model.weights = arrays["weights"].astype(np.float32, copy=False)
        model._fitted = True
        return model


MODEL_CLASSES: dict[
    str, type[PopRecommender] | type[ItemKNNRecommender] | type[BPRRecommender] | type[EASERecommender]
] = {
    PopRecommender.name: PopRecommender,
    ItemKNNRecommender.name: ItemKNNRecommender,
    BPRRecommender.name: BPRRecommender,
    EASERecommender.name: EASERecommender,
}


def build_model(name: str, params: Mapping[str, Any] | None, seed: int) -> Recommender:
    """Construct an unfitted recommender by name.

    Args:
        name: One of ``"pop"``, ``"itemknn"``, ``"bpr"``, ``"ease"``.
        params: Constructor parameters of that model; ``None`` or empty for defaults.
        seed: Random seed, used by stochastic models (BPR) and ignored by deterministic ones.

    Returns:
        The unfitted model.

    Raises:
        ValueError: On an unknown model name, unknown parameters, or a ``seed`` in ``params`` that
            disagrees with ``seed``.
    """
    params = dict(params or {})
    if name == PopRecommender.name:
        _reject_unknown(name, params, set())
        return PopRecommender()
    if name == ItemKNNRecommender.name:
        _reject_unknown(name, params, {"neighbours", "dense_max_items"})
        return ItemKNNRecommender(**params)
    if name == BPRRecommender.name:
        if "seed" in params and int(params.pop("seed")) != int(seed):
            raise ValueError(f"params seed disagrees with seed={seed}; pass it once")
        allowed = {"dim", "lr", "reg", "epochs", "batch_size", "init_std", "num_threads", "on_epoch"}
        _reject_unknown(name, params, allowed)
        return BPRRecommender(seed=int(seed), **params)
    if name == EASERecommender.name:
        _reject_unknown(name, params, {"l2"})
        return EASERecommender(**params)
    raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODEL_CLASSES)}")


def _reject_unknown(name: str, params: Mapping[str, Any], allowed: set[str]) -> None:
    """Fail with a readable message instead of a constructor TypeError on a misspelt parameter."""
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(f"unknown parameters for {name!r}: {sorted(unknown)}; allowed: {sorted(allowed)}")


def load_model(directory: Path) -> Recommender:
    """Load any saved recommender, choosing the class from ``model.json``'s ``name``.

    Args:
        directory: A directory written by a recommender's ``save``.

    Returns:
        The fitted model.

    Raises:
        FileNotFoundError: If ``directory`` has no ``model.json``.
        ValueError: If the model name is unknown.
    """
    meta = _read_model_json(Path(directory))
    name = meta.get("name")
    if name not in MODEL_CLASSES:
        raise ValueError(f"{directory} holds unknown model {name!r}; expected one of {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[name].load(Path(directory))
