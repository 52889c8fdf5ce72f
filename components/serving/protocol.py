"""What the server needs from a model: the ``Engine`` and ``EngineSource`` protocols.

The HTTP layer only talks to these protocols, so the registry-backed ONNX engine and the table engine the
tests use are interchangeable.
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from typing import Protocol, TypedDict, runtime_checkable


class Recommendation(TypedDict):
    """One recommended item as an engine returns it."""

    item_id: str
    # 1-based position in the returned list.
    rank: int
    score: float
    # The top metapath explanation, or None when explanations were not asked for or none exists.
    explanation: str | None


@runtime_checkable
class Engine(Protocol):
    """A loaded, immutable model version that ranks items for a user.

    Engines are shared by concurrent requests without locking, so ``recommend`` must be thread-safe
    (ONNX Runtime sessions are) and the engine must not change after loading.

    An engine may also carry ``created_at``: when its version was registered, in seconds since the
    epoch. It is optional and so not a member here; ``/metrics`` exports it as
    ``metarec_model_created_timestamp_seconds`` for the model-age alert (docs/alerts.md).
    """

    # Read-only properties rather than attributes: a plain attribute or a property satisfies them, and
    # item_ids may then be any set type (frozenset, a dict's keys), which a mutable attribute would forbid.
    @property
    def version(self) -> str:
        """Registry version this engine was loaded from; echoed in responses and recorded with impressions."""
        ...

    @property
    def item_ids(self) -> Set[str]:
        """Every item id (dataset's original ids) the model can rank; feedback for other items is refused."""
        ...

    def known_user(self, user_id: str) -> bool:
        """Whether the user was in the model's training data."""
        ...

    def recommend(
        self,
        user_id: str | None,
        k: int,
        profile: dict[str, str] | None = None,
        history: Sequence[str] | None = None,
        explain: bool = True,
    ) -> list[Recommendation]:
        """Rank the top ``k`` items, excluding those the user (or the given history) interacted with.

        Args:
            user_id: Dataset's original user id, or None for an anonymous cold user.
            k: Number of items wanted; fewer come back when fewer are left after exclusions.
            profile: Side information for a cold user (e.g. gender, age, occupation, zip_code).
            history: Item ids the user interacted with, for cold users or to add to a known user's.
            explain: Whether to compute each item's top metapath explanation.

        Returns:
            Items by descending score, ranks 1..n.

        Raises:
            KeyError: The user is unknown and neither a profile nor a history was given.
            ValueError: The history holds item ids the model does not know.
        """
        ...


class EngineSource(Protocol):
    """Where engines come from: normally the model registry's alias (``models:/<name>@champion``)."""

    def current_version(self) -> str | None:
        """The version the alias points at now, or None when it points nowhere."""
        ...

    def load(self, version: str) -> Engine:
        """Load one version; may take seconds and is always called off the request path."""
        ...
