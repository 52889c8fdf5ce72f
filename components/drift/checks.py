"""Drift checks of one feedback window against the champion's reference (its training data).

:func:`check` runs every check and returns a :class:`DriftResult`; each check has one headline
statistic, a threshold, a status and the numbers its plot needs. Input checks compare what users do
(item popularity, user activity, unseen items and users, genre mix, new items' text) with the
training data; quality checks compare the served lists' online hit rate and NDCG with the
champion's offline baseline (there is no CTR check: nothing offline says what CTR to expect).
Thresholds and why they are what they are: ``docs/drift.md``.

Feedback events are one row per event, as ``components.serving.feedback`` stores them: columns
``event_id``, ``type`` (``impression``, ``click`` or ``rating``), ``user_id``, ``item_id``,
``value`` (the rating; ignored for other types), ``model_version`` and ``ts``, and optionally
``request_id`` (the recommendation response an event refers to) and ``position`` (an impression's
1-based rank; without that column an impression's ``value`` is read as its rank). Impressions of one
list share a ``request_id``; impressions without one are grouped by (``user_id``,
``model_version``, ``ts``). User and item ids must be in the id space of the reference interactions
(``user``, ``item`` columns): map the store's string ids before calling :func:`check`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats as sps

from components.core.config import FEEDBACK_EVENT_TYPES, DriftConfig
from components.drift import stats

EVENT_COLUMNS: tuple[str, ...] = ("event_id", "type", "user_id", "item_id", "value", "model_version", "ts")
EVENT_TYPES: tuple[str, ...] = FEEDBACK_EVENT_TYPES
NO_GENRE = "(none)"

Status = Literal["ok", "drift", "insufficient_data", "not_applicable"]


def genres_long(items: pd.DataFrame, column: str = "class", item_column: str = "item") -> pd.DataFrame:
    """Explode a whitespace-separated genre column (RecBole ``token_seq``) into ``[item, genre]`` rows.

    Args:
        items: Items table.
        column: Column holding e.g. ``"Animation Children's Comedy"``.
        item_column: The item id column.

    Returns:
        One row per (item, genre); items with an empty value get no row.
    """
    tokens = items[column].fillna("").astype(str).str.split()
    out = pd.DataFrame({"item": items[item_column].to_numpy(), "genre": tokens.to_numpy()}).explode("genre")
    return out.dropna(subset=["genre"]).reset_index(drop=True)


def _genre_weights(item_genres: pd.DataFrame | None) -> pd.DataFrame | None:
    """``[item, genre, weight]`` with each item's genres sharing one unit of weight."""
    if item_genres is None or item_genres.empty:
        return None
    missing = {"item", "genre"} - set(item_genres.columns)
    if missing:
        raise ValueError(f"item_genres needs columns item and genre; missing {sorted(missing)}")
    frame = item_genres[["item", "genre"]].drop_duplicates()
    weight = 1.0 / frame.groupby("item")["genre"].transform("size")
    return frame.assign(weight=weight.to_numpy())


def genre_mass(items: pd.Series, weights: pd.DataFrame) -> pd.Series:
    """Events per genre, each event's unit split over its item's genres (``(none)`` for no genre).

    Splitting keeps the total equal to the number of events, so the chi-square test sees a sample of
    the right size; counting every genre of a three-genre film would triple-count its events.
    """
    per_item = items.value_counts()
    joined = per_item.rename("n").rename_axis("item").reset_index().merge(weights, on="item", how="left")
    joined["genre"] = joined["genre"].fillna(NO_GENRE)
    joined["weight"] = joined["weight"].fillna(1.0)
    mass: pd.Series = (joined["n"] * joined["weight"]).groupby(joined["genre"]).sum()
    return mass


