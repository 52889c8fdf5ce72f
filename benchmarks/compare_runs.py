"""Do two trained workspaces behave the same? Metrics, ONNX parity, served lists, offline recommendations.

Used to show that a refactoring changed no behaviour (docs/benchmarks.md, "Architecture step"): train
the default pipeline with the old and the new code (same params, same seed), then

    python benchmarks/compare_runs.py OLD_WORKSPACE NEW_WORKSPACE

Served lists come from each workspace's own bundle through the serving engine; the offline CSVs are
``metarec recommend --all-users --k 10 --explain --out <ws>/recommendations.csv`` when present.
Exits 1 when a metric or parity figure differs by more than 1e-4 or a served list differs.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from components.bundle.engine import load_bundle

USERS = ["1", "2", "3", "10", "50", "100", "196", "250", "500", "900", "943"]
COLD = {"profile": {"age": "25", "gender": "F", "occupation": "writer"}, "history": ["50", "172", "181"]}


def served(ws: Path) -> dict[str, list[tuple[str, float, str | None]]]:
    engine = load_bundle(ws / "models" / "bundle", version="compare")
    asks = {u: {"user_id": u} for u in USERS if engine.known_user(u)}
    asks |= {"cold_profile": {"profile": COLD["profile"]}, "cold_history": {"history": COLD["history"]}}
    return {
        name: [
            (r["item_id"], r["score"], r["explanation"])
            for r in engine.recommend(
                ask.get("user_id"), 10, profile=ask.get("profile"), history=ask.get("history")
            )
        ]  # noqa: E501
        for name, ask in asks.items()
    }


def main(old: Path, new: Path) -> int:
    bad = []
    metrics = [json.loads((ws / "metrics.json").read_text(encoding="utf-8")) for ws in (old, new)]
    for part in ("valid", "test", "cold", "mixed"):
        for key, value in metrics[0].get(part, {}).items():
            other = metrics[1].get(part, {}).get(key)
            if isinstance(value, float) and (other is None or abs(value - other) > 1e-4):
                bad.append(f"{part}.{key}: {value} vs {other}")
    print("test ndcg@10", metrics[0]["test"]["ndcg@10"], metrics[1]["test"]["ndcg@10"])
    print("cold recall@20", metrics[0]["cold"]["recall@20"], metrics[1]["cold"]["recall@20"])
    parity = [
        json.loads((ws / "models/bundle/bundle.json").read_text())["metrics"]["parity"] for ws in (old, new)
    ]
    for key, value in parity[0].items():
        print("parity", key, value, parity[1].get(key))
        if isinstance(value, float) and abs(value - parity[1].get(key, float("inf"))) > 1e-4:
            bad.append(f"parity {key}")
    lists = [served(ws) for ws in (old, new)]
    items = sum(
        a[0] != b[0] for name in lists[0] for a, b in zip(lists[0][name], lists[1][name], strict=True)
    )
    notes = sum(
        a[2] != b[2] for name in lists[0] for a, b in zip(lists[0][name], lists[1][name], strict=True)
    )
    worst = max(
        abs(a[1] - b[1]) for name in lists[0] for a, b in zip(lists[0][name], lists[1][name], strict=True)
    )
    print(
        f"served: {len(lists[0])} lists; items differing {items}; explanations differing {notes}; "
        f"max score diff {worst:.1e}"
    )
    bad += [f"served items differ: {items}"] if items else []
    rows = [
        list(csv.reader((ws / "recommendations.csv").open()))
        for ws in (old, new)
        if (ws / "recommendations.csv").exists()
    ]
    if len(rows) == 2:
        same = sum(a[:3] == b[:3] for a, b in zip(rows[0][1:], rows[1][1:], strict=True))
        same_notes = sum(a[4:] == b[4:] for a, b in zip(rows[0][1:], rows[1][1:], strict=True))
        diff = max(abs(float(a[3]) - float(b[3])) for a, b in zip(rows[0][1:], rows[1][1:], strict=True))
        print(
            f"offline rows {len(rows[0]) - 1}: same user/item/rank {same}, same explanation {same_notes}, "
            f"max score diff {diff:.1e}"
        )
    for line in bad:
        print("DIFFERS:", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
