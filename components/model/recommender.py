"""The trained fusion model as a recommender: score, save and load without pickle.

A saved model directory holds ``model.json`` (name, network and training config, channel names, how
the fit went: ``fit``),
``weights.safetensors`` (the network, including the item text table), ``features.{json,npz}`` (the
channel suffixes, see :mod:`components.model.features`) and ``profiles.npz`` (profile embeddings of
known users). It scores known users from any history and cold users from a profile embedding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Self

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file

from components.core.storage import write_json
from components.model.features import FeatureBank
from components.model.net import FusionNet, NetConfig

NAME = "metarec"
WEIGHTS = "weights.safetensors"
PROFILES = "profiles.npz"
#: What a saved model keeps of its fit summary: the cold-item refit repeats ``best_epoch``.
FIT_KEYS = ("best_epoch", "epochs_run", "early_stopping", "fit_users", "epoch_users")


class MetarecRecommender:
    """Fusion model wrapper with the ``Recommender`` interface of the baselines."""

    name = NAME

    def __init__(
        self,
        net: FusionNet,
        bank: FeatureBank,
        profile: np.ndarray,
        train: sp.csr_matrix,
        config: dict[str, Any] | None = None,
        fit: dict[str, Any] | None = None,
    ) -> None:
        self.net = net.eval()
        self.bank = bank
        self.profile = np.asarray(profile, dtype=np.float32)
        self.train = sp.csr_matrix(train, dtype=np.float32)
        self.config = dict(config or {})
        self.fit_summary = dict(fit or {})  # empty for models saved before it was kept

    def fit(self, train: sp.csr_matrix) -> Self:
        """Not supported: the fusion model is fitted by :func:`components.model.loop.train`."""
        raise NotImplementedError(
            "train the fusion model with components.model.loop.train (metarec stage train)"
        )

    def score(self, users: np.ndarray, history: sp.csr_matrix | None = None) -> np.ndarray:
        """Scores ``(len(users), n_items)`` of known users; ``history`` defaults to training."""
        users = np.asarray(users, dtype=np.int64)
        hist = self.train if history is None else sp.csr_matrix(history, dtype=np.float32)
        return self.score_rows(hist[users], self.profile[users], users=users)

    def score_rows(
        self,
        history: sp.csr_matrix,
        profile: np.ndarray,
        users: np.ndarray | None = None,
        attributes: dict[str, sp.csr_matrix] | None = None,
    ) -> np.ndarray:
        """Scores from explicit rows: works for cold users (``users`` None, ``attributes`` from a profile)."""
        feats = self.bank.rows(history, users, attributes)
        with torch.no_grad():
            out = self.net(
                torch.from_numpy(np.asarray(history.toarray(), dtype=np.float32)),
                torch.from_numpy(np.asarray(profile, dtype=np.float32)),
                torch.from_numpy(feats),
            )
        return np.asarray(out.numpy(), dtype=np.float32)

    def save(self, directory: Path) -> None:
        """Write the model directory (see the module docstring)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(directory / WEIGHTS))
        self.bank.save(directory)
        coo = self.train.tocoo()
        np.savez(
            directory / PROFILES,
            profile=self.profile,
            train_rows=coo.row.astype(np.int64),
            train_cols=coo.col.astype(np.int64),
            train_shape=np.asarray(self.train.shape, dtype=np.int64),
        )
        write_json(
            directory / "model.json",
            {
                "name": NAME,
                "format_version": 1,
                "net": self.net.cfg.to_dict(),
                "channels": self.bank.names,
                "config": self.config,
                "fit": self.fit_summary,
            },
        )

    @classmethod
    def load(cls, directory: Path) -> Self:
        """Read a model directory written by :meth:`save`."""
        directory = Path(directory)
        meta = json.loads((directory / "model.json").read_text(encoding="utf-8"))
        if meta.get("name") != NAME:
            raise ValueError(f"{directory} holds model {meta.get('name')!r}, not {NAME!r}")
        state = load_file(str(directory / WEIGHTS))
        cfg = NetConfig(**meta["net"])
        net = FusionNet(
            cfg,
            state["item_text"],
            state["warm"],
            channel_text=state.get("channel_text"),
            item_attributes=state.get("item_attributes"),
        )
        net.load_state_dict(state)
        bank = FeatureBank.load(directory)
        with np.load(directory / PROFILES, allow_pickle=False) as data:
            shape = tuple(int(x) for x in data["train_shape"])
            rows, cols = data["train_rows"], data["train_cols"]
            train = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)
            profile = data["profile"]
        return cls(net, bank, profile, train, meta.get("config"), meta.get("fit"))