@dataclass
class Reference:
    """What the champion was trained on, summarised for the checks.

    Build it with :meth:`build`; it keeps counts and a sample of embeddings, not the raw data.
    """

    item_counts: pd.Series
    user_counts: pd.Series
    genre_counts: pd.Series | None
    genre_weights: pd.DataFrame | None
    item_embeddings: np.ndarray | None
    baseline: dict[str, float]
    model_version: str | None
    n_events: int

    @classmethod
    def build(
        cls,
        interactions: pd.DataFrame,
        item_genres: pd.DataFrame | None = None,
        item_embeddings: np.ndarray | None = None,
        baseline: dict[str, float] | None = None,
        model_version: str | None = None,
    ) -> Reference:
        """Summarise the champion's training data.

        Args:
            interactions: Training interactions with columns ``user``, ``item`` (and usually
                ``timestamp``, unused: the reference is one period).
            item_genres: ``[item, genre]`` rows for the whole catalogue, new items included
                (:func:`genres_long` builds them from an items table); None skips the genre check.
            item_embeddings: Text embeddings of training items, shape (n, d); None skips the
                new-item text check.
            baseline: The champion's offline metrics, e.g. ``{"hit@10": 0.6, "ndcg@10": 0.3}``,
                missing keys skip that check.
            model_version: The champion's version; quality checks use only its impressions.

        Returns:
            The reference.
        """
        missing = {"user", "item"} - set(interactions.columns)
        if missing:
            raise ValueError(f"reference interactions need columns user and item; missing {sorted(missing)}")
        if interactions.empty:
            raise ValueError("reference interactions are empty")
        bad = {k: v for k, v in (baseline or {}).items() if not 0.0 <= float(v) <= 1.0}
        if bad:
            raise ValueError(f"baseline metrics are rates in [0, 1]; got {bad}")
        weights = _genre_weights(item_genres)
        emb = None if item_embeddings is None else np.asarray(item_embeddings, dtype=np.float64)
        if emb is not None and emb.ndim != 2:
            raise ValueError(f"item_embeddings must be 2-D, got shape {emb.shape}")
        return cls(
            item_counts=interactions["item"].value_counts(),
            user_counts=interactions["user"].value_counts(),
            genre_counts=None if weights is None else genre_mass(interactions["item"], weights),
            genre_weights=weights,
            item_embeddings=emb,
            baseline=dict(baseline or {}),
            model_version=model_version,
            n_events=len(interactions),
        )


@dataclass
class Window:
    """One window of feedback events, plus the text embeddings of items new in it (if any)."""

    events: pd.DataFrame
    new_item_embeddings: np.ndarray | None = None

    def __post_init__(self) -> None:
        missing = set(EVENT_COLUMNS) - set(self.events.columns)
        if missing:
            raise ValueError(f"feedback events miss columns {sorted(missing)}")
        unknown = set(self.events["type"].unique()) - set(EVENT_TYPES)
        if unknown:
            raise ValueError(f"unknown event types {sorted(map(str, unknown))}; expected {EVENT_TYPES}")


@dataclass
class CheckResult:
    """One check: its headline statistic against its threshold, every number, and plot data."""

    name: str
    group: Literal["input", "quality"]
    statistic_name: str
    statistic: float
    threshold: float
    status: Status
    message: str
    values: dict[str, float] = field(default_factory=dict)
    plot: dict[str, Any] = field(default_factory=dict)

    @property
    def fired(self) -> bool:
        """Whether this check reports drift."""
        return self.status == "drift"


@dataclass
class DriftResult:
    """Every check of one window; ``drifted`` when any of them fired."""

    checks: list[CheckResult]
    n_events: int
    n_input_events: int
    window_start: float | None
    window_end: float | None

    @property
    def drifted(self) -> bool:
        """Any input-distribution check fired, or online quality dropped past the tolerance."""
        return any(c.fired for c in self.checks)

    @property
    def fired(self) -> list[str]:
        """Names of the checks that fired."""
        return [c.name for c in self.checks if c.fired]

    def get(self, name: str) -> CheckResult:
        """The check called ``name``."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (without plot data)."""
        return {
            "drifted": self.drifted,
            "fired": self.fired,
            "n_events": self.n_events,
            "n_input_events": self.n_input_events,
            "window_start": self.window_start,
            "window_end": self.window_end,
            "checks": [{k: v for k, v in asdict(c).items() if k != "plot"} for c in self.checks],
        }


def _insufficient(
    name: str, group: Literal["input", "quality"], stat: str, thr: float, why: str
) -> CheckResult:
    return CheckResult(name, group, stat, float("nan"), thr, "insufficient_data", why)


def _not_applicable(
    name: str, group: Literal["input", "quality"], stat: str, thr: float, why: str
) -> CheckResult:
    return CheckResult(name, group, stat, float("nan"), thr, "not_applicable", why)


