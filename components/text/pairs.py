"""(user history text, next item) pairs: the supervision that ties text fine-tuning to recommendation.

A pair's query is the user's verbalisation from the items seen *so far*; its target is the item that
came next. Training pairs come from walking each user's training interactions in time order, so no
held-out interaction leaks into fine-tuning; validation pairs query with the whole training history
and target the first held-out item.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import numpy as np
import pandas as pd

from components.text.verbalise import DEFAULT_USER_TEMPLATE, histories, item_titles, user_text

T = TypeVar("T")


@dataclass(frozen=True)
class PairSet:
    """Queries paired with target items, plus the candidate item texts they are ranked among.

    Attributes:
        queries: One user-history text per pair.
        targets: Per pair, the index (into ``candidates``) of the item that came next.
        candidates: Text of every item, by item index.
        users: Per pair, the user index.
        seen: Per pair, items already in the history; excluded when ranking (they are not "next").
    """

    queries: Sequence[str]
    targets: np.ndarray
    candidates: list[str]
    users: np.ndarray
    seen: Sequence[np.ndarray]

    def __post_init__(self) -> None:
        n = len(self.queries)
        if not (len(self.targets) == len(self.users) == len(self.seen) == n):
            raise ValueError(
                f"pair set parts disagree: {n} queries, {len(self.targets)} targets, "
                f"{len(self.users)} users, {len(self.seen)} seen lists"
            )
        if n and (int(self.targets.min()) < 0 or int(self.targets.max()) >= len(self.candidates)):
            raise ValueError(f"a target lies outside the {len(self.candidates)} candidates")

    def __len__(self) -> int:
        return len(self.queries)

    def positives(self, index: np.ndarray) -> list[str]:
        """Target item texts of the given pairs."""
        return [self.candidates[int(self.targets[k])] for k in index]

    def fingerprint(self) -> str:
        """sha256 over queries, targets and candidates: a checkpoint resumes only on the same pairs.

        Queries made on demand (:class:`HistoryQueries`) enter through what makes them, not their text.
        """
        digest = hashlib.sha256()
        if isinstance(self.queries, HistoryQueries):
            digest.update(b"history-queries\0" + self.queries.digest().encode("ascii"))
        else:
            for text in self.queries:
                digest.update(text.encode("utf-8") + b"\0")
        digest.update(np.ascontiguousarray(self.targets, dtype=np.int64).tobytes())
        for text in self.candidates:
            digest.update(text.encode("utf-8") + b"\0")
        return digest.hexdigest()

    def subset(self, index: np.ndarray) -> PairSet:
        """The pairs at ``index`` (same candidates)."""
        return PairSet(
            [self.queries[int(k)] for k in index],
            self.targets[index],
            self.candidates,
            self.users[index],
            [self.seen[int(k)] for k in index],
        )


class _BySpan(Sequence[T]):
    """One value per pair, made when read from the pair's ``(user, t)`` span (the user's first ``t``
    training items are its history): what :class:`HistoryQueries` and :class:`HistorySeen` share."""

    def __init__(self, spans: np.ndarray, sequences: Mapping[int, list[int]]) -> None:
        self.spans = spans
        self.sequences = sequences

    def _at(self, user: int, history: list[int]) -> T:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.spans)

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...
    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            return [self[k] for k in range(*index.indices(len(self)))]
        user, t = (int(v) for v in self.spans[index])
        return self._at(user, self.sequences[user][:t])


class HistoryQueries(_BySpan[str]):
    """The queries of next-item pairs, each verbalised when read.

    Fine-tuning reads a few hundred of the pairs (``steps x batch_size``); at 100k users there are over
    a million, and writing every query took 36 s of the large graph's retune.
    """

    def __init__(
        self,
        spans: np.ndarray,
        sequences: Mapping[int, list[int]],
        rows: Mapping[int, Mapping[str, Any]],
        titles: Mapping[int, str],
        n_recent: int,
        template: str,
    ) -> None:
        super().__init__(spans, sequences)
        self.rows = rows
        self.titles = titles
        self.n_recent = n_recent
        self.template = template

    def _at(self, user: int, history: list[int]) -> str:
        return user_text(self.rows[user], history, self.titles, self.n_recent, self.template)

    def digest(self) -> str:
        """sha256 of everything the queries are made from (equal digests: equal queries)."""
        digest = hashlib.sha256()
        digest.update(f"{self.n_recent}\0{self.template}\0".encode())
        digest.update(np.ascontiguousarray(self.spans, dtype=np.int64).tobytes())
        for user in dict.fromkeys(int(u) for u in self.spans[:, 0]):
            digest.update(np.asarray(self.sequences[user], dtype=np.int64).tobytes() + b"\0")
            digest.update(repr(sorted(self.rows[user].items())).encode("utf-8") + b"\0")
        for index in sorted(self.titles):
            digest.update(f"{index}\0{self.titles[index]}\0".encode())
        return digest.hexdigest()


class HistorySeen(_BySpan[np.ndarray]):
    """Per pair, the items already in its history (made when read, like :class:`HistoryQueries`)."""

    def _at(self, user: int, history: list[int]) -> np.ndarray:
        return np.asarray(history, dtype=np.int64)


def _check_candidates(items: pd.DataFrame, item_texts: list[str]) -> None:
    if len(item_texts) != len(items):
        raise ValueError(f"{len(item_texts)} item texts for {len(items)} items")
    if not np.array_equal(items["item"].to_numpy(), np.arange(len(items))):
        raise ValueError("items must be the processed table, ordered by item index 0..n-1")


def next_item_pairs(
    train: pd.DataFrame,
    users: pd.DataFrame,
    items: pd.DataFrame,
    item_texts: list[str],
    n_recent: int = 10,
    template: str = DEFAULT_USER_TEMPLATE,
    *,
    min_history: int = 1,
    max_per_user: int | None = None,
) -> PairSet:
    """Training pairs: each user's history up to position t, paired with the item at t.

    Args:
        train: Training interactions (``user``, ``item``, ``timestamp``).
        users: Processed users table.
        items: Processed items table, ordered by item index.
        item_texts: Text of every item (from :func:`~components.text.verbalise.item_texts`).
        n_recent: Most recent items named in a query.
        template: User template (see :func:`~components.text.verbalise.user_texts`).
        min_history: Items a history needs before it becomes a query.
        max_per_user: Keep only each user's latest this many pairs, so heavy users do not dominate.

    Returns:
        Pairs ordered by user, then time; their queries and seen lists are made when read
        (:class:`HistoryQueries`), the first one at once so a template error surfaces here.
    """
    if min_history < 1:
        raise ValueError(f"min_history must be >= 1, got {min_history}")
    if max_per_user is not None and max_per_user < 1:
        raise ValueError(f"max_per_user must be >= 1 or None, got {max_per_user}")
    _check_candidates(items, item_texts)
    titles = item_titles(items)
    rows = {int(r["user"]): r for r in users.to_dict("records")}
    sequences = histories(train)
    spans: list[tuple[int, int]] = []
    targets: list[int] = []
    for user, sequence in sequences.items():
        positions = range(min_history, len(sequence))
        if max_per_user is not None:
            positions = positions[-max_per_user:]
        spans.extend((user, t) for t in positions)
        targets.extend(sequence[t] for t in positions)
    span_array = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    queries = HistoryQueries(span_array, sequences, rows, titles, n_recent, template)
    if len(queries):
        queries[0]  # noqa: B018 - verbalise one now: a bad template fails here, not mid-fine-tune
    return PairSet(
        queries,
        np.asarray(targets, dtype=np.int64),
        list(item_texts),
        span_array[:, 0].copy(),
        HistorySeen(span_array, sequences),
    )


def holdout_pairs(
    train: pd.DataFrame,
    heldout: pd.DataFrame,
    users: pd.DataFrame,
    items: pd.DataFrame,
    item_texts: list[str],
    n_recent: int = 10,
    template: str = DEFAULT_USER_TEMPLATE,
) -> PairSet:
    """Validation pairs: the whole training history as query, the first held-out item as target.

    Users without a held-out interaction are skipped; users without training items query with
    demographics alone (a cold-start user).
    """
    _check_candidates(items, item_texts)
    titles = item_titles(items)
    rows = {int(r["user"]): r for r in users.to_dict("records")}
    history = histories(train)
    queries: list[str] = []
    targets: list[int] = []
    owners: list[int] = []
    seen: list[np.ndarray] = []
    for user, sequence in histories(heldout).items():
        past = history.get(user, [])
        queries.append(user_text(rows[user], past, titles, n_recent, template))
        targets.append(sequence[0])
        owners.append(user)
        seen.append(np.asarray(past, dtype=np.int64))
    return PairSet(
        queries,
        np.asarray(targets, dtype=np.int64),
        list(item_texts),
        np.asarray(owners, dtype=np.int64),
        seen,
    )
