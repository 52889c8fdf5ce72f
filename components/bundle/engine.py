"""Serve a registered model bundle with ONNX Runtime: no torch, no pickle, no training graph rebuild.

A bundle (written by the export stage, see docs/serving.md) holds the int8 text encoder, the fp32
scorer, the feature channels' suffix matrices, the id tables, the training history and the graph for
explanations. :func:`load_bundle` returns a :class:`BundleEngine`, which implements the serving
``Engine`` protocol: rank items for a known user, or for a cold user from a profile and/or history,
with the top metapath instance behind each recommended item.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence, Set
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from components.bundle.runtime import SCORER_ONNX, OnnxEncoder, OnnxScorer
from components.data.kg import INTERACTED, HeteroGraph, Relation, load_graph
from components.metapaths.counting import damped_matrix
from components.metapaths.explain import INSTANCE_DAMPING, Namer, render
from components.metapaths.schema import Metapath, parse
from components.model.features import HISTORY, FeatureBank

SEEN = "seen.npz"
#: Items kept per remembered list: a request for ``k`` up to this many is a lookup once the list exists.
TOP_DEPTH = 20
#: Lists remembered for users with new history (feedback) or cold users with only a history, beyond the
#: precomputed known users'; the oldest go first.
MEMO_LIMIT = 20_000
#: Distinct cold-user profiles whose embeddings are remembered.
PROFILE_LIMIT = 4096


class TopList:
    """One remembered list: (item id, score, explanation) per rank, best first.

    ``encoded`` is a slot for the server's wire form of this list (components/serving/app.py fills it on
    first use), so a repeated request re-encodes nothing; the engine never reads it.
    """

    __slots__ = ("entries", "encoded")

    def __init__(self, entries: list[tuple[str, float, str | None]]) -> None:
        self.entries = entries
        self.encoded: Any = None


def _coo_matrix(data: Any, prefix: str) -> sp.csr_matrix:
    shape = tuple(int(x) for x in data[f"{prefix}_shape"])
    rows, cols = data[f"{prefix}_rows"], data[f"{prefix}_cols"]
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)


class Explainer:
    """The heaviest-flow instance of a metapath from a user (or a cold user's source row) to items.

    Enumerating every instance (``metarec explain``) is too slow for a request; here the weighted
    path counts from each node to each target are one sparse × dense product per step, and the
    instance follows, from the user, the neighbour carrying the most weighted paths to the target.
    """

    def __init__(self, graph: HeteroGraph, namer: Namer) -> None:
        self.graph = graph
        self.namer = namer
        self._weights: dict[str, sp.csr_matrix] = {}
        self._lock = threading.Lock()

    def weights(self, key: str) -> sp.csr_matrix:
        """Degree-damped instance weights of one relation key (cached; shared across threads)."""
        with self._lock:
            if key not in self._weights:
                self._weights[key] = damped_matrix(self.graph, key, INSTANCE_DAMPING).tocsr()
            return self._weights[key]

    def instances(
        self, path: Metapath, source: np.ndarray, items: np.ndarray, start: int
    ) -> list[str | None]:
        """Rendered instance per target item (None when the path does not reach it).

        Args:
            path: The metapath.
            source: Weights over the nodes after the first step (e.g. the history row), shape (n1,).
            items: Target item indices.
            start: The user's index (-1 for a cold user), excluded where a user reappears.
        """
        mats = [self.weights(k) for k in path.keys[1:]]
        targets = np.zeros((mats[-1].shape[1] if mats else len(source), len(items)), dtype=np.float64)
        targets[np.asarray(items), np.arange(len(items))] = 1.0
        flows = [targets]
        for step in range(len(mats) - 1, -1, -1):
            flow = np.asarray(mats[step] @ flows[0])
            # A walk back through the user asked about (you → film → you → …) explains nothing.
            if path.types[step + 1] == "user" and start >= 0:
                flow[start] = 0.0
            flows.insert(0, flow)
        out: list[str | None] = []
        for t, item in enumerate(items):
            first = source * flows[0][:, t]
            if not np.any(first > 0):
                out.append(None)
                continue
            nodes = [start, int(np.argmax(first))]
            for step, mat in enumerate(mats):
                row = slice(mat.indptr[nodes[-1]], mat.indptr[nodes[-1] + 1])
                cols = mat.indices[row]
                score = mat.data[row] * flows[step + 1][cols, t]
                nodes.append(int(cols[np.argmax(score)]))
            nodes[-1] = int(item)
            out.append(render(path, nodes, self.namer))
        return out


class BundleEngine:
    """A loaded bundle, safe to share between request threads.

    Rankings that depend only on the bundle and a user's history are remembered: the top
    :data:`TOP_DEPTH` items with their explanations, per (user, history added since training). A known
    user's list is computed once (:meth:`warm` computes them before the engine takes traffic) and a request
    for it is a lookup; new feedback changes the key, so that user's next request ranks afresh. Rankings
    with a profile are always computed. Every list equals what :meth:`rank` computes for the same input:
    the top ``k`` by score (ties by item index) is a prefix of the top ``TOP_DEPTH``, and an item's
    explanation does not depend on the other items in the list.
    """

    def __init__(self, directory: Path, version: str = "", threads: int = 1, provider: str = "cpu") -> None:
        directory = Path(directory)
        self.directory = directory
        self._version = version
        # Registration time (epoch seconds), set by a source that knows it; exported for the age alert.
        self.created_at: float | None = None
        self.manifest = json.loads((directory / "bundle.json").read_text(encoding="utf-8"))
        self.items = pd.read_parquet(directory / "items.parquet").sort_values("item")
        self.users = pd.read_parquet(directory / "users.parquet").sort_values("user")
        self._item_ids = self.items.item_id.astype(str).tolist()
        self._item_index = {item: k for k, item in enumerate(self._item_ids)}
        self._user_index = {u: k for k, u in enumerate(self.users.user_id.astype(str))}
        self.bank = FeatureBank.load(directory)
        with np.load(directory / "profiles.npz", allow_pickle=False) as data:
            self.profile = np.asarray(data["profile"], dtype=np.float32)
            self.history = _coo_matrix(data, "train")
        self.seen = self.history
        if (directory / SEEN).exists():
            with np.load(directory / SEEN, allow_pickle=False) as data:
                self.seen = _coo_matrix(data, "seen")
        self.scorer = OnnxScorer(directory / SCORER_ONNX, self.bank, self.profile, threads, provider)
        self._provider = provider
        self._encoder: OnnxEncoder | None = None
        self._threads = threads
        self._lock = threading.Lock()
        graph = load_graph(directory / "graph")
        relations = dict(graph.relations)
        relations[INTERACTED] = Relation(INTERACTED, "user", "item", self.history, ["train split"])
        self.graph = HeteroGraph(graph.node_ids, relations)
        named = self.items.rename(columns={"title": "movie_title"}) if "title" in self.items else self.items
        self.explainer = Explainer(self.graph, Namer(self.graph, named))
        schema = self.graph.schema
        self.paths: list[Metapath | None] = [
            parse(c.metapath_id, schema) if c.kind == "metapath" and c.metapath_id else None
            for c in self.bank.channels
        ]
        config = self.manifest.get("config", {})
        self.text_cfg = config.get("text", {})
        # Remembered lists: the precomputed known users' (never evicted) and the rest (bounded).
        self._warm: dict[tuple[str | None, tuple[str, ...]], TopList] = {}
        self._memo: dict[tuple[str | None, tuple[str, ...]], TopList] = {}
        self._memo_lock = threading.Lock()
        # Cold users' profile embeddings: demographics repeat, and one costs an encoder run.
        self._profiles: dict[tuple[tuple[str, str], ...], np.ndarray] = {}

    # --- Engine protocol -------------------------------------------------------------------------
    @property
    def version(self) -> str:
        """Registry version (empty when loaded from a directory outside the registry)."""
        return self._version

    @property
    def item_ids(self) -> Set[str]:
        """Every rankable item id."""
        return self._item_index.keys()

    def known_user(self, user_id: str) -> bool:
        """Whether the user was in the training data."""
        return str(user_id) in self._user_index

    def recommend(
        self,
        user_id: str | None,
        k: int,
        profile: dict[str, str] | None = None,
        history: Sequence[str] | None = None,
        explain: bool = True,
    ) -> list[dict[str, Any]]:
        """Top ``k`` unseen items with scores and explanations (see the serving ``Engine`` protocol)."""
        top = self.cached(user_id, k, profile, history, explain)
        if top is not None:
            return top
        if profile is not None or k > TOP_DEPTH or (user_id is None and not history):
            return self.rank(user_id, k, profile, history, explain)
        found = self._remember(
            self._key(user_id, history), self.rank(user_id, TOP_DEPTH, None, history, True)
        )
        return _cut(found, k, explain)

    def cached(
        self,
        user_id: str | None,
        k: int,
        profile: dict[str, str] | None = None,
        history: Sequence[str] | None = None,
        explain: bool = True,
    ) -> list[dict[str, Any]] | None:
        """The remembered list for this request, or None when it must be computed (no work done here)."""
        if profile is not None:
            return None
        found = self.cached_top(user_id, history, k)
        return None if found is None else _cut(found, k, explain)

    def cached_top(
        self, user_id: str | None, history: Sequence[str] | None = None, k: int = TOP_DEPTH
    ) -> TopList | None:
        """The remembered list for (user, history) when it holds the top ``k``, else None (no work done).

        Its first ``k`` entries are the answer for ``k``: a remembered list is the top :data:`TOP_DEPTH`.
        """
        if k > TOP_DEPTH:
            return None
        key = self._key(user_id, history)
        found = self._warm.get(key)
        return self._memo.get(key) if found is None else found

    def warm(self, limit: int | None = None) -> int:
        """Compute the lists of the first ``limit`` known users (all when None); returns how many.

        Called before the engine takes traffic (the model holder does, before a swap), so a known user's
        first request is already a lookup.
        """
        users = list(self._user_index)[: len(self._user_index) if limit is None else max(0, limit)]
        for user in users:
            key = (user, ())
            if key not in self._warm:
                self._warm[key] = self._top(self.rank(user, TOP_DEPTH, None, None, True))
        return len(users)

    def rank(
        self,
        user_id: str | None,
        k: int,
        profile: dict[str, str] | None = None,
        history: Sequence[str] | None = None,
        explain: bool = True,
    ) -> list[dict[str, Any]]:
        """Top ``k`` unseen items, always computed (what :meth:`recommend` remembers)."""
        extra = self._history_indices(list(history or []))
        user = self._user_index.get(str(user_id)) if user_id is not None else None
        if user is None and profile is None and not history:
            raise KeyError(f"unknown user {user_id!r}")
        n_items = len(self._item_ids)
        prof = None
        attributes = None
        if user is not None:
            hist = self.history[user].tolil()
            seen = self.seen[user].toarray().ravel() > 0
        else:
            hist = sp.lil_matrix((1, n_items), dtype=np.float32)
            seen = np.zeros(n_items, dtype=bool)
            prof = self._profile_vector(profile or {})
            attributes = self.bank.profile_attributes(profile or {})
        for item in extra:
            hist[0, item] = 1.0
        seen[extra] = True
        history_row = sp.csr_matrix(hist, dtype=np.float32)
        users = None if user is None else np.asarray([user])
        scores, gates, feats = self.scorer.score_rows(history_row, users, prof, attributes)
        row = scores[0].astype(np.float64)
        row[seen] = -np.inf
        k = min(int(k), int((~seen).sum()))
        top = np.zeros(0, dtype=np.int64)
        if k > 0:
            # Every item scoring at least the k-th best, so equal scores at the cut are all candidates and
            # the tie-break (lower index first) decides, as in a full sort: the top k is then a prefix of
            # the top k + 1, which remembered lists rely on.
            kth = np.partition(-row, k - 1)[k - 1]
            candidates = np.flatnonzero(-row <= kth)
            top = candidates[np.lexsort((candidates, -row[candidates]))][:k]
        notes = self._explain(history_row, user, attributes, gates[0], feats[0], top) if explain else None
        return [
            {
                "item_id": self._item_ids[i],
                "rank": r,
                "score": float(row[i]),
                "explanation": notes[r - 1] if notes is not None else None,
            }
            for r, i in enumerate(top, start=1)
        ]

    # --- helpers ----------------------------------------------------------------------------------
    def _key(self, user_id: str | None, history: Sequence[str] | None) -> tuple[str | None, tuple[str, ...]]:
        """What a remembered list depends on: the user if known, and the history items not already in
        their training history (those change nothing), so a known user whose feedback a retrain already
        absorbed hits the precomputed list. An unknown user's list depends on the history alone."""
        user = self._user_index.get(str(user_id)) if user_id is not None else None
        items = tuple(str(h) for h in history or ())
        if user is None:
            return None, items
        if items:
            trained = self.history.indices[self.history.indptr[user] : self.history.indptr[user + 1]]
            known = {self._item_ids[i] for i in trained}
            items = tuple(h for h in items if h not in known)
        return str(user_id), items

    @staticmethod
    def _top(items: list[dict[str, Any]]) -> TopList:
        return TopList([(i["item_id"], i["score"], i["explanation"]) for i in items])

    def _remember(self, key: tuple[str | None, tuple[str, ...]], items: list[dict[str, Any]]) -> TopList:
        top = self._top(items)
        with self._memo_lock:
            if len(self._memo) >= MEMO_LIMIT:
                # Dicts keep insertion order: drop the oldest tenth in one go rather than one per insert.
                for old in list(self._memo)[: MEMO_LIMIT // 10]:
                    del self._memo[old]
            self._memo[key] = top
        return top

    def _history_indices(self, history: list[str]) -> np.ndarray:
        unknown = [h for h in history if str(h) not in self._item_index]
        if unknown:
            raise ValueError(f"unknown item ids in history: {', '.join(map(str, unknown[:10]))}")
        return np.asarray([self._item_index[str(h)] for h in history], dtype=np.int64)

    def _explain(
        self,
        history: sp.csr_matrix,
        user: int | None,
        attributes: dict[str, sp.csr_matrix] | None,
        gates: np.ndarray,
        feats: np.ndarray,
        items: np.ndarray,
    ) -> list[str | None]:
        """For each item, an instance of the metapath channel that contributes most to its score."""
        contrib = gates[:, None] * feats[:, items]  # (C, len(items))
        for c, path in enumerate(self.paths):
            if path is None:
                contrib[c] = 0.0
        best = np.argmax(contrib, axis=0)
        out: list[str | None] = [None] * len(items)
        for c in np.unique(best):
            cols = np.flatnonzero((best == c) & (contrib[c, np.arange(len(items))] > 0))
            path = self.paths[int(c)]
            if path is None or len(cols) == 0:
                continue
            source = self._source_row(int(c), history, user, attributes)
            if source is None:
                continue
            texts = self.explainer.instances(path, source, items[cols], -1 if user is None else user)
            for col, text in zip(cols, texts, strict=True):
                out[col] = text
        return out

    def _source_row(
        self, c: int, history: sp.csr_matrix, user: int | None, attributes: dict[str, sp.csr_matrix] | None
    ) -> np.ndarray | None:
        channel = self.bank.channels[c]
        if channel.source == HISTORY:
            return np.asarray(history.toarray()).ravel().astype(np.float64)
        if attributes is not None and channel.source in attributes:
            return np.asarray(attributes[channel.source].toarray()).ravel().astype(np.float64)
        if user is not None and channel.source in self.bank.user_attributes:
            return np.asarray(self.bank.user_attributes[channel.source][user].toarray()).ravel().astype(float)
        return None

    def _profile_vector(self, profile: dict[str, str]) -> np.ndarray:
        """Embed a cold user's profile text with the bundle's int8 encoder (remembered per profile)."""
        if not profile:
            return np.zeros(self.profile.shape[1], dtype=np.float32)
        key = tuple(sorted((str(k), str(v)) for k, v in profile.items()))
        found = self._profiles.get(key)
        if found is None:
            found = self._encode_profile(profile)
            with self._memo_lock:
                if len(self._profiles) >= PROFILE_LIMIT:
                    self._profiles.clear()  # rare; simpler than an LRU and bounded all the same
                self._profiles[key] = found
        return found

    def _encode_profile(self, profile: dict[str, str]) -> np.ndarray:
        from components.text.verbalise import DEFAULT_USER_TEMPLATE, user_text

        columns = ("age", "gender", "occupation", "zip_code")
        row = {"user": 0, "user_id": "new", **{c: str(profile.get(c, "")) for c in columns}}
        template = self.text_cfg.get("user_template", DEFAULT_USER_TEMPLATE)
        # The text of a user with no training history, as the encode stage renders (user_texts): no item
        # titles are needed, and building the title map took most of a profile's cost.
        text = user_text(row, [], {}, int(self.text_cfg.get("n_recent", 10)), template)
        return self.encode([text])[0]

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed texts with the bundle's int8 ONNX encoder (loaded on first use)."""
        with self._lock:
            if self._encoder is None:
                self._encoder = OnnxEncoder.from_bundle(
                    self.directory, threads=self._threads, provider=self._provider
                )
        return self._encoder.encode(texts)


def _cut(top: TopList, k: int, explain: bool) -> list[dict[str, Any]]:
    return [
        {"item_id": item, "rank": r, "score": score, "explanation": note if explain else None}
        for r, (item, score, note) in enumerate(top.entries[: max(0, int(k))], start=1)
    ]


def load_bundle(
    directory: str | Path, version: str = "", threads: int = 1, provider: str = "cpu"
) -> BundleEngine:
    """Verify a bundle against its manifest and load it for serving (``provider``: ``cpu`` or ``cuda``)."""
    from components.bundle.format import verify_bundle

    verify_bundle(Path(directory))
    return BundleEngine(Path(directory), version, threads, provider)