def _distribution_check(
    name: str, ref_counts: pd.Series, cur_ids: pd.Series, what: str, cfg: DriftConfig
) -> CheckResult:
    """PSI and JS of events over reference-popularity buckets of known ids."""
    if len(cur_ids) < cfg.min_events:
        return _insufficient(
            name, "input", "psi", cfg.psi_max, f"{len(cur_ids)} input events < min_events {cfg.min_events}"
        )
    buckets = stats.bucket_map(ref_counts, cfg.n_buckets)
    ref, cur, labels, unseen = stats.bucket_counts(ref_counts, cur_ids, buckets, cfg.n_buckets)
    plot = {
        "labels": labels + ["unseen"],
        "reference": (np.append(ref, 0.0) / ref.sum()).tolist(),
        "current": (np.append(cur, unseen) / len(cur_ids)).tolist(),
        "xlabel": f"reference {what} bucket (tail -> head), then {what}s unseen in the reference",
    }
    if cur.sum() < cfg.min_events:
        out = _insufficient(
            name, "input", "psi", cfg.psi_max, f"{int(cur.sum())} events on known {what}s < {cfg.min_events}"
        )
        out.plot = plot
        return out
    psi = stats.psi(ref, cur, cfg.psi_eps)
    js = stats.js_divergence(ref, cur)
    fired = psi > cfg.psi_max or js > cfg.js_max
    message = (
        f"PSI {psi:.3f} (max {cfg.psi_max}), JS {js:.3f} bits (max {cfg.js_max}) over {len(labels)} buckets"
    )
    return CheckResult(
        name,
        "input",
        "psi",
        psi,
        cfg.psi_max,
        "drift" if fired else "ok",
        message,
        values={"psi": psi, "js": js, "js_threshold": cfg.js_max, "n_events": float(cur.sum())},
        plot=plot,
    )


def _unseen_check(
    name: str, ids: pd.Series, known: pd.Index, what: str, thr: float, cfg: DriftConfig
) -> CheckResult:
    if len(ids) < cfg.min_events:
        return _insufficient(
            name, "input", "share", thr, f"{len(ids)} input events < min_events {cfg.min_events}"
        )
    share = stats.unseen_share(ids.to_numpy(), known.to_numpy())
    n_new = int(ids[~ids.isin(known)].nunique())
    return CheckResult(
        name,
        "input",
        "share",
        share,
        thr,
        "drift" if share > thr else "ok",
        f"{share:.1%} of events on {n_new} {what}s unseen in the reference (max {thr:.0%})",
        values={"share": share, f"n_unseen_{what}s": float(n_new)},
        plot={"labels": ["reference", "current"], "values": [0.0, share], "threshold": thr},
    )


def _genre_check(ref: Reference, items: pd.Series, cfg: DriftConfig) -> CheckResult:
    name, thr = "genre_mix", cfg.genre_v_max
    if ref.genre_counts is None or ref.genre_weights is None:
        return _not_applicable(name, "input", "cramers_v", thr, "no item genres in the reference")
    if len(items) < cfg.min_events:
        return _insufficient(name, "input", "cramers_v", thr, f"{len(items)} input events < {cfg.min_events}")
    cur_mass = genre_mass(items, ref.genre_weights)
    genres = sorted(set(ref.genre_counts.index) | set(cur_mass.index))
    r = ref.genre_counts.reindex(genres, fill_value=0.0).to_numpy(dtype=np.float64)
    c = cur_mass.reindex(genres, fill_value=0.0).to_numpy(dtype=np.float64)
    chi2, p = stats.chi_square(r, c, cfg.genre_min_expected)
    # The effect size uses the same pooled categories as the test.
    rm, cm, _ = stats.merge_sparse_categories(r, c, cfg.genre_min_expected)
    v = stats.cramers_v(rm, cm)
    fired = p < cfg.genre_alpha and v > cfg.genre_v_max
    return CheckResult(
        name,
        "input",
        "cramers_v",
        v,
        thr,
        "drift" if fired else "ok",
        f"Cramér's V {v:.3f} (max {thr}), chi-square {chi2:.1f}, p {p:.2g} (alpha {cfg.genre_alpha})",
        values={"cramers_v": v, "chi2": chi2, "p_value": p},
        plot={"labels": genres, "reference": (r / r.sum()).tolist(), "current": (c / c.sum()).tolist()},
    )


def _pca2(x: np.ndarray, y: np.ndarray, limit: int, rng: np.random.Generator) -> dict[str, Any]:
    """2-D principal-component coordinates of (subsampled) reference and new items, for the plot."""
    xs = x[rng.choice(len(x), min(limit, len(x)), replace=False)]
    ys = y[rng.choice(len(y), min(limit, len(y)), replace=False)]
    z = np.vstack([xs, ys])
    z = z - z.mean(0)
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    proj = z @ vt[:2].T
    if proj.shape[1] < 2:
        proj = np.hstack([proj, np.zeros((len(proj), 2 - proj.shape[1]))])
    return {"reference": proj[: len(xs)].tolist(), "current": proj[len(xs) :].tolist()}


