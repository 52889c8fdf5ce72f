"""Serving at catalogue scale: a bundle for a synthetic graph (up to 100k users x 20k items), served.

Usage:
    .venv/bin/python benchmarks/serve_scale.py --size large            # build, load, rank in-process
    .venv/bin/python benchmarks/serve_scale.py --size large --serve    # ... then served, 100 req/s

What it measures is the serving machinery at that size, not a model's quality: the bundle holds the real
feature bank of the synthetic graph (length-3 user->item metapaths through every relation, built by
``build_bank`` with the default dense budget, so channels over it stay factored) and the real graph for
explanations, but the scorer is an untrained ``FusionNet`` of the right shape (random weights: the same
ONNX graph and cost as a trained one) and profile/item-text vectors are random unit vectors. No EASE
channel: its closed form is dense items x items. The full pipeline at this size is issue 17.

Printed: time and peak RSS of each step, the bundle's size on disk and per part, the engine's load time
and RSS, per-request latency of ``BundleEngine.rank`` with explanations (k=10, 200 users), the warm-up
rate, and with ``--serve`` the open-loop HTTP figures of benchmarks/serve_load.py against a
``components.serving.server`` process loading the bundle (its RSS read from /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from metapath_mining import prepare  # noqa: E402

from components.data.kg import save_graph  # noqa: E402
from components.data.synthetic import SIZES, generate  # noqa: E402

TEXT_DIM = 384


def rss_mb(pid: int | None = None) -> float:
    """Current RSS (MiB) of ``pid`` (this process when None), from /proc."""
    status = Path(f"/proc/{pid or 'self'}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def unit_rows(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def build(size: str, dest: Path, max_paths: int) -> dict[str, Any]:
    """Generate the graph and write a bundle directory the engine loads; returns timings and sizes."""
    import scipy.sparse as sp
    import torch

    from components.bundle.export import export_scorer
    from components.data.kg import INTERACTED, HeteroGraph
    from components.metapaths.schema import enumerate_metapaths
    from components.model.features import Factors, build_bank
    from components.model.net import FusionNet, NetConfig

    out: dict[str, Any] = {"size": size}
    spec = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        generate(spec, Path(tmp) / "syn")
        out["generate_s"] = time.perf_counter() - start
        start = time.perf_counter()
        graph, (train, _valid), _ = prepare(Path(tmp) / "syn", "synthetic")
        out["ingest_graph_split_s"] = time.perf_counter() - start
    train = sp.csr_matrix(train, dtype=np.float32)
    n_users, n_items = train.shape
    candidates = [p for p in enumerate_metapaths(graph.schema, 3) if p.length == 3]
    paths = sorted(candidates, key=lambda p: (p.keys[0] != INTERACTED, p.id))[:max_paths]
    out["paths"] = [p.id for p in paths]
    start = time.perf_counter()
    bank = build_bank(graph, train, paths, "pathsim", 0.5, None)
    out["bank_s"] = time.perf_counter() - start
    out["channels"] = {
        c.name: ("factored" if isinstance(c.suffix, Factors) else "dense") for c in bank.channels
    }
    out["bank_mb_in_memory"] = sum(
        (c.suffix.nbytes if isinstance(c.suffix, Factors) else c.suffix.nbytes) for c in bank.channels
    ) / (1 << 20)
    out["dense_equivalent_mb"] = sum((c.suffix.shape[0] * n_items * 4) for c in bank.channels) / (1 << 20)
    rng = np.random.default_rng(0)
    dest.mkdir(parents=True, exist_ok=True)
    bank.save(dest)
    profile = unit_rows(n_users, TEXT_DIM, rng)
    coo = train.tocoo()
    np.savez(
        dest / "profiles.npz",
        profile=profile,
        train_rows=coo.row.astype(np.int64),
        train_cols=coo.col.astype(np.int64),
        train_shape=np.asarray(train.shape, dtype=np.int64),
    )
    np.savez(
        dest / "seen.npz",
        seen_rows=coo.row.astype(np.int64),
        seen_cols=coo.col.astype(np.int64),
        seen_shape=np.asarray(train.shape, dtype=np.int64),
    )
    net = FusionNet(
        NetConfig(n_items=n_items, text_dim=TEXT_DIM, n_channels=len(bank.channels)),
        torch.from_numpy(unit_rows(n_items, TEXT_DIM, rng)),
        torch.ones(n_items, dtype=torch.bool),
    )
    start = time.perf_counter()
    export_scorer(net.eval(), dest / "scorer.onnx")
    out["export_scorer_s"] = time.perf_counter() - start
    item_ids = [str(i) for i in graph.node_ids["item"]]
    pd.DataFrame(
        {"item": np.arange(n_items), "item_id": item_ids, "title": [f"Item {i}" for i in item_ids]}
    ).to_parquet(dest / "items.parquet", index=False)
    pd.DataFrame(
        {"user": np.arange(n_users), "user_id": [str(u) for u in graph.node_ids["user"]]}
    ).to_parquet(dest / "users.parquet", index=False)
    # The engine adds the history itself; the saved graph holds the item/entity relations.
    relations = {k: r for k, r in graph.relations.items() if k != INTERACTED}
    save_graph(HeteroGraph(graph.node_ids, relations), dest / "graph")
    (dest / "bundle.json").write_text(json.dumps({"files": {}, "config": {"text": {}}, "metrics": {}}))
    out["bundle_mb_on_disk"] = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()) / (1 << 20)
    out["features_npz_mb"] = (dest / "features.npz").stat().st_size / (1 << 20)
    out["build_peak_rss_mb"] = peak_mb()
    return out


def measure_engine(bundle: Path, users: int, warm: int) -> dict[str, Any]:
    """Load the bundle as the server does and time ranking with explanations (in this process)."""
    from components.bundle.engine import BundleEngine

    before = rss_mb()
    start = time.perf_counter()
    engine = BundleEngine(bundle)
    out: dict[str, Any] = {"load_s": time.perf_counter() - start, "engine_rss_mb": rss_mb() - before}
    ids = sorted(engine._user_index)
    rng = np.random.default_rng(1)
    sample = [ids[i] for i in rng.choice(len(ids), size=users, replace=False)]
    engine.rank(sample[0], 10)  # first call pays lazy set-up (explainer weight matrices)
    times = []
    for user in sample:
        begun = time.perf_counter()
        engine.rank(user, 10)
        times.append((time.perf_counter() - begun) * 1000)
    out["rank_ms"] = {q: round(float(np.percentile(times, q)), 2) for q in (50, 95, 99)}
    out["rank_max_ms"] = round(max(times), 2)
    start = time.perf_counter()
    engine.warm(warm)
    out["warm_users_per_s"] = round(warm / (time.perf_counter() - start), 1)
    out["rss_after_warm_mb"] = rss_mb()
    return out


class ScaleSource:
    """EngineSource for ``--serve``: version "1" is the bundle named by ``METAREC_SCALE_BUNDLE``."""

    def __init__(self, settings: Any) -> None:
        self.bundle = Path(os.environ["METAREC_SCALE_BUNDLE"])

    def current_version(self) -> str | None:
        return "1"

    def load(self, version: str) -> Any:
        from components.bundle.engine import BundleEngine

        return BundleEngine(self.bundle, version)


def make_source(settings: Any) -> ScaleSource:
    return ScaleSource(settings)


def serve_and_load(bundle: Path, rate: float, seconds: float, warm: int) -> dict[str, Any]:
    """Start the server on the bundle, wait for /ready, drive it open loop; report RSS and latency."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix="serve-scale-"))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT)]),
        "METAREC_SCALE_BUNDLE": str(bundle),
        "METAREC_API_KEY": "scale-benchmark-key",
    }
    cmd = [
        sys.executable, "-m", "components.serving.server", "--source", "serve_scale:make_source",
        "--port", str(port), "--feedback-url", f"sqlite:///{tmp / 'feedback.db'}", "--log-level", "warning",
        "--precompute-users", str(warm),
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    ready_s: float | None = None
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"{url}/ready", timeout=2) as answer:
                    if answer.status == 200 and ready_s is None:
                        ready_s = time.perf_counter() - start
                    if answer.status == 200 and not json.loads(answer.read()).get("warming"):
                        break
            except OSError:
                pass
            time.sleep(0.2)
        out: dict[str, Any] = {
            "answering_s": round(ready_s or 0.0, 1),  # /ready 200: the engine is installed
            "warmed_s": round(time.perf_counter() - start, 1),  # /ready says warming is over
            "rss_warmed_mb": rss_mb(proc.pid),
        }
        ids = pd.read_parquet(bundle / "users.parquet").user_id.astype(str).tolist()
        # Warmed users (lookups) and users after them (each request computes a list).
        for name, chosen in (("warm_users", ids[:warm]), ("cold_cache_users", ids[warm:])):
            users = tmp / f"{name}.txt"
            users.write_text("\n".join(chosen))
            load = subprocess.run(
                [
                    sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--url", url, "--users-file",
                    str(users), "--rate", str(rate), "--seconds", str(seconds), "--json",
                ],  # fmt: skip
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            out[name] = json.loads(load.stdout)["overall"]
        out["rss_after_load_mb"] = rss_mb(proc.pid)
        return out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--bundle", type=Path, help="bundle directory to write (default: a temporary one)")
    parser.add_argument("--max-paths", type=int, default=8, help="metapath channels in the bank")
    parser.add_argument("--users", type=int, default=200, help="users ranked in-process")
    parser.add_argument("--warm", type=int, default=1000, help="users warmed (in-process and served)")
    parser.add_argument("--serve", action="store_true", help="also serve it and drive it over HTTP")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scale-bundle-") as tmp:
        bundle = args.bundle or Path(tmp) / "bundle"
        result: dict[str, Any] = {"build": build(args.size, bundle, args.max_paths)}
        print(json.dumps(result["build"], indent=2), flush=True)
        result["engine"] = measure_engine(bundle, args.users, args.warm)
        print(json.dumps(result["engine"], indent=2), flush=True)
        if args.serve:
            result["serve"] = serve_and_load(bundle, args.rate, args.seconds, args.warm)
            print(json.dumps(result["serve"], indent=2), flush=True)


if __name__ == "__main__":
    main()
