"""Stationary vs shifted feedback windows on real ml-100k, through the monitor's own window logic.

The training split of a trained workspace is cut in two at random: one half is the reference (what a
champion was trained on), the other half feeds windows. Each window's events are written to a real
SQLite feedback store with their own time span and read back by ``components.drift.reference.read_events``
with that span, exactly as the monitor flow reads a window; ``check_window`` runs every drift check
with the workspace's ``drift:`` thresholds. Item genres and text embeddings come from the workspace's
exported bundle.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/drift_windows.py --workspace workspace   # after make demo

Stationary: ``--windows`` disjoint windows sampled from the same period (the other half). Shifts:
(a) a flood of new items: 300 items removed from the reference, 40% of a window's events on them;
(b) a genre swap: Drama loses 90% of its traffic and Horror gets ten times its share.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.core.config import load_config  # noqa: E402
from components.drift import reference as monitoring  # noqa: E402
from components.serving.feedback import FeedbackEvent, SQLiteFeedbackStore  # noqa: E402


def events_of(frame: pd.DataFrame, t0: float, prefix: str, rng: np.random.Generator) -> list[FeedbackEvent]:
    ts = t0 + np.sort(rng.uniform(0, 999, len(frame)))
    return [
        FeedbackEvent(f"{prefix}-{k}", "rating", str(u), str(i), float(t), value=4.0)
        for k, (u, i, t) in enumerate(zip(frame["user"], frame["item"], ts, strict=True))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workspace", type=Path, required=True, help="a trained ml-100k workspace")
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--size", type=int, default=1500, help="events per window")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    ws = args.workspace
    cfg = load_config(ws / "params.yaml")
    rng = np.random.default_rng(args.seed)
    users = pd.read_parquet(ws / "data/processed/users.parquet").set_index("user")["user_id"].astype(str)
    items_table = pd.read_parquet(ws / "data/processed/items.parquet")
    items = items_table.set_index("item")["item_id"].astype(str)
    train = pd.read_parquet(ws / "data/split/train.parquet")
    train = pd.DataFrame(
        {"user": users.loc[train["user"]].to_numpy(), "item": items.loc[train["item"]].to_numpy()}
    )
    order = rng.permutation(len(train))
    ref_part, pool = train.iloc[order[: len(train) // 2]], train.iloc[order[len(train) // 2 :]]
    bundle = monitoring.reference_from_bundle(ws / "models" / "bundle", cfg, None)
    genres = (
        bundle.reference.genre_weights[["item", "genre"]]
        if bundle.reference.genre_weights is not None
        else None
    )

    def reference(frame: pd.DataFrame) -> monitoring.ReferenceData:
        return monitoring.reference_from_tables(frame, genres, bundle.item_vectors, {}, None)

    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteFeedbackStore(Path(tmp) / "feedback.db")
        ref = reference(ref_part)
        need = args.windows * args.size
        if need > len(pool):
            raise SystemExit(f"{args.windows} x {args.size} events exceed the {len(pool)} held-out events")
        sample = pool.iloc[rng.permutation(len(pool))[:need]]
        for w in range(args.windows):
            store.write(events_of(sample.iloc[w * args.size : (w + 1) * args.size], w * 1000.0, f"s{w}", rng))
        for w in range(args.windows):
            events, _ = monitoring.read_events(store, 0, w * 1000.0, w * 1000.0 + 999.0)
            r = monitoring.check_window(ref, events, cfg)
            results.append(
                {"kind": "stationary", "window": w, "fired": r.fired, "stats": monitoring.statistics(r)}
            )

        # (a) new-item flood: 300 items the reference never saw carry 40% of the window.
        flood_items = set(rng.choice(pool["item"].unique(), 300, replace=False))
        ref_a = reference(ref_part[~ref_part["item"].isin(flood_items)])
        on = pool[pool["item"].isin(flood_items)]
        off = pool[~pool["item"].isin(flood_items)]
        n_on = int(0.4 * args.size)
        window_a = pd.concat(
            [
                on.sample(n_on, replace=len(on) < n_on, random_state=1),
                off.sample(args.size - n_on, random_state=2),
            ]
        )
        t_a = (args.windows + 1) * 1000.0
        store.write(events_of(window_a, t_a, "flood", rng))
        events, _ = monitoring.read_events(store, 0, t_a, t_a + 999.0)
        r = monitoring.check_window(ref_a, events, cfg)
        results.append(
            {"kind": "new-item flood (40%)", "window": 0, "fired": r.fired, "stats": monitoring.statistics(r)}
        )

        # (b) genre swap: Drama x0.1, Horror x10 (weights per event over the held-out half).
        item_genres = (
            genres.groupby("item")["genre"].agg(set) if genres is not None else pd.Series(dtype=object)
        )
        g = pool["item"].map(item_genres)
        weight = np.ones(len(pool))
        weight[g.map(lambda s: isinstance(s, set) and "Drama" in s).to_numpy()] *= 0.1
        weight[g.map(lambda s: isinstance(s, set) and "Horror" in s).to_numpy()] *= 10.0
        window_b = pool.sample(args.size, weights=weight, random_state=3)
        t_b = (args.windows + 2) * 1000.0
        store.write(events_of(window_b, t_b, "swap", rng))
        events, _ = monitoring.read_events(store, 0, t_b, t_b + 999.0)
        r = monitoring.check_window(ref, events, cfg)
        results.append(
            {
                "kind": "genre swap (Drama x0.1, Horror x10)",
                "window": 0,
                "fired": r.fired,
                "stats": monitoring.statistics(r),
            }
        )
        store.close()

    stationary = [r for r in results if r["kind"] == "stationary"]
    fired = sum(bool(r["fired"]) for r in stationary)

    def peak(check: str) -> float:
        return max(float(r["stats"][check]["value"] or 0.0) for r in stationary)  # type: ignore[index]

    print(
        f"reference {len(ref_part)} events, held-out pool {len(pool)}, "
        f"{args.windows} x {args.size}-event windows"
    )
    print(f"stationary: {fired}/{len(stationary)} fired ({fired / len(stationary):.1%})")
    for check in (
        "item_popularity",
        "user_activity",
        "unseen_items",
        "unseen_users",
        "genre_mix",
        "new_item_text",
    ):
        print(f"  max {check}: {peak(check):.4f}")
    for r in results[len(stationary) :]:
        stats = r["stats"]
        detail = ", ".join(f"{c} {stats[c]['value']:.3f}" for c in r["fired"])  # type: ignore[index]
        print(f"{r['kind']}: fired {r['fired']} ({detail})")
    print(f"{time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