def _embedding_check(ref: Reference, window: Window, cfg: DriftConfig) -> CheckResult:
    name, thr = "new_item_text", cfg.mmd_min
    if ref.item_embeddings is None or window.new_item_embeddings is None:
        return _not_applicable(
            name, "input", "mmd2", thr, "no item embeddings for the reference or the window"
        )
    new = np.asarray(window.new_item_embeddings, dtype=np.float64)
    if new.ndim != 2 or new.shape[1] != ref.item_embeddings.shape[1]:
        raise ValueError(
            f"new_item_embeddings must be (n, {ref.item_embeddings.shape[1]}), got shape {new.shape}"
        )
    if len(new) < cfg.min_new_items:
        return _insufficient(
            name, "input", "mmd2", thr, f"{len(new)} new items < min_new_items {cfg.min_new_items}"
        )
    res = stats.mmd_rbf(
        ref.item_embeddings,
        new,
        n_perm=cfg.mmd_permutations,
        seed=cfg.seed,
        max_samples=cfg.mmd_max_samples,
    )
    fired = res.p_value < cfg.mmd_alpha and res.mmd2 > cfg.mmd_min
    return CheckResult(
        name,
        "input",
        "mmd2",
        res.mmd2,
        thr,
        "drift" if fired else "ok",
        f"MMD² {res.mmd2:.4f} (min {thr}), permutation p {res.p_value:.3g} (alpha {cfg.mmd_alpha}), "
        f"{len(new)} new items",
        values={"mmd2": res.mmd2, "p_value": res.p_value, "n_new_items": float(len(new))},
        plot=_pca2(ref.item_embeddings, new, 300, np.random.default_rng(cfg.seed)),
    )


def _list_keys(impressions: pd.DataFrame) -> pd.Series:
    """One key per served list: the ``request_id`` where there is one, else (user, version, ts)."""
    fallback = (
        impressions["user_id"].astype(str)
        + "|"
        + impressions["model_version"].astype(str)
        + "|"
        + impressions["ts"].astype(str)
    )
    if "request_id" not in impressions.columns:
        return "u:" + fallback
    request = impressions["request_id"]
    return ("r:" + request.astype(str)).where(request.notna(), "u:" + fallback)


def _ranks(impressions: pd.DataFrame) -> pd.Series:
    """Each impression's rank: ``position`` where the column has it, else ``value``."""
    value = pd.to_numeric(impressions["value"], errors="coerce")
    if "position" not in impressions.columns:
        return value
    return pd.to_numeric(impressions["position"], errors="coerce").fillna(value)


def served_lists(impressions: pd.DataFrame) -> pd.DataFrame:
    """One row per served list: ``user_id``, ``ts`` (when served) and ``items`` (best first)."""
    if impressions.empty:
        return pd.DataFrame({"user_id": [], "ts": [], "items": []})
    ordered = impressions.assign(
        _key=_list_keys(impressions), _rank=_ranks(impressions), _ts=_seconds(impressions["ts"])
    ).sort_values(["_key", "_rank"], kind="stable", na_position="last")
    grouped = ordered.groupby("_key", sort=False)
    return pd.DataFrame(
        {
            "user_id": grouped["user_id"].first().to_numpy(),
            "ts": grouped["_ts"].min().to_numpy(dtype=np.float64),
            "items": grouped["item_id"].agg(list).to_numpy(),
        }
    )


def list_positives(lists: pd.DataFrame, events: pd.DataFrame, cfg: DriftConfig) -> list[set[Any]]:
    """For each served list, the items its user clicked or rated at or after the list was served.

    Feedback before a list was served cannot be a response to it; ratings count only at or above
    ``cfg.rating_positive`` when that is set. Missing timestamps keep the event.
    """
    clicks = events[events["type"] == "click"]
    ratings = events[events["type"] == "rating"]
    if cfg.rating_positive is not None:
        ratings = ratings[ratings["value"].astype(float) >= cfg.rating_positive]
    pos = pd.concat([clicks, ratings], ignore_index=True)
    items = pos["item_id"].to_numpy()
    ts = _seconds(pos["ts"]).to_numpy(dtype=np.float64)
    by_user = pos.groupby("user_id", sort=False).indices
    out: list[set[Any]] = []
    none = np.array([], dtype=np.int64)
    for user, served_at in zip(lists["user_id"], lists["ts"], strict=True):
        rows = by_user.get(user, none)
        if not np.isnan(served_at):
            # NaN timestamps compare False and so are kept.
            rows = rows[~(ts[rows] < served_at)]
        out.append(set(items[rows].tolist()))
    return out


def _drop_check(
    name: str, observed: float, baseline: float, p: float, n: int, what: str, cfg: DriftConfig
) -> CheckResult:
    """Fire when the online value sits more than the tolerance below the baseline, significantly."""
    drop = 1.0 - observed / baseline if baseline > 0 else 0.0
    fired = drop > cfg.quality_tolerance and p < cfg.quality_alpha
    return CheckResult(
        name,
        "quality",
        "relative_drop",
        drop,
        cfg.quality_tolerance,
        "drift" if fired else "ok",
        f"online {what} {observed:.4f} vs baseline {baseline:.4f}: {drop:+.1%} drop "
        f"(max {cfg.quality_tolerance:.0%}), one-sided p {p:.2g} over {n} lists/impressions",
        values={"online": observed, "baseline": baseline, "relative_drop": drop, "p_value": p, "n": float(n)},
        plot={
            "labels": ["baseline", "online"],
            "values": [baseline, observed],
            "threshold": baseline * (1 - cfg.quality_tolerance),
        },
    )


def _quality_checks(ref: Reference, events: pd.DataFrame, cfg: DriftConfig) -> list[CheckResult]:
    k = cfg.quality_k
    impressions = events[events["type"] == "impression"]
    if ref.model_version is not None:
        impressions = impressions[impressions["model_version"].astype(str) == str(ref.model_version)]
    lists = served_lists(impressions)
    list_pos = list_positives(lists, events, cfg)
    hits, ndcgs = stats.per_list_quality(list(lists["items"]), list_pos, k)
    out: list[CheckResult] = []
    for metric, per_list in ((f"hit@{k}", hits), (f"ndcg@{k}", ndcgs)):
        name = f"online_{metric.replace('@', '_at_')}"
        baseline = ref.baseline.get(metric)
        if baseline is None:
            out.append(
                _not_applicable(
                    name, "quality", "relative_drop", cfg.quality_tolerance, f"no offline baseline {metric}"
                )
            )
        elif len(per_list) < cfg.min_lists:
            out.append(
                _insufficient(
                    name,
                    "quality",
                    "relative_drop",
                    cfg.quality_tolerance,
                    f"{len(per_list)} served lists with feedback < min_lists {cfg.min_lists}",
                )
            )
        else:
            mean = float(per_list.mean())
            if metric.startswith("hit"):
                p = float(
                    sps.binomtest(int(per_list.sum()), len(per_list), baseline, alternative="less").pvalue
                )
            elif np.std(per_list) == 0:
                p = 0.0 if mean < baseline else 1.0
            else:
                p = float(sps.ttest_1samp(per_list, baseline, alternative="less").pvalue)
            out.append(_drop_check(name, mean, float(baseline), p, len(per_list), metric, cfg))
    return out


def _seconds(ts: pd.Series) -> pd.Series:
    """Timestamps as float seconds (datetimes included), NaN where unparseable."""
    if pd.api.types.is_datetime64_any_dtype(ts):
        return (ts - pd.Timestamp(0, tz=getattr(ts.dt, "tz", None))).dt.total_seconds()
    return pd.to_numeric(ts, errors="coerce").astype(float)


def check(reference: Reference, window: Window, cfg: DriftConfig | None = None) -> DriftResult:
    """Run every drift check of ``window`` against ``reference``.

    Args:
        reference: The champion's training data, summarised.
        window: Feedback events since the reference period (and new items' embeddings).
        cfg: Thresholds; the defaults when None.

    Returns:
        Per-check results; ``drifted`` when any input check fired or online quality dropped past the
        tolerance. Checks without enough data report ``insufficient_data`` and never fire.
    """
    cfg = cfg or DriftConfig()
    events = window.events
    inputs = events[events["type"].isin(cfg.input_event_types)]
    users, items = inputs["user_id"], inputs["item_id"]
    checks = [
        _distribution_check("item_popularity", reference.item_counts, items, "item", cfg),
        _distribution_check("user_activity", reference.user_counts, users, "user", cfg),
        _unseen_check(
            "unseen_items", items, reference.item_counts.index, "item", cfg.unseen_item_share_max, cfg
        ),
        _unseen_check(
            "unseen_users", users, reference.user_counts.index, "user", cfg.unseen_user_share_max, cfg
        ),
        _genre_check(reference, items, cfg),
        _embedding_check(reference, window, cfg),
        *_quality_checks(reference, events, cfg),
    ]
    ts = _seconds(events["ts"])
    return DriftResult(
        checks=checks,
        n_events=len(events),
        n_input_events=len(inputs),
        window_start=float(ts.min()) if ts.notna().any() else None,
        window_end=float(ts.max()) if ts.notna().any() else None,
    )
